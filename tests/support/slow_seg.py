"""An independent, slow SEG reference for tests: no hooks, no ``blur_queries``.

A deep copy of the UNet gets the chosen ``attn1`` modules' ``forward`` replaced by plain Python that
projects q, blurs it with the dense float64 reference of ``tests/test_blur.py`` on the grid its
SpatialTransformer saw, and finishes the attention itself.
"""

from __future__ import annotations

import copy
import types

from lib_seg.layers import LayerKey
from tests.test_blur import reference_blur

from .unet import CrossAttention, SpatialTransformer, UNetModel, attention


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
