"""Deep Shrink (Kohya HRFix) with SEG on the Forge family: every layer is blurred on its true grid.

Deep Shrink resizes the map after an input block, so from there on the token grids are no level of
the latent's ceil-halving chain.  reForge tells the exact grid (``activations_shape``); on classic
and new Forge SEG's block modifier records it (``lib_seg.forge.patches.record_block_grid``).  The
host imitation is tests/support/forge_host.py (``deep_shrink`` follows the built-in's patches).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from lib_seg.core import blur
from lib_seg.core.layers import resolve_layers
from lib_seg.core.params import SegParams
from lib_seg.forge import adapter as forge
from lib_seg.forge.patches import BLOCK_GRID
from tests.support import forge_host as host
from tests.support import slow_seg
from tests.support.tolerance import assert_network_close, max_abs
from tests.support.unet import TINY_SDXL, SpatialTransformer, build_unet

F64 = torch.float64
SHRUNK_BLOCK = 1  # the output of input block 1 (after the first attention level) is shrunk


SIGMAS = torch.tensor([2.5, 0.0], dtype=F64)


def shrunk_processing(kind, unet, factor):
    p = host.make_processing(kind, unet)
    p.sd_model.forge_objects.unet = host.deep_shrink(p.sd_model.forge_objects.unet, SHRUNK_BLOCK, factor)
    return p


def sample(p, inputs):
    x, cond, uncond = inputs
    return p.sampler.sample(x, SIGMAS, cond, uncond, 7.0)


def spatial_transformer_grids(unet):
    """(block, grid) of every SpatialTransformer call, seen from its real input."""
    seen, handles = [], []
    for name, module in unet.named_modules():
        if isinstance(module, SpatialTransformer):
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: seen.append((n, a[0].shape[-2:]))))
    return seen, handles


@pytest.mark.parametrize("kind", host.KINDS)
@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("height,width", [(13, 9), (16, 16), (9, 14)])
def test_every_blurred_layer_gets_its_true_grid(sd1, monkeypatch, caplog, kind, factor, height, width):
    host.install(monkeypatch, kind)
    blurred = []
    original_blur = blur.blur_queries

    def recording_blur(q, grid_height, grid_width, sigma):
        blurred.append((grid_height, grid_width))
        return original_blur(q, grid_height, grid_width, sigma)

    monkeypatch.setattr(blur, "blur_queries", recording_blur)
    p = shrunk_processing(kind, sd1, factor)
    assert forge.patch_unet(p, SegParams(enabled=True, blur_sigma=3.0, layers="all"), batch_rows=False)
    seen, handles = spatial_transformer_grids(sd1)
    try:
        with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
            sample(p, host.make_inputs(sd1.config, height=height, width=width))
    finally:
        for handle in handles:
            handle.remove()
    assert "unblurred" not in caplog.text
    seg_pass = [tuple(grid) for _, grid in seen[-len(blurred) :]]  # the SEG pass runs last in the step
    assert blurred == seg_pass
    chain = {(height, width), ((height + 1) // 2, (width + 1) // 2)}
    assert set(blurred) - chain, "Deep Shrink made grids outside the latent's chain"  # the case that matters


def slow_expected(unet, patcher, inputs, baseline, spec, sigma, scale, sigma_t=2.5):
    """baseline + s (cond - cond_seg) with the same Deep Shrink patches, SEG on a UNet copy with the
    dense reference blur on the grid each SpatialTransformer really got."""
    x, cond, _ = inputs
    keys = list(resolve_layers(spec, forge.available_layers(unet)))
    t = torch.full((x.shape[0],), sigma_t, dtype=x.dtype)
    options = {"patches": patcher.model_options["transformer_options"]["patches"]}
    plain = host.BaseModel(unet).apply_model(x, t, transformer_options=dict(options), **cond[0]["model_conds"])
    seg_unet = slow_seg.seg_unet(unet, keys, sigma)
    seg = host.BaseModel(seg_unet).apply_model(x, t, transformer_options=dict(options), **cond[0]["model_conds"])
    return baseline + scale * (plain - seg)


@pytest.mark.parametrize("kind", host.KINDS)
@pytest.mark.parametrize("batch_rows", [False, True])
@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_deep_shrink_with_finite_sigma_matches_the_slow_path(sd1, monkeypatch, kind, batch_rows, model):
    host.install(monkeypatch, kind)
    unet = sd1 if model == "sd1" else build_unet(TINY_SDXL, seed=2, dtype=F64)
    inputs = host.make_inputs(unet.config, height=13, width=9)
    (baseline,) = sample(shrunk_processing(kind, unet, 2.0), inputs)
    p = shrunk_processing(kind, unet, 2.0)
    shrunk_patcher = p.sd_model.forge_objects.unet
    forge.patch_unet(p, SegParams(enabled=True, blur_sigma=3.0, layers="all"), batch_rows=batch_rows)
    (out,) = sample(p, inputs)
    expected = slow_expected(unet, shrunk_patcher, inputs, baseline, "all", 3.0, 3.0)
    assert_network_close(out, expected)
    # the layers really were blurred: leaving them alone (what SEG did before) gives the baseline
    assert max_abs(out - baseline) > 1e-3 * max_abs(baseline)


def test_block_grid_recorder_is_installed_once_and_removed_with_seg(sd1, monkeypatch):
    host.install(monkeypatch, "forge")
    p = shrunk_processing("forge", sd1, 2.0)
    params = SegParams(enabled=True, blur_sigma=3.0)
    forge.patch_unet(p, params)
    forge.patch_unet(p, params)  # the hires hook calls it twice without a host reset
    options = p.sd_model.forge_objects.unet.model_options["transformer_options"]
    assert options["block_modifiers"] == [forge.record_block_grid]
    assert len(options["patches"]["input_block_patch"]) == 1  # Deep Shrink's own patches untouched
    forge.patch_unet(p, SegParams(enabled=False))
    assert p.sd_model.forge_objects.unet.model_options["transformer_options"]["block_modifiers"] == []


def test_token_grid_prefers_the_recorded_block_grid():
    recorded = {BLOCK_GRID: (5, 3), "original_shape": [1, 4, 13, 9]}
    assert forge.token_grid(15, recorded) == (5, 3)
    assert forge.token_grid(35, recorded) is None  # a recorded grid that does not fit: no chain guess
    assert forge.token_grid(35, {"original_shape": [1, 4, 13, 9]}) == (7, 5)
    assert math.prod(forge.token_grid(288, {"activations_shape": [1, 8, 16, 18], **recorded})) == 288
