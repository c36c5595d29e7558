"""When SEG is active: a window over sampling progress.

Progress of denoiser call ``step`` (counting 0 .. total-1) is ``step / total``: the first call is at
0, and with ``end = 1`` every call is inside.  The window is inclusive at both ends, so ``start = end
= 0`` applies SEG to the first step only.  Hosts that count steps lag (A1111's
``state.sampling_step``) or do not count at all (Forge's post-CFG functions see only sigma), so each
adapter feeds either its own denoiser counter or the position of sigma in the sampler's schedule.
"""

from __future__ import annotations

import math

import torch


def check_window(start: float, end: float) -> tuple[float, float]:
    """Validate a window; errors name the field and the allowed range."""
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"SEG {name} must be a number in [0, 1], got {value!r}")
    if start > end:
        raise ValueError(f"SEG start ({start}) must not be after SEG end ({end})")
    return float(start), float(end)


def progress(step: int, total: int) -> float:
    """Fraction of sampling done before denoiser call ``step`` of ``total`` (clamped to [0, 1])."""
    if total <= 0:
        return 0.0
    return min(max(step / total, 0.0), 1.0)


def progress_from_sigma(sigma: float, schedule: torch.Tensor) -> float:
    """Progress of the step whose noise level is nearest ``sigma`` in a sampler's sigma schedule.

    ``schedule`` is the sampler's descending sigmas including the final one (``steps + 1`` values), so
    step ``i`` has progress ``i / steps`` just like :func:`progress`.  Higher-order samplers evaluate
    between two schedule entries; the nearest entry is the step they belong to.
    """
    values = schedule.detach().flatten().double().cpu()
    steps = values.numel() - 1
    if steps <= 0:
        return 0.0
    index = int(torch.argmin((values[:-1] - float(sigma)).abs()))
    return progress(index, steps)


def in_window(fraction: float, start: float, end: float) -> bool:
    """Inclusive window test (a small tolerance absorbs float division)."""
    eps = 1e-9
    return start - eps <= fraction <= end + eps
