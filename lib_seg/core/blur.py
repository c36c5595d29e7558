"""Gaussian blur of attention queries over their 2D token grid (SEG, arXiv 2408.00760).

The official SEG-SDXL code blurs ``query`` with a dense k x k depthwise convolution after reflect
padding.  A reflect-padded 1D Gaussian is a fixed linear map of one axis, so we build that map once
as a ``side x side`` matrix (cached per side, sigma, device and dtype) and apply it along the height
and then the width of the grid: two small matrix products, exactly the official result for square
maps, with no padding copies and no permutes into channels-first layout.

Semantics kept from the paper's code:
* kernel size ``k = ceil(6 sigma) + 1`` made odd, capped by the side (``side + 1`` for an even side,
  ``side`` for an odd one) so that reflect padding of ``k // 2`` stays valid;
* weights sampled at integer offsets ``-(k-1)/2 .. (k-1)/2`` and normalised to sum 1;
* ``sigma > 9999`` (or ``inf``) is infinite blur: every query becomes its per-channel spatial mean.

Difference on purpose: the official code caps both axes by the width and only takes square maps;
here each axis is capped by its own side, so non-square images (1024x512 SDXL) work.
"""

from __future__ import annotations

import functools
import math

import torch

INFINITE_SIGMA_THRESHOLD = 9999.0


def is_infinite_sigma(sigma: float) -> bool:
    """The official code treats any sigma above 9999 as 'blur to the mean'."""
    return sigma > INFINITE_SIGMA_THRESHOLD


def check_sigma(sigma: float) -> float:
    """Return sigma as float, or raise: the blur is undefined for sigma <= 0 and NaN."""
    sigma = float(sigma)
    if math.isnan(sigma) or sigma <= 0.0:
        raise ValueError(f"blur sigma must be > 0 (or inf for infinite blur), got {sigma}")
    return sigma


def kernel_size(sigma: float, side: int) -> int:
    """Odd kernel size ``ceil(6 sigma) + 1`` (made odd), capped so reflect padding fits ``side``."""
    six_sigma = math.ceil(6.0 * check_sigma(sigma))
    size = six_sigma + 1 - six_sigma % 2
    cap = side + 1 if side % 2 == 0 else side
    return min(size, cap)


def gaussian_kernel_1d(sigma: float, size: int) -> torch.Tensor:
    """Normalised float64 Gaussian weights at integer offsets centred on zero."""
    half = (size - 1) / 2.0
    offsets = torch.linspace(-half, half, size, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _reflect(index: torch.Tensor, side: int) -> torch.Tensor:
    """Reflect (not edge-repeat) out-of-range indices, as torch's 'reflect' padding does."""
    index = torch.where(index < 0, -index, index)
    return torch.where(index >= side, 2 * (side - 1) - index, index)


@functools.lru_cache(maxsize=16)
def _blur_operator_f64(side: int, sigma: float) -> torch.Tensor:
    size = kernel_size(sigma, side)
    weights = gaussian_kernel_1d(sigma, size)
    pad = size // 2
    rows = torch.arange(side).unsqueeze(1)
    taps = torch.arange(-pad, pad + 1).unsqueeze(0)
    columns = _reflect(rows + taps, side) if side > 1 else torch.zeros_like(rows + taps)
    operator = torch.zeros(side, side, dtype=torch.float64)
    return operator.scatter_add_(1, columns, weights.expand(side, size).clone())


@functools.lru_cache(maxsize=64)
def _blur_operator_cached(side: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _blur_operator_f64(side, sigma).to(device=device, dtype=dtype)


def blur_operator(side: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``side x side`` matrix ``M`` with ``M @ x`` = reflect-padded 1D Gaussian blur of ``x``."""
    if side < 1:
        raise ValueError(f"token grid side must be >= 1, got {side}")
    return _blur_operator_cached(int(side), check_sigma(sigma), torch.device(device or "cpu"), dtype)


KRONECKER_MAX_TOKENS = 1024


@functools.lru_cache(maxsize=16)
def _grid_operator_f64(height: int, width: int, sigma: float) -> torch.Tensor:
    return torch.kron(_blur_operator_f64(height, sigma), _blur_operator_f64(width, sigma))


@functools.lru_cache(maxsize=32)
def _grid_operator_cached(height: int, width: int, sigma: float, device: torch.device, dtype: torch.dtype):
    return _grid_operator_f64(height, width, sigma).to(device=device, dtype=dtype)


def grid_operator(height: int, width: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """``N x N`` matrix (N = height * width) blurring row-major tokens over the whole grid at once:
    the Kronecker product of the two axis operators."""
    if height < 1 or width < 1:
        raise ValueError(f"token grid sides must be >= 1, got {height}x{width}")
    return _grid_operator_cached(int(height), int(width), check_sigma(sigma), torch.device(device or "cpu"), dtype)


def use_grid_operator(q: torch.Tensor, height: int, width: int) -> bool:
    """One ``N x N`` product instead of two axis products: on GPUs, for grids of up to 1024 tokens.

    A SEG step blurs up to 70 layers; on a GPU each small product costs mostly its launch, so one
    kernel beats two while the extra ``N / (h + w)`` arithmetic is free (32x32 SDXL maps).  On CPUs
    the arithmetic is what counts, and the axis products win at every size.
    """
    return q.device.type != "cpu" and height * width <= KRONECKER_MAX_TOKENS


def blur_queries(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur queries ``q`` of shape (B, N, C), tokens row-major over a height x width grid.

    Returns a tensor of the same shape and dtype.  Half-precision input is accumulated in float32
    (explicitly on the CPU, by the matrix units on GPUs), so the error is a rounding or two, not k
    accumulated fp16 additions.
    """
    sigma = check_sigma(sigma)
    if q.dim() != 3 or q.shape[1] != height * width:
        raise ValueError(
            f"queries of shape {tuple(q.shape)} do not fit a {height}x{width} token grid "
            f"(expected (B, {height * width}, C))"
        )
    # CPUs: blur half precision in float32.  CUDA/MPS matrix units already accumulate fp16/bf16
    # products in float32, so there we skip two full-size conversion copies per layer.
    upcast = q.dtype not in (torch.float32, torch.float64) and q.device.type == "cpu"
    work = q.float() if upcast else q
    if is_infinite_sigma(sigma):
        accumulate = torch.float32 if work.dtype in (torch.float16, torch.bfloat16) else None
        blurred = work.mean(dim=1, keepdim=True, dtype=accumulate)
        return blurred.to(q.dtype).expand_as(q).contiguous()
    if use_grid_operator(work, height, width):
        return torch.matmul(grid_operator(height, width, sigma, work.device, work.dtype), work).to(q.dtype)
    batch, _, channels = work.shape
    grid = work.reshape(batch, height, width * channels)
    rows = blur_operator(height, sigma, work.device, work.dtype)
    grid = torch.matmul(rows, grid).reshape(batch, height, width, channels)
    columns = blur_operator(width, sigma, work.device, work.dtype)
    grid = torch.matmul(columns, grid)
    return grid.reshape(batch, height * width, channels).to(q.dtype)
