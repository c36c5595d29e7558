"""SEG on Qwen-Image / Qwen-Image-Edit: what only Qwen-Image has; its exactness with MSRoPE's centred ids and
reference tokens, only the image queries changing, batched rows, prefix reuse, the patch read from ``img_in`` and
the grids its ids or query count contradict are run by tests/dit/test_family_table.py (``qwen``).

The model is tests/support/dit_qwen.py (Neo 2.26's ``backend/nn/qwen.py`` structure: 5D latent, 2x2 patches
padded circularly, ``norm_q`` before the joint RoPE, reference images after the image, Nunchaku's CPU offload).
"""

from __future__ import annotations

import torch

from lib_seg.core.blocks import DitLayer, resolve_layers
from lib_seg.dit.families.qwen import OFFLOADED, QWEN_IMAGE
from lib_seg.dit.hooks import available_layers, dit_family
from tests.support.dit_cases import QWEN_CASE, Setup, seg, slow
from tests.support.dit_qwen import TinyQwen
from tests.support.tolerance import assert_network_close
from tests.support.unet import SpatialTransformer


def test_blocks_run_as_offloaded_copies_are_reported_not_silently_skipped():
    """Nunchaku's CPU offload runs buffer copies of the blocks: the hooks on j1, j2 never fire, which is
    reported; j0 (kept on the GPU) is still blurred exactly."""
    model, inputs = QWEN_CASE.make(Setup((6, 7)))
    model.offload(on_gpu=1)
    chosen, skips = resolve_layers("all", available_layers(model)), []
    got = seg(QWEN_CASE, model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert [s[0] for s in skips] == [DitLayer("joint", 1), DitLayer("joint", 2)]
    assert all(s[3] == OFFLOADED for s in skips)
    assert_network_close(got, slow(QWEN_CASE, model, inputs, chosen[:1], 2.0))


def test_what_only_looks_like_qwen_image_is_not_claimed():
    diffusers_flux = TinyQwen()  # transformer_blocks beside single-stream blocks: diffusers' Flux layout
    diffusers_flux.single_transformer_blocks = torch.nn.ModuleList()
    assert not QWEN_IMAGE.matches(diffusers_flux)
    unet_part = SpatialTransformer(8, 2, 4, depth=1, context_dim=6, use_linear=True, groups=2)  # has transformer_blocks
    assert not QWEN_IMAGE.matches(unet_part) and dit_family(unet_part) is None
