"""SEG rows inside the main UNet call, and computing their shared prefix only once.

Layout of a batched call: ``[cond rows (n), SEG rows (n, copies of the cond rows), uncond rows]``.
The uncond rows stay last because the hosts' CFG combination reads them from the end.

Prefix reuse: until the first UNet block that holds a blurred layer, a SEG row sees exactly what its
cond row sees (same latent, sigma, text cond, control), so the SEG rows need not be computed there.
Inside every block before that one, the layers drop the SEG rows from their inputs and the block's
last layer re-inserts them as copies of the cond rows.  Block outputs are stored as skip connections,
so later blocks find full-size skips.  Every UNet layer is row-independent (convs, GroupNorm per
sample, attention per sample), so the result equals full recomputation.  A layer whose inputs do not
have the expected row count (another extension changed the batch) runs unchanged.  The layout is the
caller's (A1111: SEG rows between cond and uncond; Forge: appended), given as ``drop``/``expand``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lib_seg.core.layers import PARTS, LayerKey
from lib_seg.core.rows import RowMap, is_rows, with_seg_rows, without_seg_rows

__all__ = ["RowMap", "prefix_pays", "shared_prefix", "with_seg_rows", "without_seg_rows"]


def blocks_in_order(unet: nn.Module) -> list[tuple[tuple[str, int], nn.Module]]:
    """UNet blocks in execution order, keyed like layer keys: (part, block index)."""
    order = [(("input", i), block) for i, block in enumerate(unet.input_blocks)]
    order.append((("middle", 0), unet.middle_block))
    order += [(("output", i), block) for i, block in enumerate(unet.output_blocks)]
    return order


def prefix_blocks(unet: nn.Module, layers: Iterable[LayerKey]) -> list[nn.Module]:
    """Blocks that run before the first block holding one of ``layers``."""
    first = min((PARTS.index(key.part), key.block) for key in layers)
    return [block for (part, index), block in blocks_in_order(unet) if (PARTS.index(part), index) < first]


# Fewest SEG rows for which prefix reuse pays: with one SEG row (one image) a step is bound by kernel
# launches and Python hooks, and the ~40 layer hooks cost more than the rows they save (H200, fp16,
# docs/benchmarks.md: SD1.5 512² batch 1, 1.07-1.09x batched vs 1.14-1.19x with prefix; at batch 4
# prefix wins, SDXL 1024² 1.36x vs 1.50x).
PREFIX_MIN_SEG_ROWS = 2


def prefix_pays(seg_rows: int) -> bool:
    return seg_rows >= PREFIX_MIN_SEG_ROWS


@contextmanager
def shared_prefix(
    unet: nn.Module, layers: Iterable[LayerKey], total_rows: int, main_rows: int, drop: RowMap, expand: RowMap
) -> Iterator[None]:
    """Within the block, a call with ``total_rows`` rows computes its SEG rows' prefix only once.

    ``drop`` takes a ``total_rows`` tensor to its ``main_rows`` (SEG rows removed), ``expand`` puts
    them back as copies of their cond rows.  Hooks sit on the layers inside each prefix block (the
    hosts call those layers, while classic Forge and reForge never call the block module itself):
    every layer gets its full-size tensor arguments (x, emb, context) slimmed, and the block's last
    layer widens its output again, so skips and everything between blocks stay full size.
    """

    def slim(_module: nn.Module, args: tuple, kwargs: dict):
        if not any(is_rows(a, total_rows) for a in (*args, *kwargs.values())):
            return None
        slim_args = tuple(drop(a) if is_rows(a, total_rows) else a for a in args)
        return slim_args, {k: drop(v) if is_rows(v, total_rows) else v for k, v in kwargs.items()}

    def widen(_module: nn.Module, _args: tuple, output: torch.Tensor):
        return expand(output) if is_rows(output, main_rows) else None

    handles = []
    try:
        for block in prefix_blocks(unet, layers):
            children = list(block.children())
            for layer in children:
                handles.append(layer.register_forward_pre_hook(slim, with_kwargs=True))
            handles.append(children[-1].register_forward_hook(widen))
        yield
    finally:
        for handle in handles:
            handle.remove()
