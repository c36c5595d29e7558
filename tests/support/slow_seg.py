"""An independent, slow SEG reference for tests: no hooks, no ``blur_queries``.

UNet (:func:`seg_unet`): a deep copy of the UNet gets the chosen ``attn1`` modules' ``forward``
replaced by plain Python that projects q, blurs it with the dense float64 reference of
``tests/core/test_blur.py`` on the grid its SpatialTransformer saw, and finishes the attention itself.

DiT (:func:`blurred_logits`, and :func:`blur_frame_rows` for tests/support/dit_cases.py): no query is touched
at all; the chosen blocks of a tests/support/dit_models.py model compute attention explicitly and their
pre-softmax logits get the image rows blurred (paper Prop. 3.1 says this equals blurring the image queries).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from lib_seg.core.layers import LayerKey
from tests.core.test_blur import reference_blur

from .dit_blocks import Hooks
from .unet import CrossAttention, SpatialTransformer, UNetModel, attention


def blur_logit_rows(image: slice, grid, sigma: float, rows=None) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(logits: torch.Tensor) -> torch.Tensor:  # (B, heads, L, L)
        chosen = list(range(logits.shape[0])) if rows is None else list(rows)
        part = logits[chosen][:, :, image]  # (R, heads, N, L): image query rows, all key columns
        tokens = part.transpose(1, 2).reshape(len(chosen), part.shape[2], -1)
        blurred = reference_blur(tokens, *grid, sigma).reshape(part.transpose(1, 2).shape).transpose(1, 2)
        out = logits.clone()
        out[torch.tensor(chosen), :, image] = blurred
        return out

    return hook


def blur_frame_rows(start: int, grid, frames: int, sigma: float, rows=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`blur_logit_rows` for ``frames`` consecutive ``grid`` frames from query row ``start`` (a video), each
    frame's rows over its own grid (no temporal blur)."""
    n = grid[0] * grid[1]
    per_frame = [blur_logit_rows(slice(start + f * n, start + (f + 1) * n), grid, sigma, rows) for f in range(frames)]

    def hook(logits: torch.Tensor) -> torch.Tensor:
        for frame in per_frame:  # disjoint query rows: one after the other is all of them at once
            logits = frame(logits)
        return logits

    return hook


def seg_unet(unet: UNetModel, layers: list[LayerKey], sigma: float) -> UNetModel:
    clone = copy.deepcopy(unet)
    grids: dict[int, tuple[int, int]] = {}
    for module in clone.modules():
        if isinstance(module, SpatialTransformer):
            original = module.forward

            def forward(self, x, context, transformer_options=None, _orig=original):
                grids[id(self)] = tuple(x.shape[-2:])
                return _orig(x, context, transformer_options)

            module.forward = types.MethodType(forward, module)
    for key in layers:
        prefix = "middle_block.1" if key.part == "middle" else f"{key.part}_blocks.{key.block}.1"
        st = clone.get_submodule(prefix)
        attn: CrossAttention = st.transformer_blocks[key.transformer].attn1

        def attn_forward(self, x, context=None, _st=st):
            h, w = grids[id(_st)]
            q = reference_blur(self.to_q(x), h, w, sigma).to(x.dtype)
            return self.to_out(attention(q, self.to_k(x), self.to_v(x), self.heads))

        attn.forward = types.MethodType(attn_forward, attn)
    return clone


@contextmanager
def blurred_logits(
    model: torch.nn.Module, layers: Iterable, sigma: float, n_txt: int, grid: tuple[int, int], rows=None
) -> Iterator[None]:
    """Within the block, ``model``'s chosen blocks blur the image rows of their logits: joint attention
    ``[txt | img]`` (``n_txt`` text tokens first) and SD3.5's image-only ``attn2``."""
    n_image = grid[0] * grid[1]
    blocks = [getattr(model, f"{layer.kind}_blocks")[layer.index] for layer in layers]
    try:
        for block in blocks:
            block.hooks = Hooks(
                logits=blur_logit_rows(slice(n_txt, n_txt + n_image), grid, sigma, rows),
                logits2=blur_logit_rows(slice(0, n_image), grid, sigma, rows),
            )
        yield
    finally:
        for block in blocks:
            block.hooks = Hooks()
