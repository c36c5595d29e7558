"""Combining the SEG prediction with the guided one (paper eq. 9).

``cond_seg`` is the conditional prediction made with blurred self-attention queries.  SEG adds
``seg_scale * (cond - cond_seg)`` on top of whatever CFG produced, so with CFG off it reduces to
``cond + s * (cond - cond_seg)``.  Being linear, it holds in x0 space (k-diffusion denoisers) and in
eps space (DDIM/PLMS/UniPC) alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_seg(denoised: torch.Tensor, cond: torch.Tensor, cond_seg: torch.Tensor, scale: float) -> torch.Tensor:
    """``denoised + scale * (cond - cond_seg)``, computed without changing ``denoised`` in place."""
    return denoised + scale * (cond - cond_seg)


def cfg_with_seg(
    uncond: torch.Tensor, cond: torch.Tensor, cond_seg: torch.Tensor, cfg_scale: float, seg_scale: float
) -> torch.Tensor:
    """The paper's guided prediction ``uncond + cfg (cond - uncond) + s (cond - cond_seg)``."""
    return apply_seg(uncond + cfg_scale * (cond - uncond), cond, cond_seg, seg_scale)


def composable_weights(conds_list: Sequence[Sequence[tuple[int, float]]], n_rows: int) -> torch.Tensor:
    """Matrix W (images x cond rows) of AND-prompt weights: image i uses rows ``conds_list[i]``."""
    weights = torch.zeros(len(conds_list), n_rows, dtype=torch.float64)
    for image, pairs in enumerate(conds_list):
        for row, weight in pairs:
            if not 0 <= row < n_rows:
                raise ValueError(f"cond row {row} of image {image} is outside 0..{n_rows - 1}")
            weights[image, row] += float(weight)
    return weights


def apply_seg_composable(
    denoised: torch.Tensor,
    cond: torch.Tensor,
    cond_seg: torch.Tensor,
    conds_list: Sequence[Sequence[tuple[int, float]]],
    scale: float,
) -> torch.Tensor:
    """Per image ``denoised_i + scale * sum_w w (cond_row - seg_row)`` for composable prompts.

    ``cond``/``cond_seg`` hold one row per sub-prompt; ``denoised`` one row per image.  The AND
    weights are the ones CFG used for the same rows, so each sub-prompt gets SEG in proportion.
    """
    if len(conds_list) != denoised.shape[0]:
        raise ValueError(f"{len(conds_list)} AND-prompt lists for {denoised.shape[0]} images")
    work = torch.promote_types(denoised.dtype, torch.float32)  # half precision sums in float32, float64 stays
    weights = composable_weights(conds_list, cond.shape[0]).to(device=denoised.device, dtype=work)
    difference = (cond - cond_seg).to(work).flatten(1)
    correction = (weights @ difference).reshape(denoised.shape)
    return denoised + (scale * correction).to(denoised.dtype)
