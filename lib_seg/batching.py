"""SEG rows inside the main UNet call, and computing their shared prefix only once.

Layout of a batched call: ``[cond rows (n), SEG rows (n, copies of the cond rows), uncond rows]``.
The uncond rows stay last because the hosts' CFG combination reads them from the end.

Prefix reuse: until the first UNet block that holds a blurred layer, a SEG row sees exactly what its
cond row sees (same latent, sigma, text cond, control), so the SEG rows need not be computed there.
Every block before that one gets a pre-hook that drops the SEG rows from its inputs and a forward
hook that re-inserts them as copies of the cond rows in its output.  Outputs are stored as skip
connections, so later blocks find full-size skips.  Every UNet block is row-independent (convs,
GroupNorm per sample, attention per sample), so the result equals full recomputation.  If a block's
input does not have the expected row count (another extension changed the batch), that block runs
unchanged and its output is passed on as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .layers import PARTS, LayerKey


def with_seg_rows(t: torch.Tensor, n_cond: int) -> torch.Tensor:
    """Insert copies of the first ``n_cond`` rows right after them."""
    return torch.cat([t[:n_cond], t[:n_cond], t[n_cond:]])


def without_seg_rows(t: torch.Tensor, n_cond: int) -> torch.Tensor:
    return torch.cat([t[:n_cond], t[2 * n_cond :]])


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


@contextmanager
def shared_prefix(unet: nn.Module, layers: Iterable[LayerKey], n_cond: int, total_rows: int) -> Iterator[None]:
    """Within the block, a call with ``total_rows`` rows computes its SEG rows' prefix only once."""
    main_rows = total_rows - n_cond

    def drop(_module: nn.Module, args: tuple, kwargs: dict):
        if not args or not torch.is_tensor(args[0]) or args[0].shape[0] != total_rows:
            return None
        slim = tuple(without_seg_rows(a, n_cond) if _is_rows(a, total_rows) else a for a in args)
        slim_kwargs = {k: without_seg_rows(v, n_cond) if _is_rows(v, total_rows) else v for k, v in kwargs.items()}
        return slim, slim_kwargs

    def expand(_module: nn.Module, _args: tuple, output: torch.Tensor):
        if torch.is_tensor(output) and output.shape[0] == main_rows:
            return with_seg_rows(output, n_cond)
        return None

    handles = []
    try:
        for block in prefix_blocks(unet, layers):
            handles.append(block.register_forward_pre_hook(drop, with_kwargs=True))
            handles.append(block.register_forward_hook(expand))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _is_rows(value: object, rows: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows
