"""SD3 / SD3.5 MMDiT: ``joint_blocks``, no RoPE.

Read at A1111 ``modules/models/sd3/mmdit.py`` (82a973c), Forge 2.x ``backend/nn/mmditx.py`` (dfdcbab)
and reForge ``ldm_patched/ldm/modules/diffusionmodules/mmdit.py`` (3b56b26); Neo has no SD3.

The image stream's ``joint_blocks[i].x_block.attn.ln_q`` output ``(B, L_img, heads, D)`` is what enters
attention (no RoPE; an ``nn.Identity`` in A1111's SD3 Medium, whose hooks still fire), so it is blurred
directly.  SD3.5's image-only second attention (``x_block.attn2``, blocks 0-12 of Medium) is blurred in
the chosen blocks too: its queries are image queries of that block as well.  The grid comes from the
latent and the query count: every host pads odd sides except Forge 2.x's MMDiTX and A1111's SD3
(``H // 2``), and the image query count tells which.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.queries import Rows, blur_image_queries

from .base import CallFacts, QNormFamily, SkipCallback, has_blocks, skipped

PATCH = 2  # SD3's x_embedder is a stride-2 convolution on every host


class _Latent(CallFacts):
    """The latent's ``(H, W)`` of one model call."""

    def reset(self) -> None:
        super().reset()
        self.shape: tuple[int, int] | None = None

    def on_model(self, _model: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        self.shape = tuple(x.shape[-2:]) if torch.is_tensor(x) and x.dim() == 4 else None

    def grid(self, n_image: int) -> tuple[int, int] | None:
        """The grid (padded or not) that holds ``n_image`` tokens, or None."""
        if self.shape is None:
            return None
        for pad in (True, False):
            grid = patch_grid(*self.shape, PATCH, pad=pad)
            if grid[0] * grid[1] == n_image:
                return grid
        return None


def _hook(layer: DitLayer, latent: _Latent, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    def hook(_norm: nn.Module, _args: tuple, q: torch.Tensor) -> Any:
        grid = latent.grid(q.shape[1]) if q.dim() == 4 else None
        if grid is None:
            return skipped(on_skip, layer, q.shape[1], None)
        return blur_image_queries(q, slice(0, q.shape[1]), grid, sigma, "blhd", rows)

    return hook


class MMDiTFamily(QNormFamily):
    name, title = "mmdit", "SD3 / SD3.5"
    kinds = ("joint",)
    released: ClassVar[dict[str, dict[str, int]]] = {
        "sd3": {"joint": 24},
        "sd3.5-medium": {"joint": 24},
        "sd3.5-large": {"joint": 38},
    }
    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {"joint": ("x_block.attn.ln_q", "x_block.attn2.ln_q")}
    # Stability's skip-layer guidance for SD3.5 Medium uses layers 7, 8, 9 (``Stability-AI/sd3.5``
    # ``sd3_infer.py:509-518``); ComfyUI's ``SkipLayerGuidanceSD3`` defaults to "7, 8, 9"; diffusers' SLG and SEG
    # guiders recommend ``[7, 8, 9]`` for SD3.5 Medium (its SEG guider itself has no default).  The same is used
    # for SD3 Medium and SD3.5 Large, untuned.
    default = "j7-9"
    default_source = (
        "Stability's skip-layer guidance for SD3.5 Medium (sd3_infer.py), ComfyUI's SkipLayerGuidanceSD3, "
        "diffusers' SLG/SEG guider docstrings: layers 7, 8, 9"
    )
    facts = _Latent
    hook = staticmethod(_hook)

    def matches(self, model: Any) -> bool:
        return has_blocks(model, "joint_blocks")


MMDIT = MMDiTFamily()
