"""Forge Neo specifics: its predictors (SD1/SDXL eps, v-prediction, zero-terminal-SNR, rectified flow) and
its memory estimate deciding the batched SEG rows.

Neo runs every prediction type through ``KModel.apply_model``: ``calculate_input`` scales the latent in,
``calculate_denoised`` turns the network's output F into x0 = a(sigma) x + b(sigma) F, an affine map
with the same coefficients for the cond, uncond and SEG calls of one step (tests/support/forge_host.py
``NeoKModel``, after de2193d ``backend/modules/k_prediction.py``).  The guidance weights sum to one
(uncond 1 - cfg, cond cfg + s, SEG -s), so guiding the x0 predictions, as the Forge family's post-CFG
function does, is exactly guiding the network's own outputs F and converting once: the tests check the
adapter against that F-space reference, computed from plain UNet calls and the dense-blur slow UNet.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from lib_seg.core.layers import resolve_layers
from lib_seg.core.params import SegParams
from lib_seg.forge import adapter as forge
from lib_seg.forge import host as forge_host
from tests.support import forge_host as host
from tests.support import slow_seg
from tests.support.tolerance import assert_network_close
from tests.support.unet import TINY_SDXL

F64 = torch.float64
PREDICTIONS = {  # prediction type -> the step's sigma (flow sigmas lie in (0, 1))
    "epsilon": 2.5,
    "v_prediction": 2.5,
    "v_prediction_ztsnr": 900.0,  # zero-terminal-SNR schedules start at a very large sigma
    "const": 0.6,  # rectified flow
}


def _inputs(config, seed=0):
    return host.make_inputs(config, height=11, width=9, seed=seed)


def _model(unet, prediction: str) -> host.NeoKModel:
    return host.NeoKModel(unet, prediction.removesuffix("_ztsnr"), activations_shape=False)


def _f_space_reference(unet, prediction, inputs, sigma_t, cfg, scale, blur_sigma, spec):
    """uncond + cfg (cond - uncond) + s (cond - cond_seg) on the network's outputs, converted to x0 once."""
    x, cond, uncond = inputs
    model = _model(unet, prediction)
    t = torch.full((x.shape[0],), sigma_t, dtype=F64)
    timestep = t * 1000.0 if model.prediction == "const" else t.log() * 100.0
    keys = list(resolve_layers(spec, forge.available_layers(unet)))
    seg_unet = slow_seg.seg_unet(unet, keys, blur_sigma)

    def output(net, entry):
        conds = entry[0]["model_conds"]
        return net(model.calculate_input(t, x), timestep, conds["c_crossattn"], conds["y"])

    f_cond, f_seg = output(unet, cond), output(seg_unet, cond)
    f_uncond = output(unet, uncond) if cfg != 1.0 else f_cond
    guided = f_uncond + cfg * (f_cond - f_uncond) + scale * (f_cond - f_seg)
    return model.calculate_denoised(t, guided, x)


@pytest.mark.parametrize("batch_rows", [True, False], ids=["batched", "separate"])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_seg_is_guidance_in_the_network_output_space_for_every_predictor(
    monkeypatch, sdxl, prediction, cfg, batch_rows
):
    host.install(monkeypatch, "neo")
    assert forge.host_kind() == "neo"
    inputs, sigma_t = _inputs(TINY_SDXL), PREDICTIONS[prediction]
    p = host.make_processing("neo", sdxl, model=_model(sdxl, prediction))
    forge.patch_unet(p, SegParams(enabled=True, scale=3.0, blur_sigma=2.0, layers="m0"), batch_rows=batch_rows)
    x, cond, uncond = inputs
    sigmas = torch.tensor([sigma_t, 0.0], dtype=F64)
    (out,) = p.sampler.sample(x, sigmas, cond, uncond, cfg)
    assert_network_close(out, _f_space_reference(sdxl, prediction, inputs, sigma_t, cfg, 3.0, 2.0, "m0"))
    rows = p.sd_model.forge_objects.unet.model.rows
    main = 2 if cfg == 1.0 else 4  # 2 images; CFG 1 skips the uncond
    assert rows == ([main + 2] if batch_rows else [main, 2])  # the SEG rows ride in the main call or follow it


def test_neo_memory_estimate_decides_the_batched_rows(monkeypatch, sdxl):
    """Neo's KModel estimate (ComfyUI v0.3.64: area * dtype_size * 0.01 * factor MiB with flash attention)
    for an SDXL 1024 px step with CFG (2 rows) and its SEG row (3 rows), against the free memory."""
    host.install(monkeypatch, "neo")
    model = host.NeoKModel(sdxl, memory_usage_factor=1.0, dtype_size=2, activations_shape=False)
    shape = (3, 4, 128, 128)
    required = 3 * 128 * 128 * 2 * 0.01 * 1024 * 1024  # 983 MiB
    assert math.isclose(model.memory_required(list(shape)), required)
    cpu = torch.device("cpu")
    monkeypatch.setattr(host.get_free_memory, "free", int(1.5 * required) + 1)
    assert forge_host.fits_in_memory("neo", model, shape, cpu)
    monkeypatch.setattr(host.get_free_memory, "free", int(1.5 * required) - 1)  # 1.5x margin (host.py)
    assert not forge_host.fits_in_memory("neo", model, shape, cpu)


def test_neo_falls_back_to_the_separate_call_when_the_rows_do_not_fit(monkeypatch, sdxl):
    host.install(monkeypatch, "neo")

    def tight(model):
        monkeypatch.setattr(host.get_free_memory, "free", int(1.5 * model.memory_required([4, 4, 11, 9])))

    assert _neo_step(sdxl, "v_prediction", tight) == [4, 2]  # 6 rows did not fit: main call, then SEG's own


@pytest.mark.parametrize("extra", ["concat_latent", "ref_latents"])
def test_neo_global_extra_latents_keep_the_seg_rows_out_of_the_main_call(monkeypatch, sdxl, extra):
    """Neo's Wan and Anima size ``dynamic_args.concat_latent`` / ``ref_latents`` for the host's own 2-row
    batch only (de2193d ``backend/nn/wan.py:392-397``, ``anima.py:462-466``): while one is set, SEG makes
    its separate call, with the same result."""
    import types

    host.install(monkeypatch, "neo")
    inputs = _inputs(TINY_SDXL)
    x, cond, uncond = inputs
    dynamic = types.SimpleNamespace(concat_latent=None, ref_latents=[])
    monkeypatch.setitem(sys.modules, "backend.args", types.SimpleNamespace(dynamic_args=dynamic))
    setattr(dynamic, extra, torch.zeros(1, 4, 11, 9, dtype=F64) if extra == "concat_latent" else [torch.zeros(1)])
    model = _model(sdxl, "epsilon")
    p = host.make_processing("neo", sdxl, model=model)
    forge.patch_unet(p, SegParams(enabled=True, scale=3.0, blur_sigma=2.0, layers="m0"))
    (out,) = p.sampler.sample(x, torch.tensor([2.5, 0.0], dtype=F64), cond, uncond, 5.0)
    assert model.rows == [4, 2]
    assert_network_close(out, _f_space_reference(sdxl, "epsilon", inputs, 2.5, 5.0, 3.0, 2.0, "m0"))
    setattr(dynamic, extra, None if extra == "concat_latent" else [])
    model.rows.clear()
    p.reset_forge_objects()  # the next sampling pass, as the host starts it
    forge.patch_unet(p, SegParams(enabled=True, scale=3.0, blur_sigma=2.0, layers="m0"))
    p.sampler.sample(x, torch.tensor([2.5, 0.0], dtype=F64), cond, uncond, 5.0)
    assert model.rows == [6]  # cleared: the rows ride in the main call again


def _neo_step(sdxl, prediction: str = "epsilon", setup=lambda model: None):
    """One Neo sampling step with SEG (scale 3, sigma 2, ``m0``) at CFG 5; ``setup(model)`` runs after the
    adapter is installed.  Returns the rows of every model call, after checking the image against the
    f-space reference."""
    inputs = _inputs(TINY_SDXL)
    x, cond, uncond = inputs
    model = _model(sdxl, prediction)
    p = host.make_processing("neo", sdxl, model=model)
    forge.patch_unet(p, SegParams(enabled=True, scale=3.0, blur_sigma=2.0, layers="m0"))
    setup(model)
    (out,) = p.sampler.sample(x, torch.tensor([2.5, 0.0], dtype=F64), cond, uncond, 5.0)
    assert_network_close(out, _f_space_reference(sdxl, prediction, inputs, 2.5, 5.0, 3.0, 2.0, "m0"))
    return model.rows


def test_neo_batch_cond_uncond_off_keeps_the_seg_rows_out_of_the_main_call(monkeypatch, sdxl):
    """Neo 2.29's "Batch Cond/Uncond" option off (``modules.shared.batch_cond_uncond``, youlijie/
    sd-webui-forge-classic b3b8a1e5 ``modules/shared.py``; ``can_concat_cond`` then refuses): SEG makes its
    separate call, with the same result."""
    import types

    host.install(monkeypatch, "neo")
    monkeypatch.setitem(sys.modules, "modules.shared", types.SimpleNamespace(batch_cond_uncond=False))
    assert _neo_step(sdxl) == [4, 2]


def test_neo_never_oom_streaming_prefers_the_batched_rows(monkeypatch, sdxl):
    """With Neo 2.29's "Never OOM Integrated" streaming the UNet (``memory_management.UNET_ALWAYS_OFFLOAD``),
    a separate call would stream every weight again: the SEG rows ride in the main call even where the
    estimate says no (room for the host's 4 rows, not for 6), and the result is the same."""
    host.install(monkeypatch, "neo")

    def streaming(model):
        monkeypatch.setattr(host.get_free_memory, "free", int(1.5 * model.memory_required([4, 4, 11, 9])))
        monkeypatch.setattr(sys.modules["backend.memory_management"], "UNET_ALWAYS_OFFLOAD", True, raising=False)

    assert _neo_step(sdxl, setup=streaming) == [6]
