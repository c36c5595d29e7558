"""Compute the SEG rows of a DiT's blocks before the first blurred one only once.

In a batched call the SEG rows are copies of the cond rows (same latent, sigma, text, guidance), and a
DiT block treats every row on its own (per-sample attention, per-token norms and MLPs).  So up to the
first chosen block a SEG row equals its cond row, and those blocks need not compute it: a pre-hook
drops the SEG rows from every per-row argument of each prefix block (``img``, ``txt``, ``vec``, ``pe``;
``context``, ``x``, ``c``), and a hook on the last prefix block's output puts them back as copies of
their cond rows.  Everything between blocks then sees the full batch again (Flux joins ``txt`` and
``img`` for the single-stream blocks; MMDiT has nothing in between).  With the default blocks this skips
7 of Flux's 19 double blocks and 7 of SD3's 24 joint blocks for the SEG rows.  Which modules are the
prefix, and after which the rows come back, is the family's plan (:meth:`DitFamily.prefix`): NextDiT adds
its caption and noise refiners, whose two streams the host joins before the main layers.

Arguments that carry rows inside containers are slimmed through them: tuples, lists, dicts and
dataclasses (Chroma's and Flux.2's shared modulations are tuples of ``ModulationOut`` dataclasses, Neo
``backend/nn/flux.py``).  A block with any other object among its arguments cannot be slimmed: then
nothing is slimmed in that call and the result is full recomputation, which is always right.  The
layout of the rows is the caller's, given as ``drop``/``expand`` (A1111: SEG rows between cond and
uncond; Forge: appended).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from numbers import Number
from types import FunctionType

import torch
from torch import nn

from lib_seg.core.blocks import DitLayer
from lib_seg.core.rows import RowMap, children, has_rows, is_record, map_rows
from lib_seg.dit.families import family_of


def blocks_in_order(model: nn.Module) -> list[tuple[DitLayer, nn.Module]]:
    """The transformer blocks in execution order, as the model's family lists them."""
    family = family_of(model)
    return [] if family is None else family.blocks(model)


def prefix_plan(model: nn.Module, layers: Iterable[DitLayer]) -> tuple[list[nn.Module], list[nn.Module]]:
    """The modules the SEG rows skip, in execution order, and those after which they come back: the
    family's (:meth:`lib_seg.dit.families.base.DitFamily.prefix`); none for a model no family knows."""
    family = family_of(model)
    return ([], []) if family is None else family.prefix(model, layers)


def _plain(value: object) -> bool:
    """An argument we can slim or leave: a tensor, something that holds no tensor (a plain function among
    them: an attention override in ``transformer_options``), or a tuple, list, dict or dataclass of such."""
    if torch.is_tensor(value) or value is None or isinstance(value, Number | str | bool | FunctionType):
        return True
    if isinstance(value, tuple | list | dict) or is_record(value):
        return all(map(_plain, children(value)))
    return False


@contextmanager
def shared_prefix(
    model: nn.Module, layers: Iterable[DitLayer], total_rows: int, main_rows: int, drop: RowMap, expand: RowMap
) -> Iterator[None]:
    """Within the block, a call of ``model`` with ``total_rows`` rows runs its prefix blocks on the
    ``main_rows`` only (see the module docstring)."""
    blocks, widened = prefix_plan(model, layers)
    if not blocks:
        yield
        return
    state = {"slim": False}

    def slim(block: nn.Module, args: tuple, kwargs: dict):
        values = (*args, *kwargs.values())
        if block is blocks[0]:  # decided once per call, at the first block
            state["slim"] = all(map(_plain, values)) and any(has_rows(v, total_rows) for v in values)
        if not state["slim"]:
            return None
        return map_rows(args, total_rows, drop), map_rows(kwargs, total_rows, drop)

    def widen(_block: nn.Module, _args: tuple, output):
        if not state["slim"]:
            return None
        return map_rows(output, main_rows, expand)

    handles = [block.register_forward_pre_hook(slim, with_kwargs=True) for block in blocks]
    handles.extend(block.register_forward_hook(widen) for block in widened)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
