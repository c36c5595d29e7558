"""The A1111 adapter driven through an imitation of v1.10.1's CFGDenoiser (tests/support/a1111_host.py)
and a random-weight UNet with the real ldm/sgm layout (tests/support/unet.py)."""

import math
from types import SimpleNamespace

import pytest
import torch

from lib_seg.a1111 import adapter as a1111
from lib_seg.core.layers import resolve_layers, unet_layers
from lib_seg.core.params import SegParams
from lib_seg.unet import prefix as unet_prefix
from tests.support import slow_seg
from tests.support.a1111_host import CFGDenoiser, CompVisDenoiser, DictWithShape, FakeSDModel, InterruptedException
from tests.support.tolerance import assert_network_close, max_abs
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
            vector = torch.randn(rows, config.adm_in_channels, generator=g)
            return DictWithShape({"crossattn": crossattn, "vector": vector})
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
    layers = resolve_layers(layers_spec or params.layers, unet_layers(unet))
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


def to_dtype(inputs, dtype):
    def cast(value):
        if isinstance(value, dict):
            return DictWithShape({k: cast(v) for k, v in value.items()})
        return value.to(dtype) if torch.is_tensor(value) else value

    return {k: (v[0], cast(v[1])) if k == "cond" else cast(v) for k, v in inputs.items()}


@pytest.fixture(scope="module")
def sd1_f64():
    return FakeSDModel(build_unet(TINY_SD1, seed=1, dtype=torch.float64))


@pytest.fixture(scope="module")
def sdxl_f64():
    return FakeSDModel(build_unet(TINY_SDXL, seed=2, dtype=torch.float64))


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
def test_formula_against_slow_path_sd1(sd1_f64, sigma, batch_cond_uncond):
    sd1 = sd1_f64
    inputs = to_dtype(make_inputs(sd1.model.diffusion_model.config), torch.float64)
    params = SegParams(enabled=True, blur_sigma=sigma, layers="m0,d3")
    (baseline,), _ = run(sd1, inputs, batch_cond_uncond=batch_cond_uncond)
    (out,), _ = run(sd1, inputs, params, batch_cond_uncond=batch_cond_uncond)
    assert not torch.allclose(out, baseline, atol=1e-4)
    assert_network_close(out, slow_expected(sd1, inputs, params, baseline))


@pytest.mark.parametrize("case", ["different-lengths", "and-prompts", "skip-uncond", "cfg-1"])
def test_batching_layouts(sd1_f64, case):
    sd1 = sd1_f64
    config = sd1.model.diffusion_model.config
    kwargs, run_kwargs = {}, {}
    if case == "different-lengths":
        kwargs = dict(cond_tokens=10, uncond_tokens=5)
    elif case == "and-prompts":
        kwargs = dict(and_weights=[[(0, 0.6), (1, 0.4)], [(2, 1.0)]])
    elif case == "skip-uncond":
        run_kwargs = dict(skip_uncond=True)
    inputs = to_dtype(make_inputs(config, **kwargs), torch.float64)
    if case == "cfg-1":
        inputs["cond_scale"] = 1.0
    params = SegParams(enabled=True, blur_sigma=3.0)
    (baseline,), _ = run(sd1, inputs, **run_kwargs)
    (out,), _ = run(sd1, inputs, params, **run_kwargs)
    assert_network_close(out, slow_expected(sd1, inputs, params, baseline))


@pytest.mark.parametrize("height,width", [(16, 8), (7, 15), (1, 1)])
def test_sdxl_dict_conds_and_odd_non_square_sizes(sdxl_f64, height, width):
    sdxl = sdxl_f64
    inputs = to_dtype(make_inputs(sdxl.model.diffusion_model.config, height=height, width=width), torch.float64)
    params = SegParams(enabled=True, blur_sigma=10.0, layers="middle,u0.1")
    (baseline,), _ = run(sdxl, inputs)
    (out,), _ = run(sdxl, inputs, params)
    assert_network_close(out, slow_expected(sdxl, inputs, params, baseline))


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
    assert torch.equal(custom, same)  # the same settings reached by two routes: the same computation


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
    unet_calls = []
    handle = sd1.model.diffusion_model.register_forward_pre_hook(lambda *a: unet_calls.append(1))
    with pytest.raises(ValueError, match=r"SEG scale must be a number in \[0, 20\]"), torch.no_grad():
        denoiser(**inputs)
    handle.remove()
    assert unet_calls == []  # raised before any UNet work
    a1111.attach(denoiser, a1111.SegRun(SegParams()))  # img2img reuses the denoiser for the next batch
    with torch.no_grad():
        denoiser(**inputs)
    a1111.attach(denoiser, a1111.SegRun(None, error=ValueError("x")))
    a1111.detach(denoiser)
    assert "forward" not in vars(denoiser)
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


def test_callback_ignores_foreign_denoisers(sd1):
    """Another script's denoiser (no SEG run attached to it), while a batched SEG run is attached to this pass's
    own denoiser, passes through the global callback untouched: every field of its params keeps its object (no
    rows added), nothing is attached to it or wrapped, and its UNet calls and output are those of a denoiser
    without the callback.  Params without a denoiser do not fail."""
    inputs = make_inputs(sd1.model.diffusion_model.config)
    ours = CFGDenoiser(sd1, callbacks=[a1111.on_cfg_denoiser])
    run_ = a1111.SegRun(SegParams(enabled=True, layers="m0"), batch_rows=True)
    a1111.attach(ours, run_)
    fields = []
    record = lambda params: fields.append(dict(vars(params)))  # noqa: E731 (what the host reads back)
    foreign = CFGDenoiser(sd1, callbacks=[record, a1111.on_cfg_denoiser, record])
    rows, unet = [], sd1.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            out = foreign(**inputs)
            plain_rows, rows[:] = list(rows), []
            plain = CFGDenoiser(sd1)(**inputs)
    finally:
        handle.remove()
    before, after = fields
    assert all(after[name] is value for name, value in before.items()), "the callback replaced a field"
    assert plain_rows == rows == [4]  # cond and uncond of two images: no SEG rows
    assert torch.equal(out, plain)
    assert not hasattr(foreign, a1111.RUN_ATTR) and not hasattr(foreign.combine_denoised, a1111.WRAPPED_ATTR)
    assert getattr(ours, a1111.RUN_ATTR) is run_ and run_.captured is None  # this pass's run saw nothing
    assert not has_hooks(unet)
    a1111.on_cfg_denoiser(SimpleNamespace())


def test_unsupported_models(sd1):
    assert a1111.unsupported_reason(sd1) is None
    assert "neither an ldm/sgm UNet nor" in a1111.unsupported_reason(SimpleNamespace(is_sd3=True))
    assert "InstructPix2Pix" in a1111.unsupported_reason(SimpleNamespace(cond_stage_key="edit"))
    assert "unCLIP" in a1111.unsupported_reason(
        SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn-adm"))
    )
    assert "custom UNet" in a1111.unsupported_reason(sd1, custom_unet=object())
    assert "neither an ldm/sgm UNet nor" in a1111.unsupported_reason(SimpleNamespace(model=SimpleNamespace()))


# --- batched SEG rows and prefix reuse -------------------------------------------------------------


def run_counting(model, inputs, run_, steps=1, **kwargs):
    """Run with ``run_`` attached; returns outputs and the row count of every UNet call."""
    unet = model.model.diffusion_model
    rows = []
    fail = kwargs.pop("fail", None)  # a pre-hook that may raise (an imitated GPU error), after the count

    def count(module, args):
        rows.append(args[0].shape[0])
        return None if fail is None else fail(module, args)

    handle = unet.register_forward_pre_hook(count)
    denoiser = CFGDenoiser(model, callbacks=[a1111.on_cfg_denoiser], batch_cond_uncond=kwargs.pop("bcu", True))
    denoiser.total_steps = steps
    a1111.attach(denoiser, run_)
    try:
        with torch.no_grad():
            outs = [denoiser(**inputs, **kwargs) for _ in range(steps)]
    finally:
        handle.remove()
        a1111.detach(denoiser)
    assert not has_hooks(unet)
    return outs, rows


LAYOUTS = {
    "plain": ({}, {}),
    "and-prompts": ({"and_weights": [[(0, 0.6), (1, 0.4)], [(2, 1.0)]]}, {}),
    "skip-uncond": ({}, {"skip_uncond": True}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("spec,sigma", [("middle", math.inf), ("d3,u4", 2.0), ("u4", math.inf)])
@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_batched_equals_separate_bit_for_bit_in_float64(sd1_f64, layout, spec, sigma, prefix_reuse):
    """The batched call (with or without prefix reuse) computes the same function as the separate
    pass.  CPU kernels may pick batch-size-dependent summation orders (oneDNN/MKL), so results agree
    to rounding: float64 here (tests/support/tolerance.py), float32 in the next test."""
    sd1 = sd1_f64
    make_kwargs, run_kwargs = LAYOUTS[layout]
    inputs = to_dtype(make_inputs(sd1.model.diffusion_model.config, **make_kwargs), torch.float64)
    params = SegParams(enabled=True, layers=spec, blur_sigma=sigma)
    (separate,), separate_rows = run_counting(sd1, inputs, a1111.SegRun(params), **run_kwargs)
    batched_run = a1111.SegRun(params, batch_rows=True, prefix_reuse=prefix_reuse)
    (batched,), batched_rows = run_counting(sd1, inputs, batched_run, **run_kwargs)
    n_cond, images = sum(len(c) for c in inputs["cond"][0]), inputs["x"].shape[0]
    main = n_cond + (0 if run_kwargs else images)
    assert separate_rows == [main, n_cond]  # main call, then the separate SEG call
    assert batched_rows == [main + n_cond]  # one call holding the SEG rows
    assert_network_close(batched, separate)


@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_batched_equals_separate_to_rounding_in_float32(sd1, sd1_f64, prefix_reuse):
    """In float32 both paths carry float32 rounding: measured against the exact function (the same
    weights in float64), the batched rows' error stays within a few times the separate pass' own."""
    inputs = make_inputs(sd1.model.diffusion_model.config)
    params = SegParams(enabled=True, layers="d3,m0", blur_sigma=2.0)
    (separate,), _ = run_counting(sd1, inputs, a1111.SegRun(params))
    (batched,), _ = run_counting(sd1, inputs, a1111.SegRun(params, batch_rows=True, prefix_reuse=prefix_reuse))
    (plain,), _ = run_counting(sd1, inputs, a1111.SegRun(SegParams()))
    (exact,), _ = run_counting(sd1_f64, to_dtype(inputs, torch.float64), a1111.SegRun(params))
    separate_error = max_abs(separate.double() - exact)
    assert separate_error > 0  # float32 does round: the unit is not zero
    assert max_abs(batched.double() - exact) <= 8 * separate_error
    assert max_abs(batched - plain) > 100 * max_abs(batched - separate)


def test_batched_sdxl_dict_conds_odd_size(sdxl_f64):
    sdxl = sdxl_f64
    inputs = to_dtype(make_inputs(sdxl.model.diffusion_model.config, height=7, width=15), torch.float64)
    params = SegParams(enabled=True, layers="m0,u1.1", blur_sigma=3.0)
    (separate,), _ = run_counting(sdxl, inputs, a1111.SegRun(params))
    (batched,), rows = run_counting(sdxl, inputs, a1111.SegRun(params, batch_rows=True))
    assert rows == [6]
    assert_network_close(batched, separate)


def test_batched_falls_back_when_lengths_differ_or_the_host_splits_the_batch(sd1_f64):
    sd1 = sd1_f64
    params = SegParams(enabled=True, blur_sigma=2.0)
    config = sd1.model.diffusion_model.config
    inputs = to_dtype(make_inputs(config, cond_tokens=10, uncond_tokens=5), torch.float64)
    (separate,), _ = run_counting(sd1, inputs, a1111.SegRun(params))
    (batched,), rows = run_counting(sd1, inputs, a1111.SegRun(params, batch_rows=True))
    assert rows == [2, 2, 2]  # cond chunk, uncond, separate SEG call: no extra rows added
    assert torch.equal(batched, separate)  # the very same calls
    inputs = to_dtype(make_inputs(config), torch.float64)
    (separate,), _ = run_counting(sd1, inputs, a1111.SegRun(params), bcu=False)
    (split,), rows = run_counting(sd1, inputs, a1111.SegRun(params, batch_rows=True), bcu=False)
    assert rows == [2, 2, 2, 2]  # the host chunked [cond, seg, uncond]: SEG rows unblurred, so recomputed
    assert_network_close(split, separate)


def test_prefix_reuse_skipped_when_the_unet_forward_is_patched(sd1_f64, monkeypatch):
    sd1 = sd1_f64
    unet = sd1.model.diffusion_model
    calls = []
    original = unet_prefix.shared_prefix
    monkeypatch.setattr(unet_prefix, "shared_prefix", lambda *a: calls.append(a) or original(*a))
    inputs = to_dtype(make_inputs(unet.config), torch.float64)
    params = SegParams(enabled=True)
    (reused,), _ = run_counting(sd1, inputs, a1111.SegRun(params, batch_rows=True))
    assert len(calls) == 1
    unet.forward = lambda *a, **k: type(unet).forward(unet, *a, **k)  # e.g. ControlNet's instance patch
    try:
        (full,), _ = run_counting(sd1, inputs, a1111.SegRun(params, batch_rows=True))
    finally:
        del unet.forward
    assert len(calls) == 1
    assert_network_close(full, reused)


def test_batched_adds_no_rows_outside_the_window_or_when_off(sd1):
    inputs = make_inputs(sd1.model.diffusion_model.config)
    baseline, _ = run_counting(sd1, inputs, a1111.SegRun(SegParams()), steps=2)
    outs, rows = run_counting(sd1, inputs, a1111.SegRun(SegParams(enabled=True, end=0.4), batch_rows=True), steps=2)
    assert rows == [6, 4] and torch.equal(outs[1], baseline[1]) and not torch.equal(outs[0], baseline[0])
    _, rows = run_counting(sd1, inputs, a1111.SegRun(SegParams(), batch_rows=True), steps=2)
    assert rows == [4, 4]


def test_detach_unwraps_the_inner_model(sd1):
    denoiser = CFGDenoiser(sd1, callbacks=[a1111.on_cfg_denoiser])
    a1111.attach(denoiser, a1111.SegRun(SegParams(enabled=True), batch_rows=True))
    with torch.no_grad():
        denoiser(**make_inputs(sd1.model.diffusion_model.config))
    assert "forward" in vars(denoiser.inner_model)
    a1111.detach(denoiser)
    assert "forward" not in vars(denoiser.inner_model)


def test_prefix_reuse_only_with_more_than_one_seg_row(sd1_f64, monkeypatch):
    """One SEG row (one image): the prefix hooks cost more than they save (docs/benchmarks.md)."""
    calls = []
    original = unet_prefix.shared_prefix
    monkeypatch.setattr(unet_prefix, "shared_prefix", lambda *a: calls.append(a) or original(*a))
    config = sd1_f64.model.diffusion_model.config
    for images, expected in ((1, 0), (2, 1)):
        calls.clear()
        inputs = to_dtype(make_inputs(config, images=images), torch.float64)
        _, rows = run_counting(sd1_f64, inputs, a1111.SegRun(SegParams(enabled=True), batch_rows=True))
        assert rows == [3 * images] and len(calls) == expected


def test_an_out_of_memory_batched_call_falls_back_to_the_separate_call(sd1_f64):
    """The main call with the SEG rows runs out of memory (the host's GPU, imitated by a pre-hook that
    raises ``torch.OutOfMemoryError`` for that row count): the main call is redone without them, SEG makes
    its separate call, and the image equals the separate-call image; the next step does not try again."""
    sd1 = sd1_f64
    inputs = to_dtype(make_inputs(sd1.model.diffusion_model.config), torch.float64)
    params = SegParams(enabled=True, blur_sigma=2.0)
    separate, _ = run_counting(sd1, inputs, a1111.SegRun(params), steps=2)

    def out_of_memory(_module, args):
        if args[0].shape[0] == 6:
            raise torch.OutOfMemoryError("CUDA out of memory (imitated)")

    run = a1111.SegRun(params, batch_rows=True)
    fallen, rows = run_counting(sd1, inputs, run, steps=2, fail=out_of_memory)
    assert rows == [6, 4, 2, 4, 2] and run.batch_rows is False
    for got, expected in zip(fallen, separate, strict=True):
        assert torch.equal(got, expected)  # the very same calls as the separate path
