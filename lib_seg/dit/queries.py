"""Blur the image-token queries of a DiT block's attention (every family), and the RoPE identity of the q-norm hooks.

A DiT attends over one joint sequence ``[txt | img (| extra)]``.  SEG blurs only the image-token
queries over the image's 2D patch grid, as they enter the softmax: text queries, all keys and all
values stay as they are.  Query ``i``'s logits are ``q_i . K^T``, linear in ``q_i``, so blurring the
image queries blurs the image rows of the logit matrix (paper Prop. 3.1) and the host's fused
attention kernel can run unchanged on the blurred queries.

Where the queries enter the softmax differs per host (``docs/dit.md``): MMDiT has no
RoPE, so its ``ln_q`` output ``(B, L, heads, D)`` or the reshaped ``(B, L, heads*D)`` is final
(:func:`blur_image_queries` with ``blhd`` / ``bld``).  Flux and Chroma rotate q by RoPE inside
``attention()``, after QK-norm; blurring before RoPE is not the same (RoPE differs per token).  Where
the only per-instance hook is the QK-norm output, :func:`blur_before_rope` returns
``R^-1 blur(R q)``, which the host's own RoPE turns into exactly ``blur(R q)``: the one RoPE identity of
every q-norm family (Flux, Chroma, Flux.2, Qwen-Image, PixelDiT; Wan frame by frame), in either token layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from lib_seg.core.blur import blur_queries

Layout = Literal["bhld", "blhd", "bld"]
Rows = slice | Sequence[int] | torch.Tensor | None
LAYOUTS: dict[str, int] = {"bhld": 4, "blhd": 4, "bld": 3}  # layout -> tensor dimensions


def _check(q: torch.Tensor, image: slice, grid: tuple[int, int], layout: str, frames: int = 1) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown query layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if q.dim() != LAYOUTS[layout]:
        raise ValueError(f"queries of shape {tuple(q.shape)} are not in {layout!r} layout")
    length = q.shape[2 if layout == "bhld" else 1]
    start, stop, step = image.indices(length)
    h_len, w_len = grid
    if step != 1 or frames < 1 or stop - start != frames * h_len * w_len:
        grid_text = f"the {h_len}x{w_len} patch grid"
        what = grid_text if frames == 1 else f"{frames} frames of {grid_text}"
        raise ValueError(
            f"image tokens {image} of a {length}-token sequence are not {what} "
            f"({frames * h_len * w_len} consecutive tokens)"
        )


def _index(layout: str, rows: Rows, image: slice) -> tuple:
    """Index of the image queries of the chosen batch rows, for reading and for writing back."""
    if rows is None:
        batch: slice | torch.Tensor = slice(None)
    elif isinstance(rows, slice):
        batch = rows
    else:
        batch = torch.as_tensor(rows, dtype=torch.long)
    return (batch, slice(None), image) if layout == "bhld" else (batch, image)


def _blur_tokens(part: torch.Tensor, grid: tuple[int, int], sigma: float, layout: str, frames: int = 1) -> torch.Tensor:
    """Blur image queries over the grid, each of ``frames`` consecutive frames over its own (one product for
    all frames: they are batch rows of the blur); every head x channel is one channel of the blur."""
    tokens = part.transpose(1, 2) if layout == "bhld" else part  # (B, F*N, heads, D) or (B, F*N, C)
    shape = tokens.shape
    flat = tokens.flatten(2) if tokens.dim() == 4 else tokens
    per_frame = flat.reshape(shape[0] * frames, shape[1] // frames, flat.shape[-1])
    blurred = blur_queries(per_frame, grid[0], grid[1], sigma).reshape(shape)
    return blurred.transpose(1, 2) if layout == "bhld" else blurred


def blur_image_queries(
    q: torch.Tensor,
    image: slice,
    grid: tuple[int, int],
    sigma: float,
    layout: Layout,
    rows: Rows = None,
    frames: int = 1,
) -> torch.Tensor:
    """A copy of ``q`` with the image queries blurred over the ``grid = (h_len, w_len)`` patch grid.

    ``layout``: ``"bhld"`` (B, heads, L, D) as Flux/Chroma's q after RoPE; ``"blhd"`` (B, L, heads, D)
    as MMDiT's ``ln_q`` output; ``"bld"`` (B, L, heads*D) as MMDiT's q entering attention.
    ``image`` is the slice of the token axis holding the image (row-major over the grid), ``rows``
    optionally limits the blur to some batch rows (the SEG rows of a batched call).  With ``frames`` > 1
    the image is that many consecutive frames of the grid (a video), each blurred over its own grid (no
    temporal blur).  Everything else (text and extra tokens, other rows) is copied bit for bit.
    """
    _check(q, image, grid, layout, frames)
    index = _index(layout, rows, image)
    out = q.clone()
    out[index] = _blur_tokens(q[index], grid, sigma, layout, frames)
    return out


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least float32, like the hosts' RoPE (which rotates in float32 whatever q's dtype)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``M @ (x_2i, x_2i+1)`` for each channel pair, ``M = freqs[..., pair, :, :]``; no dtype change."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = freqs[..., 0] * pairs[..., :1] + freqs[..., 1] * pairs[..., 1:]
    return rotated.flatten(-2)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding, from its definition: channels ``(2i, 2i+1)`` of every token are
    multiplied by the 2x2 matrix ``freqs[..., token, i, :, :]``.

    ``x``: (B, heads, L, D); ``freqs``: (B or 1, 1, L, D/2, 2, 2) (Flux's ``pe``).  Rotates in float32
    or wider and returns ``x``'s dtype.
    """
    work = _work_dtype(x, freqs)
    return _rotate(x.to(work), freqs.to(work)).to(x.dtype)


def inverse_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Undo :func:`apply_rope`: each 2x2 matrix is a rotation, so its inverse is its transpose."""
    return apply_rope(x, freqs.transpose(-1, -2))


def blur_before_rope(
    q: torch.Tensor,
    pe: torch.Tensor,
    image: slice,
    grid: tuple[int, int],
    sigma: float,
    rows: Rows = None,
    layout: Literal["bhld", "blhd"] = "bhld",
    frames: int = 1,
) -> torch.Tensor:
    """Pre-RoPE queries ``q'`` whose RoPE is the blur of the RoPE'd queries: ``R q' = blur(R q)``.

    For a hook on a q-norm's output, before the host applies RoPE: ``q`` (B, heads, L, D) in ``bhld`` (Flux, Chroma,
    PixelDiT, ComfyUI's Qwen-Image), (B, L, heads, D) in ``blhd`` (Neo's Qwen-Image, Wan); ``pe`` the rotations the
    host applies next, of the same ``L`` tokens with the token axis where ``q`` has it, (B or 1, 1, L, D/2, 2, 2) or
    (B or 1, L, 1, D/2, 2, 2) (a Flux double block's image-only q needs ``pe[:, :, n_txt:]``; a single block's joint
    q the whole ``pe``).  ``frames`` > 1: the image is that many consecutive frames of the grid (a video), each
    blurred over its own grid, as :func:`blur_image_queries`.  Only the image rows of the chosen batch ``rows`` are
    rotated, blurred and rotated back, in float32 or wider, rounded once to ``q.dtype``: other rows are returned bit
    for bit.  Exact up to that rounding, because ``R^-1 = R^T`` for rotations.
    """
    _check(q, image, grid, layout, frames)
    tokens = 2 if layout == "bhld" else 1  # the token axis of q and pe
    batch_fits = pe.dim() == 6 and pe.shape[0] in (1, q.shape[0])
    if (
        not batch_fits
        or pe.shape[-2:] != (2, 2)
        or pe.shape[tokens] != q.shape[tokens]
        or 2 * pe.shape[3] != q.shape[3]
    ):
        raise ValueError(f"rotations of shape {tuple(pe.shape)} do not fit queries of shape {tuple(q.shape)}")
    index = _index(layout, rows, image)
    part = q[index]
    freqs = pe[index] if pe.shape[0] == q.shape[0] else pe[(slice(None),) * tokens + (image,)]
    work = _work_dtype(q, pe)
    freqs = freqs.to(work)
    blurred = _blur_tokens(_rotate(part.to(work), freqs), grid, sigma, layout, frames)
    out = q.clone()
    out[index] = _rotate(blurred, freqs.transpose(-1, -2)).to(q.dtype)
    return out
