"""The ComfyUI node's execute path (lib_seg/comfy) on the tiny UNet and DiTs, through the imitation of ComfyUI's
``ModelPatcher`` / ``calc_cond_batch`` / ``model_management`` in tests/support/forge_host.py (kind ``"comfyui"``;
ComfyUI file and commit cited there).

References are independent of the attn1 patches and of lib_seg.dit: the UNet's SEG cond comes from forward hooks
on ``to_q`` (lib_seg.unet.hooks, A1111's mechanism), a DiT's from blurred image logit rows
(tests/support/slow_seg.py); float64 throughout, compared to the float64 network tolerance.
"""

from __future__ import annotations

import logging
import math
import sys

import pytest
import torch

from lib_seg.comfy import adapter, nodes
from lib_seg.core.blocks import resolve_layers
from lib_seg.core.layers import resolve_layers as resolve_unet_layers
from lib_seg.core.layers import unet_layers
from lib_seg.dit.hooks import available_layers
from lib_seg.unet.hooks import blurred_queries
from tests.support import forge_host as host
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.slow_seg import blurred_logits
from tests.support.tolerance import assert_network_close
from tests.support.unet import TINY_SD1, build_unet

F64 = torch.float64
SIGMAS = torch.tensor([6.0, 2.5, 0.8, 0.0], dtype=F64)
N_TXT = 5


@pytest.fixture(autouse=True)
def _comfyui(monkeypatch):
    host.install(monkeypatch, host.COMFYUI)
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def sd1():
    return build_unet(TINY_SD1, seed=1, dtype=F64)


@pytest.fixture(scope="module")
def flux():
    return randomize(TinyFlux(depth=2, single=3), seed=4).to(F64).eval()


def patcher(model) -> host.UnetPatcher:
    """A MODEL as a checkpoint loader returns it (ComfyUI's blocks report ``activations_shape``)."""
    model_class = host.BaseModel if hasattr(model, "input_blocks") else host.DitModel
    return host.UnetPatcher(model_class(model, activations_shape=True))


def unet_inputs(images=2, height=13, width=9, seed=0):
    g = torch.Generator().manual_seed(seed)

    def entry():
        return {"model_conds": {"c_crossattn": torch.randn(images, 5, TINY_SD1.context_dim, generator=g, dtype=F64)}}

    return torch.randn(images, 4, height, width, generator=g, dtype=F64), [entry()], [entry()]


def flux_inputs(images=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def entry():
        conds = {"c_crossattn": torch.randn(images, N_TXT, 12, generator=g, dtype=F64)}
        conds.update(y=torch.randn(images, 8, generator=g, dtype=F64), guidance=torch.full((images,), 3.5, dtype=F64))
        return {"model_conds": conds}

    return torch.randn(images, 4, 7, 9, generator=g, dtype=F64), [entry()], [entry()]


def sample(model_patcher, inputs, cfg=4.0, sigmas=SIGMAS):
    """ComfyUI's ``sampling_function`` at each sigma (x fixed, so steps compare one by one)."""
    x, cond, uncond = inputs
    samplers = sys.modules["comfy.samplers"]
    return [
        samplers.sampling_function(
            model_patcher.model, x, s.expand(x.shape[0]), uncond, cond, cfg, model_patcher.model_options
        )
        for s in sigmas[:-1]
    ]


def seg_node(model_patcher, batch_rows=True, **inputs):
    values = {
        "scale": 3.0,
        "blur_sigma": 2.0,
        "infinite_blur": False,
        "layers": "d1,m0",
        "start_percent": 0.0,
        "end_percent": 1.0,
    }
    values.update(inputs)
    return adapter.patch_model(model_patcher, adapter.settings(**values), batch_rows=batch_rows)


def unet_reference(model, inputs, spec, sigma, scale=3.0, cfg=4.0, sigmas=SIGMAS):
    """Plain guided prediction + s (cond - cond_seg), cond_seg by to_q hooks (no attn1 patch involved)."""
    x, cond, _ = inputs
    plain = sample(patcher(model), inputs, cfg, sigmas)
    keys = resolve_unet_layers(spec, unet_layers(model))
    out = []
    for denoised, s in zip(plain, sigmas[:-1], strict=True):
        t = s.expand(x.shape[0])
        base = host.BaseModel(model)
        cond_pred = base.apply_model(x, t, **cond[0]["model_conds"])
        with blurred_queries(model, keys, sigma):
            cond_seg = base.apply_model(x, t, **cond[0]["model_conds"])
        out.append(denoised + scale * (cond_pred - cond_seg))
    return out


def hooks_left(model) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def assert_all_close(actual, expected):
    for a, b in zip(actual, expected, strict=True):
        assert_network_close(a, b)


@pytest.mark.parametrize("batch_rows", [True, False], ids=["batched", "separate"])
@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg4", "cfg1"])
def test_unet_seg_equals_the_to_q_hook_reference(sd1, cfg, batch_rows):
    base = patcher(sd1)
    model = seg_node(base, batch_rows=batch_rows)
    out = sample(model, unet_inputs(), cfg)
    assert_all_close(out, unet_reference(sd1, unet_inputs(), "d1,m0", 2.0, cfg=cfg))
    main = 2 if cfg == 1.0 else 4  # CFG 1: ComfyUI skips the uncond pass, SEG needs only the cond
    assert model.model.rows == ([main + 2] * 3 if batch_rows else [main, 2] * 3)
    assert not hooks_left(sd1) and base.model_options == {"transformer_options": {}}


def test_out_of_memory_in_the_batched_call_falls_back_to_the_separate_call(sd1, monkeypatch, caplog):
    model = seg_node(patcher(sd1))
    host.small_card(monkeypatch, max_rows=4)
    out = sample(model, unet_inputs())
    assert model.model.rows == [6, 4, 2, 4, 2, 4, 2]  # one failed try, then main + SEG calls for the pass
    assert_all_close(out, unet_reference(sd1, unet_inputs(), "d1,m0", 2.0))
    assert "out of memory with the SEG rows" in caplog.text


@pytest.mark.parametrize("batch_rows", [True, False], ids=["batched", "separate"])
@pytest.mark.parametrize("cfg", [4.0, 1.0], ids=["cfg4", "cfg1"])
def test_flux_seg_equals_the_blurred_logits_reference(flux, cfg, batch_rows):
    inputs = flux_inputs()
    sigmas = torch.tensor([0.7, 0.0], dtype=F64)
    (baseline,) = sample(patcher(flux), inputs, cfg, sigmas)
    model = seg_node(patcher(flux), batch_rows=batch_rows, layers="d1,s0-1")
    (out,) = sample(model, inputs, cfg, sigmas)
    x, cond, _ = inputs
    dit, t = host.DitModel(flux), torch.full((2,), 0.7, dtype=F64)
    plain = dit.apply_model(x, t, **cond[0]["model_conds"])
    with blurred_logits(flux, resolve_layers("d1,s0-1", available_layers(flux)), 2.0, N_TXT, (4, 5)):
        cond_seg = dit.apply_model(x, t, **cond[0]["model_conds"])
    assert_network_close(out, baseline + 3.0 * (plain - cond_seg))
    main = 2 if cfg == 1.0 else 4
    assert model.model.rows == ([main + 2] if batch_rows else [main, 2])
    assert not hooks_left(flux)


def test_mmdit_infinite_blur_through_the_node(monkeypatch):
    model = randomize(TinyMMDiT(depth=3, pad=True), seed=4).to(F64).eval()
    g = torch.Generator().manual_seed(1)
    conds = {"c_crossattn": torch.randn(2, N_TXT, 12, generator=g, dtype=F64)}
    conds["y"] = torch.randn(2, 8, generator=g, dtype=F64)
    inputs = (torch.randn(2, 4, 7, 9, generator=g, dtype=F64), [{"model_conds": conds}], [{"model_conds": conds}])
    sigmas = torch.tensor([0.7, 0.0], dtype=F64)
    (baseline,) = sample(patcher(model), inputs, 4.0, sigmas)
    (out,) = sample(seg_node(patcher(model), layers="j0-1", infinite_blur=True), inputs, 4.0, sigmas)
    dit, t = host.DitModel(model), torch.full((2,), 0.7, dtype=F64)
    plain = dit.apply_model(inputs[0], t, **conds)
    with blurred_logits(model, resolve_layers("j0-1", available_layers(model)), math.inf, N_TXT, (4, 5)):
        cond_seg = dit.apply_model(inputs[0], t, **conds)
    assert_network_close(out, baseline + 3.0 * (plain - cond_seg))


def test_scale_zero_returns_the_model_itself_and_a_later_plain_prompt_is_bit_identical(sd1):
    base = patcher(sd1)
    before = sample(base, unet_inputs())
    assert seg_node(base, scale=0.0) is base
    sample(seg_node(base), unet_inputs())  # ComfyUI caches the loaded model: SEG must leave nothing on it
    after = sample(base, unet_inputs())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert base.model_options == {"transformer_options": {}} and not hooks_left(sd1)


def test_the_window_is_a_sigma_range_from_percent_to_sigma(sd1):
    """start/end percent go through the model's ``percent_to_sigma`` (ComfyUI's guidance nodes): sigma 6.0 and
    2.5 lie above the sigma at 40 % of this schedule, 0.8 below it."""
    sampling = host.BaseModel.model_sampling
    assert sampling.percent_to_sigma(0.4) < 2.5 and sampling.percent_to_sigma(0.4) > 0.8
    plain = sample(patcher(sd1), unet_inputs())
    model = seg_node(patcher(sd1), end_percent=0.4)
    out = sample(model, unet_inputs())
    reference = unet_reference(sd1, unet_inputs(), "d1,m0", 2.0)
    assert_all_close(out[:2], reference[:2])
    assert torch.equal(out[2], plain[2])
    assert model.model.rows == [6, 6, 4]  # no SEG rows outside the window


def test_two_nodes_on_different_layers_add_two_seg_terms(sd1):
    """SEG twice (stacked nodes): each adds its own term; the second makes its own call."""
    inputs = unet_inputs()
    model = seg_node(seg_node(patcher(sd1), layers="m0"), layers="u3", scale=2.0, infinite_blur=True)
    out = sample(model, inputs)
    first = unet_reference(sd1, inputs, "m0", 2.0)
    second = unet_reference(sd1, inputs, "u3", math.inf, scale=2.0)
    plain = sample(patcher(sd1), inputs)
    assert_all_close(out, [a + b - p for a, b, p in zip(first, second, plain, strict=True)])


def test_an_error_during_sampling_leaves_nothing_patched(sd1, flux):
    for model, layers, inputs in ((sd1, "m0", unet_inputs()), (flux, "d1", flux_inputs())):
        seg = seg_node(patcher(model), layers=layers, batch_rows=False)

        def interrupt(args):
            raise KeyboardInterrupt

        seg.set_model_sampler_post_cfg_function(interrupt)
        with pytest.raises(KeyboardInterrupt):
            sample(seg, inputs)
        assert not hooks_left(model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale": 25.0}, r"SEG scale must be a number in \[0, 20\]"),
        ({"blur_sigma": -1.0}, "SEG blur_sigma must be a number > 0"),
        ({"layers": "x9"}, "SEG layers"),
        ({"layers": "d99"}, r"SEG layers.*it has"),
        ({"start_percent": 1.5}, r"SEG start_percent must be a number in \[0, 1\]"),
        ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent .* must not be after end_percent"),
    ],
)
def test_bad_input_names_the_field(sd1, change, message):
    with pytest.raises(ValueError, match=message):
        seg_node(patcher(sd1), **change)


def test_an_unknown_model_is_returned_untouched_with_a_warning(caplog):
    class HunyuanVideo(torch.nn.Module):
        pass

    base = host.UnetPatcher(host.DitModel(HunyuanVideo()))
    with caplog.at_level(logging.WARNING):
        assert seg_node(base) is base
    assert "HunyuanVideo is a model SEG does not support yet" in caplog.text


def test_the_classic_node_runs_the_adapter_and_documents_every_input(sd1):
    required = nodes.SmoothedEnergyGuidance.INPUT_TYPES()["required"]
    assert list(required) == ["model", "scale", "blur_sigma", "infinite_blur", "layers", "start_percent", "end_percent"]
    assert all(options.get("tooltip") for _, options in required.values())
    defaults = {name: options["default"] for name, (_, options) in required.items() if name != "model"}
    assert defaults["scale"] == 3.0 and defaults["infinite_blur"] is True and defaults["layers"] == "middle"
    base = patcher(sd1)
    (model,) = nodes.SmoothedEnergyGuidance().patch(base, **defaults)
    assert model is not base and len(model.model_options["sampler_post_cfg_function"]) == 1
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[nodes.NODE_ID] == "Smoothed Energy Guidance"
