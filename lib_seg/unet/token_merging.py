"""SEG's query blur on attn1 layers whose tokens tomesd merged (A1111's *Token merging ratio*).

A1111 1.10 applies ``tomesd.apply_patch(sd_model, ratio, use_rand=False, merge_attn=True,
merge_crossattn=False, merge_mlp=False)``: each ``BasicTransformerBlock`` becomes a ``ToMeBlock``
whose ``_forward`` runs ``m_a, ... = compute_merge(x, self._tome_info)`` on the block input ``x`` and
then ``u_a(self.attn1(m_a(self.norm1(x)))) + x``, so ``attn1.to_q`` sees fewer tokens than the grid.

Why blurring there is still exact: ``to_q`` is a bias-free Linear acting on each token, and tomesd's
merge ('mean' ``scatter_reduce`` with indices fixed by ``x``, no randomness when ``use_rand`` is off)
is a linear map of the tokens of each row, so ``to_q(m_a(norm1(x))) == m_a(to_q(norm1(x)))``: the
host's merged queries are the merge of the full-grid queries.  "Blur the queries" therefore means
``m_a(blur(to_q(norm1(x))))`` on such a layer, which is what :func:`merged_blurred_queries` builds:
it projects the full-grid queries again, blurs them on the grid, and merges them with the merge
function tomesd itself returns for the same ``x``.

* The merge indices are recomputed from the very tensor the host used (all rows of the call, not
  only the blurred ones): the host unmerges the attention output with *its* indices, so ours must be
  identical, not just equal up to a tie that a sub-batch might round differently in half precision.
  The price is tomesd's token-similarity product once more per merged layer and row (at ratio 0.5,
  3/8 of the multiply-adds of that layer's own attention products on the merged tokens); with
  A1111's ``max_downsample=1`` only the full-resolution layers are merged.
* ``compute_merge`` is taken from the module that defined the block's class (``tomesd.patch`` in
  A1111): the very function the host calls, and no import of tomesd here.
* Infinite sigma needs no merge: every blurred query of a row is the row's mean, and merging a
  constant row gives the constant, so the merged queries are that mean; this holds for any merge,
  random ones included.
* A finite sigma with ``use_rand`` on (not A1111's setting) is not reproduced: the random choice
  depends on the generator state and the batch; the caller then leaves the layer unblurred.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lib_seg.core.blur import blur_queries, is_infinite_sigma

ComputeMerge = Callable[[torch.Tensor, dict], tuple]


def tome_info(block: nn.Module) -> dict | None:
    """The ``_tome_info`` (with its merge ``args``) of a block tomesd patches now, else None.

    ``remove_patch`` (A1111 calls it when the ratio goes back to 0) restores the class but leaves
    ``_tome_info`` behind, hence the class check."""
    info = getattr(block, "_tome_info", None)
    if type(block).__name__ != "ToMeBlock" or not isinstance(info, dict):
        return None
    return info if isinstance(info.get("args"), dict) else None


def input_recorder(store: dict[str, Any]) -> Callable:
    """Forward pre-hook (``with_kwargs=True``) keeping the block's input ``x``: the full token grid,
    before ``compute_merge`` and ``norm1`` (ldm calls ``block(x, context=...)``)."""

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        store["x"] = args[0] if args else kwargs.get("x")

    return pre_hook


def _compute_merge(block: nn.Module) -> ComputeMerge | None:
    module = sys.modules.get(type(block).__module__)
    merge = getattr(module, "compute_merge", None)
    return merge if callable(merge) else None


def merged_blurred_queries(
    block: nn.Module,
    to_q: nn.Module,
    x: Any,
    q: torch.Tensor,
    height: int,
    width: int,
    sigma: float,
    rows: slice | None = None,
) -> torch.Tensor | None:
    """``m_a(blur(to_q(norm1(x))))`` for ``q[rows]`` (all of ``q`` if ``rows`` is None), or None when
    this is not a tomesd block whose merge can be reproduced exactly (the caller then skips)."""
    info = tome_info(block)
    norm1 = getattr(block, "norm1", None)
    if info is None or not isinstance(norm1, nn.Module) or not torch.is_tensor(x):
        return None
    if x.dim() != 3 or x.shape[:1] != q.shape[:1] or x.shape[1] != height * width or q.shape[1] >= x.shape[1]:
        return None
    infinite = is_infinite_sigma(sigma)
    compute_merge = _compute_merge(block)
    if not infinite and (compute_merge is None or info["args"].get("use_rand", True)):
        return None
    picked = slice(None) if rows is None else rows
    # ``forward``, not ``__call__``: our own hook on to_q must not run again on the full queries
    full = to_q.forward(norm1(x[picked]))
    if full.dim() != 3 or full.shape[-1] != q.shape[-1]:
        return None
    blurred = blur_queries(full, height, width, sigma)
    if infinite:  # constant rows: any merge of them is the row mean itself
        return blurred[:, : q.shape[1]]
    merge = compute_merge(x, info)[0]
    if rows is not None:  # the merge functions take every row of the call; only ``rows`` are read back
        every_row = blurred.new_zeros(x.shape[0], *blurred.shape[1:])
        every_row[rows] = blurred
        blurred = every_row
    merged = merge(blurred)
    merged = merged if rows is None else merged[rows]
    return merged if merged.shape == q[picked].shape else None
