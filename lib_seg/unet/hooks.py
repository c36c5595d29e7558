"""Blur the queries of chosen attn1 layers of an ldm/sgm-layout UNet, for one call, with module hooks.

Used where the host runs the original ldm/sgm attention classes (AUTOMATIC1111).  Every attention
optimisation there starts with ``self.to_q(x)``, and class-level ``forward`` patches are replaced on
each model load, so a forward hook on the ``to_q`` Linear is the one point all of them share.  The
token grid is recorded from the ``SpatialTransformer``'s input ``[B, C, H, W]`` in the same call,
which is exact even where sides are odd or another extension resized the map (Deep Shrink).  When tomesd merged
the layer's tokens (A1111's token merging) the queries are blurred on the full grid and merged as the
host merges them (:mod:`lib_seg.unet.token_merging`, from the block input recorded by a pre-hook); any
other query count that differs from H*W (HyperTile tiles) leaves the layer alone and
``on_skip`` is told.

Hooks exist only inside the ``with`` block and are removed in ``finally``: nothing outlives the
SEG pass, whatever it raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lib_seg.core import skips
from lib_seg.core.blur import blur_queries
from lib_seg.core.layers import LayerKey, format_layers
from lib_seg.core.skips import SkipCallback
from lib_seg.unet import token_merging

log = logging.getLogger("sd_webui_seg")

UNET_PARTS = ("input_blocks", "middle_block", "output_blocks")


def as_ldm_unet(candidate: Any) -> nn.Module | None:
    """``candidate`` if it is a module with input, middle and output blocks, else None."""
    if isinstance(candidate, nn.Module) and all(hasattr(candidate, part) for part in UNET_PARTS):
        return candidate
    return None


def skip_warner() -> SkipCallback:
    """The UNet's :func:`lib_seg.core.skips.skip_warner`: layers named as the layer spec names them."""
    return skips.skip_warner(format_layers)


def spatial_transformer_name(key: LayerKey) -> str:
    """Module name of the SpatialTransformer holding ``key`` (child 1 of its TimestepEmbedSequential)."""
    if key.part == "middle":
        return "middle_block.1"
    return f"{key.part}_blocks.{key.block}.1"


def transformer_block_name(key: LayerKey) -> str:
    """Module name of the BasicTransformerBlock that owns ``key``'s attn1."""
    return f"{spatial_transformer_name(key)}.transformer_blocks.{key.transformer}"


def attn1_name(key: LayerKey) -> str:
    return f"{transformer_block_name(key)}.attn1"


def _record_grid(grid: dict[str, tuple[int, int]]):
    def pre_hook(_module: nn.Module, args: tuple) -> None:
        grid["hw"] = tuple(args[0].shape[-2:])

    return pre_hook


def _blur_output(
    key: LayerKey,
    grid: dict,
    sigma: float,
    rows: slice | None,
    on_skip: SkipCallback | None,
    block: nn.Module | None = None,
    block_input: dict | None = None,
):
    def hook(to_q: nn.Module, _args: tuple, q: torch.Tensor) -> torch.Tensor | None:
        height, width = grid.get("hw", (0, 0))
        if q.dim() == 3 and q.shape[1] == height * width:
            blurred = blur_queries(q if rows is None else q[rows], height, width, sigma)
        elif q.dim() == 3 and block is not None and block_input is not None:  # tomesd merged the tokens
            x = block_input.get("x")
            blurred = token_merging.merged_blurred_queries(block, to_q, x, q, height, width, sigma, rows)
        else:
            blurred = None
        if blurred is None:
            if on_skip is not None:
                on_skip(key, q.shape[1] if q.dim() == 3 else -1, grid.get("hw"))
            return None
        if rows is None:
            return blurred
        q[rows] = blurred  # q is to_q's fresh output: write in place
        return q

    return hook


@contextmanager
def blurred_queries(
    unet: nn.Module,
    layers: Iterable[LayerKey],
    sigma: float,
    rows: slice | None = None,
    on_skip: SkipCallback | None = None,
) -> Iterator[None]:
    """Within the block, the queries of ``layers`` in ``unet`` are blurred (only batch ``rows`` if given)."""
    modules = dict(unet.named_modules())
    handles = []
    grids: dict[str, dict] = {}
    try:
        for key in layers:
            st_name, q_name = spatial_transformer_name(key), attn1_name(key) + ".to_q"
            if st_name not in modules or q_name not in modules:
                raise ValueError(f"SEG layers: this UNet has no attention layer {q_name}")
            if st_name not in grids:
                grids[st_name] = {}
                handles.append(modules[st_name].register_forward_pre_hook(_record_grid(grids[st_name])))
            block, block_input = modules.get(transformer_block_name(key)), None
            if block is not None and token_merging.tome_info(block) is not None:
                block_input = {}
                handles.append(
                    block.register_forward_pre_hook(token_merging.input_recorder(block_input), with_kwargs=True)
                )
            hook = _blur_output(key, grids[st_name], sigma, rows, on_skip, block, block_input)
            handles.append(modules[q_name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
