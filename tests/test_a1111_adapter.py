"""The A1111 adapter driven through an imitation of v1.10.1's CFGDenoiser (tests/support/a1111_host.py)
and a random-weight UNet with the real ldm/sgm layout (tests/support/unet.py)."""

import math
from types import SimpleNamespace

import pytest
import torch

from lib_seg import a1111
from lib_seg.layers import resolve_layers
from lib_seg.params import SegParams
from tests.support import slow_seg
from tests.support.a1111_host import CFGDenoiser, CompVisDenoiser, FakeSDModel, InterruptedException
from tests.support.unet import TINY_SD1, TINY_SDXL, build_unet


def has_hooks(module: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def make_inputs(config, images=2, height=13, width=9, cond_tokens=5, uncond_tokens=5, and_weights=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    conds_list = and_weights or [[(i, 1.0)] for i in range(images)]
    n_cond = sum(len(c) for c in conds_list)

    def text(rows, tokens):
        crossattn = torch.randn(rows, tokens, config.context_dim, generator=g)
        if config.adm_in_channels:
            return {"crossattn": crossattn, "vector": torch.randn(rows, config.adm_in_channels, generator=g)}
        return crossattn

    x = torch.randn(images, 4, height, width, generator=g)
    sigma = torch.full((images,), 2.5)
    image_cond = torch.zeros(images, 5, 1, 1)
    return dict(
        x=x,
        sigma=sigma,
        uncond=text(images, uncond_tokens),
        cond=(conds_list, text(n_cond, cond_tokens)),
        cond_scale=7.0,
        image_cond=image_cond,
    )


def run(model, inputs, params=None, steps=1, batch_cond_uncond=True, skip_uncond=False, is_hr_pass=False):
    denoiser = CFGDenoiser(model, callbacks=[a1111.on_cfg_denoiser], batch_cond_uncond=batch_cond_uncond)
    denoiser.total_steps = steps
    if params is not None:
        a1111.attach(denoiser, a1111.SegRun(params, is_hr_pass=is_hr_pass))
    with torch.no_grad():
        outs = [denoiser(**inputs, skip_uncond=skip_uncond) for _ in range(steps)]
    return outs, denoiser


def slow_expected(model, inputs, params, baseline, layers_spec=None):
    """baseline + s * sum_w w (cond - cond_seg), cond and cond_seg computed separately and plainly."""
    unet = model.model.diffusion_model
    conds_list, text_cond = inputs["cond"]
    repeats = [len(c) for c in conds_list]
    x = torch.cat([inputs["x"][i : i + 1].expand(n, -1, -1, -1) for i, n in enumerate(repeats)])
    sigma = torch.cat([inputs["sigma"][i : i + 1].expand(n) for i, n in enumerate(repeats)])
    cond = a1111.condition_dict(text_cond, torch.zeros(x.shape[0], 5, 1, 1))
    layers = resolve_layers(layers_spec or params.layers, a1111.available_layers(unet))
    with torch.no_grad():
        plain = CompVisDenoiser(model)(x, sigma, cond)
        seg_model = FakeSDModel(slow_seg.seg_unet(unet, list(layers), params.blur_sigma))
        seg = CompVisDenoiser(seg_model)(x, sigma, cond)
    expected = baseline.clone()
    for i, conds in enumerate(conds_list):
        for row, weight in conds:
            expected[i] += params.scale * weight * (plain[row] - seg[row])
    return expected


@pytest.fixture(scope="module")
def sd1():
    return FakeSDModel(build_unet(TINY_SD1, seed=1))


@pytest.fixture(scope="module")
def sdxl():
    return FakeSDModel(build_unet(TINY_SDXL, seed=2))


def test_seg_off_is_bit_identical(sd1):
    inputs = make_inputs(sd1.model.diffusion_model.config)
    (baseline,), _ = run(sd1, inputs)
    for params in (
        SegParams(enabled=False),
        SegParams(enabled=True, scale=0.0),
        SegParams(enabled=True, start=0.5, end=1.0),
    ):
        (out,), _ = run(sd1, inputs, params, steps=1)
        assert torch.equal(out, baseline), params
    assert not has_hooks(sd1.model.diffusion_model)


@pytest.mark.parametrize("sigma", [math.inf, 2.0])
@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_formula_against_slow_path_sd1(sd1, sigma, batch_cond_uncond):
    inputs = make_inputs(sd1.model.diffusion_model.config)
    params = SegParams(enabled=True, blur_sigma=sigma, layers="m0,d3")
    (baseline,), _ = run(sd1, inputs, batch_cond_uncond=batch_cond_uncond)
    (out,), _ = run(sd1, inputs, params, batch_cond_uncond=batch_cond_uncond)
    assert not torch.allclose(out, baseline, atol=1e-4)
    torch.testing.assert_close(out, slow_expected(sd1, inputs, params, baseline), rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("case", ["different-lengths", "and-prompts", "skip-uncond", "cfg-1"])
def test_batching_layouts(sd1, case):
    config = sd1.model.diffusion_model.config
    kwargs, run_kwargs = {}, {}
    if case == "different-lengths":
        kwargs = dict(cond_tokens=10, uncond_tokens=5)
    elif case == "and-prompts":
        kwargs = dict(and_weights=[[(0, 0.6), (1, 0.4)], [(2, 1.0)]])
    elif case == "skip-uncond":
        run_kwargs = dict(skip_uncond=True)
    inputs = make_inputs(config, **kwargs)
    if case == "cfg-1":
        inputs["cond_scale"] = 1.0
    params = SegParams(enabled=True, blur_sigma=3.0)
    (baseline,), _ = run(sd1, inputs, **run_kwargs)
    (out,), _ = run(sd1, inputs, params, **run_kwargs)
    torch.testing.assert_close(out, slow_expected(sd1, inputs, params, baseline), rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("height,width", [(16, 8), (7, 15), (1, 1)])
def test_sdxl_dict_conds_and_odd_non_square_sizes(sdxl, height, width):
    inputs = make_inputs(sdxl.model.diffusion_model.config, height=height, width=width)
    params = SegParams(enabled=True, blur_sigma=10.0, layers="middle,u0.1")
    (baseline,), _ = run(sdxl, inputs)
    (out,), _ = run(sdxl, inputs, params)
    torch.testing.assert_close(out, slow_expected(sdxl, inputs, params, baseline), rtol=1e-4, atol=5e-5)


def test_window_limits_steps(sd1):
    inputs = make_inputs(sd1.model.diffusion_model.config)
    params = SegParams(enabled=True, start=0.5, end=0.75)
    baselines, _ = run(sd1, inputs, steps=4)
    outs, _ = run(sd1, inputs, params, steps=4)
    same = [torch.equal(a, b) for a, b in zip(outs, baselines, strict=True)]
    assert same == [True, True, False, False]  # progress 0, .25 outside; .5, .75 inside


def test_hires_modes(sd1):
    inputs = make_inputs(sd1.model.diffusion_model.config)
    (baseline,), _ = run(sd1, inputs)
    (off,), _ = run(sd1, inputs, SegParams(enabled=True, hires_mode="off"), is_hr_pass=True)
    (first,), _ = run(sd1, inputs, SegParams(enabled=True, hires_mode="off"), is_hr_pass=False)
    (custom,), _ = run(sd1, inputs, SegParams(enabled=True, hires_mode="custom", hires_scale=1.0), is_hr_pass=True)
    (same,), _ = run(sd1, inputs, SegParams(enabled=True, scale=1.0), is_hr_pass=True)
    assert torch.equal(off, baseline) and not torch.equal(first, baseline)
    torch.testing.assert_close(custom, same)


def test_hooks_removed_after_exception_and_interrupt(sd1):
    unet = sd1.model.diffusion_model
    inputs = make_inputs(unet.config)
    for error in (RuntimeError("boom"), InterruptedException()):

        def explode(module, args, error=error):
            if unet._seg_in_pass:
                raise error

        unet._seg_in_pass = False
        handle = unet.middle_block.register_forward_pre_hook(explode)
        denoiser = CFGDenoiser(sd1, callbacks=[a1111.on_cfg_denoiser])
        a1111.attach(denoiser, a1111.SegRun(SegParams(enabled=True, layers="all")))
        original = denoiser.inner_model.forward

        def flag_seg_pass(x, sigma, cond, _orig=original):
            unet._seg_in_pass = x.shape[0] == 2 and has_hooks(unet.input_blocks)
            return _orig(x, sigma, cond)

        denoiser.inner_model.forward = flag_seg_pass
        with pytest.raises(type(error)), torch.no_grad():
            denoiser(**inputs)
        handle.remove()
        assert not has_hooks(unet)
    del unet._seg_in_pass


def test_errors_raise_inside_sampling_with_the_message(sd1):
    inputs = make_inputs(sd1.model.diffusion_model.config)
    with pytest.raises(ValueError, match="'d2' names attention layers this model does not have; it has d1,d3"):
        run(sd1, inputs, SegParams(enabled=True, layers="d2"))
    denoiser = CFGDenoiser(sd1, callbacks=[a1111.on_cfg_denoiser])
    a1111.attach(denoiser, a1111.SegRun(None, error=ValueError("SEG scale must be a number in [0, 20], got 99")))
    with pytest.raises(ValueError, match=r"SEG scale must be a number in \[0, 20\]"), torch.no_grad():
        denoiser(**inputs)
    assert not has_hooks(sd1.model.diffusion_model)


def test_attach_is_idempotent_and_detach_restores(sd1):
    denoiser = CFGDenoiser(sd1)
    a1111.attach(denoiser, a1111.SegRun(SegParams(enabled=True)))
    wrapper = denoiser.combine_denoised
    a1111.attach(denoiser, a1111.SegRun(SegParams(enabled=True, scale=1)))
    assert denoiser.combine_denoised is wrapper and getattr(denoiser, a1111.RUN_ATTR).params.scale == 1
    a1111.detach(denoiser)
    assert "combine_denoised" not in vars(denoiser) and not hasattr(denoiser, a1111.RUN_ATTR)

    def other_extension(x_out, conds_list, uncond, cond_scale):
        return CFGDenoiser.combine_denoised(denoiser, x_out, conds_list, uncond, cond_scale)

    denoiser.combine_denoised = other_extension
    a1111.attach(denoiser, a1111.SegRun(SegParams(enabled=True)))
    a1111.detach(denoiser)
    assert denoiser.combine_denoised is other_extension
    a1111.detach(None)


def test_callback_ignores_foreign_denoisers():
    a1111.on_cfg_denoiser(SimpleNamespace(denoiser=object()))
    a1111.on_cfg_denoiser(SimpleNamespace())


def test_unsupported_models(sd1):
    assert a1111.unsupported_reason(sd1) is None
    assert "SD3" in a1111.unsupported_reason(SimpleNamespace(is_sd3=True))
    assert "InstructPix2Pix" in a1111.unsupported_reason(SimpleNamespace(cond_stage_key="edit"))
    assert "unCLIP" in a1111.unsupported_reason(
        SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn-adm"))
    )
    assert "custom UNet" in a1111.unsupported_reason(sd1, custom_unet=object())
    assert "no ldm/sgm UNet" in a1111.unsupported_reason(SimpleNamespace(model=SimpleNamespace()))
