"""Compute the SEG rows of a DiT's blocks before the first blurred one only once.

In a batched call the SEG rows are copies of the cond rows (same latent, sigma, text, guidance), and a
DiT block treats every row on its own (per-sample attention, per-token norms and MLPs).  So up to the
first chosen block a SEG row equals its cond row, and those blocks need not compute it: a pre-hook
drops the SEG rows from every per-row argument of each prefix block (``img``, ``txt``, ``vec``, ``pe``;
``context``, ``x``, ``c``), and a hook on the last prefix block's output puts them back as copies of
their cond rows.  Everything between blocks then sees the full batch again (Flux joins ``txt`` and
``img`` for the single-stream blocks; MMDiT has nothing in between).  With the default blocks this skips
7 of Flux's 19 double blocks and 7 of SD3's 24 joint blocks for the SEG rows.

A block whose arguments carry rows inside other objects (Chroma passes its modulations as dataclasses
and tuples) cannot be slimmed argument by argument: then nothing is slimmed in that call and the result
is full recomputation, which is always right.  The layout of the rows is the caller's, given as
``drop``/``expand`` (A1111: SEG rows between cond and uncond; Forge: appended).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from numbers import Number

import torch
from torch import nn

from lib_seg.dit.layers import KINDS, DitLayer, sort_key

RowMap = Callable[[torch.Tensor], torch.Tensor]


def blocks_in_order(model: nn.Module) -> list[tuple[DitLayer, nn.Module]]:
    """The transformer blocks in execution order (Flux: double then single; MMDiT: joint)."""
    return [
        (DitLayer(kind, i), block) for kind in KINDS for i, block in enumerate(getattr(model, f"{kind}_blocks", ()))
    ]


def prefix_blocks(model: nn.Module, layers: Iterable[DitLayer]) -> list[nn.Module]:
    """Blocks that run before the first of ``layers``."""
    first = min(sort_key(layer) for layer in layers)
    return [block for layer, block in blocks_in_order(model) if sort_key(layer) < first]


def _is_rows(value: object, rows: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows


def _plain(value: object) -> bool:
    """An argument we can slim or leave: a tensor, or something that holds no tensor."""
    return torch.is_tensor(value) or value is None or isinstance(value, Number | str | bool)


@contextmanager
def shared_prefix(
    model: nn.Module, layers: Iterable[DitLayer], total_rows: int, main_rows: int, drop: RowMap, expand: RowMap
) -> Iterator[None]:
    """Within the block, a call of ``model`` with ``total_rows`` rows runs its prefix blocks on the
    ``main_rows`` only (see the module docstring)."""
    blocks = prefix_blocks(model, layers)
    if not blocks:
        yield
        return
    state = {"slim": False}

    def slim(block: nn.Module, args: tuple, kwargs: dict):
        values = (*args, *kwargs.values())
        if block is blocks[0]:  # decided once per call, at the first block
            state["slim"] = all(map(_plain, values)) and any(_is_rows(v, total_rows) for v in values)
        if not state["slim"]:
            return None
        slim_args = tuple(drop(a) if _is_rows(a, total_rows) else a for a in args)
        return slim_args, {k: drop(v) if _is_rows(v, total_rows) else v for k, v in kwargs.items()}

    def widen(_block: nn.Module, _args: tuple, output):
        if not state["slim"]:
            return None
        if isinstance(output, tuple | list):
            return type(output)(expand(t) if _is_rows(t, main_rows) else t for t in output)
        return expand(output) if _is_rows(output, main_rows) else None

    handles = [block.register_forward_pre_hook(slim, with_kwargs=True) for block in blocks]
    handles.append(blocks[-1].register_forward_hook(widen))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
