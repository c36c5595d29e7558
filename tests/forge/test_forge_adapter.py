"""The Forge adapter driven through an imitation of the classic Forge, new Forge and reForge sampling
contract (tests/support/forge_host.py) and a random-weight UNet with the real ldm layout."""

from __future__ import annotations

import logging
import math
import sys
from types import SimpleNamespace

import pytest
import torch

from lib_seg.core import geometry
from lib_seg.core.layers import LayerKey, resolve_layers
from lib_seg.core.params import SegParams
from lib_seg.forge import adapter as forge
from lib_seg.forge import host as forge_host
from tests.core.test_blur import blur_bound, reference_blur
from tests.support import forge_host as host
from tests.support import slow_seg
from tests.support.forge_host import make_inputs
from tests.support.tolerance import assert_network_close, assert_within
from tests.support.unet import TINY_SD1, UNetConfig, attention, build_unet

KINDS = host.KINDS
F64 = torch.float64


def schedule(steps):
    sigmas = torch.cat([torch.linspace(8.0, 1.0, steps), torch.zeros(1)]) if steps > 1 else torch.tensor([2.5, 0.0])
    return sigmas.to(F64)


def sample(p, inputs, steps=1, cond_scale=7.0):
    x, cond, uncond = inputs
    return p.sampler.sample(x, schedule(steps), cond, uncond, cond_scale)


def spy(records):
    """A post-CFG function registered before SEG: it sees the main pass exactly as the host made it."""

    def post_cfg(args):
        records.append({key: args[key] for key in ("denoised", "cond_denoised", "uncond_denoised", "uncond")})
        return args["denoised"]

    return post_cfg


def slow_expected(unet, inputs, baseline, layers_spec, sigma, scale, sigma_t=2.5):
    """baseline + s (cond - cond_seg): plain model calls, the SEG one on a UNet copy with a dense blur."""
    x, cond, _ = inputs
    keys = list(resolve_layers(layers_spec, forge.available_layers(unet)))
    t = torch.full((x.shape[0],), sigma_t, dtype=x.dtype)
    plain = host.BaseModel(unet).apply_model(x, t, **cond[0]["model_conds"])
    seg = host.BaseModel(slow_seg.seg_unet(unet, keys, sigma)).apply_model(x, t, **cond[0]["model_conds"])
    return baseline + scale * (plain - seg)


def seg_functions(p):
    options = p.sd_model.forge_objects.unet.model_options
    return [f for f in options.get("sampler_post_cfg_function", []) if getattr(f, forge.SEG_MARK, False)]


# --- host detection and resolution -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_host_kind_detects_each_host(monkeypatch, kind):
    host.install(monkeypatch, kind)
    assert forge.host_kind() == kind


def test_host_kind_none_outside_forge(monkeypatch):
    host.install(monkeypatch, "forge-classic")
    assert forge.host_kind() == "forge-classic"
    monkeypatch.delitem(sys.modules, "modules_forge.unet_patcher")
    monkeypatch.setitem(sys.modules, "modules_forge.unet_patcher", None)  # import now raises ImportError
    assert forge.host_kind() is None
    for name in [n for n in sys.modules if n.split(".")[0] in ("backend", "ldm_patched", "modules_forge")]:
        monkeypatch.delitem(sys.modules, name)
    assert forge.host_kind() is None
    with pytest.raises(ValueError, match="unknown Forge host kind"):
        forge_host.attention_function("comfy")


# --- the formula, both calc styles ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma", [math.inf, 2.0])
@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_formula_against_slow_path(request, monkeypatch, kind, sigma, model):
    modules = host.install(monkeypatch, kind)
    unet = request.getfixturevalue(model)
    spec = "m0,d1,u3" if model == "sd1" else "middle,u0.1,d3.1"
    inputs = make_inputs(unet.config)
    (baseline,) = sample(host.make_processing(kind, unet), inputs)
    samplers = modules["backend.sampling.sampling_function" if kind in host.BACKEND else "ldm_patched.modules.samplers"]
    for calc in ("calc_cond_batch", "calc_cond_uncond_batch"):
        if hasattr(samplers, calc):
            getattr(samplers, calc).calls = 0
    p = host.make_processing(kind, unet)
    params = SegParams(enabled=True, scale=2.0, blur_sigma=sigma, layers=spec)
    assert forge.patch_unet(p, params) == ("d1,m0,u3" if model == "sd1" else "d3.1,m0,u0.1")
    (out,) = sample(p, inputs)
    assert not torch.allclose(out, baseline, atol=1e-4)
    assert_network_close(out, slow_expected(unet, inputs, baseline, spec, sigma, 2.0))
    if kind == "reforge":  # main pass + SEG pass through calc_cond_batch, never the deprecated wrapper
        assert (samplers.calc_cond_batch.calls, samplers.calc_cond_uncond_batch.calls) == (2, 0)
    else:
        assert samplers.calc_cond_uncond_batch.calls == 2


def test_canonical_layer_text(sd1, sdxl, monkeypatch):
    host.install(monkeypatch, "forge")
    params = SegParams(enabled=True, layers="mid")
    assert forge.patch_unet(host.make_processing("forge", sd1), params) == "middle"
    params = SegParams(enabled=True, layers="u0-1, d5.0-2, m0.1")
    assert forge.patch_unet(host.make_processing("forge", sdxl), params) == "d5,m0.1,u0,u1"


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_seg_pass_is_patched(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    plain, seg = [], []
    p0 = host.make_processing(kind, sd1)
    p0.sd_model.forge_objects.unet.set_model_sampler_post_cfg_function(spy(plain))
    sample(p0, inputs, steps=2)
    p = host.make_processing(kind, sd1)
    original = p.sd_model.forge_objects.unet
    original.set_model_sampler_post_cfg_function(spy(seg))
    forge.patch_unet(p, SegParams(enabled=True, blur_sigma=3.0, layers="all"), batch_rows=False)
    patched = p.sd_model.forge_objects.unet
    assert patched is not original
    outs = sample(p, inputs, steps=2)
    for a, b in zip(plain, seg, strict=True):  # main pass bit-identical to running without the extension
        assert all(torch.equal(a[key], b[key]) for key in ("denoised", "cond_denoised", "uncond_denoised"))
    assert not torch.equal(outs[0], seg[0]["denoised"])
    assert original.model_options.keys() == {"transformer_options", "sampler_post_cfg_function"}
    assert original.model_options["transformer_options"] == {}
    assert len(original.model_options["sampler_post_cfg_function"]) == 1  # only the spy
    # post-CFG never wrote into the patcher's dict; SEG only added its grid recorder at install time
    assert patched.model_options["transformer_options"] == {"block_modifiers": [forge.record_block_grid]}
    calls = patched.model.calls
    main = [c for c in calls if c["cond_or_uncond"] == [1, 0]]  # the hosts batch in reverse order
    extra = [c for c in calls if c["cond_or_uncond"] == [0]]
    assert len(main) == len(extra) == 2 and len(calls) == 4
    assert all("patches_replace" not in c for c in main)
    assert all(set(c["patches_replace"]["attn1"]) == set(forge.available_layers(sd1)) for c in extra)


@pytest.mark.parametrize("batch_rows", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_cfg_1_skipped_uncond(sd1, monkeypatch, kind, batch_rows):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    (baseline,) = sample(host.make_processing(kind, sd1), inputs, cond_scale=1.0)
    p = host.make_processing(kind, sd1)
    records = []
    p.sd_model.forge_objects.unet.set_model_sampler_post_cfg_function(spy(records))
    forge.patch_unet(p, SegParams(enabled=True, blur_sigma=2.0), batch_rows=batch_rows)
    (out,) = sample(p, inputs, cond_scale=1.0)
    assert (records[0]["uncond"] is None) == (kind != "forge-classic")  # as each host passes it
    assert not torch.any(records[0]["uncond_denoised"])
    calls = [c["cond_or_uncond"] for c in p.sd_model.forge_objects.unet.model.calls]
    assert calls == ([[0, 0]] if batch_rows else [[0], [0]])  # batched: the SEG chunk rides in the cond call
    assert_network_close(out, slow_expected(sd1, inputs, baseline, "middle", 2.0, 3.0))


# --- lifecycle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_hires_hook_called_twice_installs_one_seg_function(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    params = SegParams(enabled=True, hires_mode="custom", hires_scale=1.5)
    once = host.make_processing(kind, sd1)
    once.is_hr_pass = True
    forge.patch_unet(once, params)
    (expected,) = sample(once, inputs)

    p = host.make_processing(kind, sd1)
    p.is_hr_pass = True
    forge.patch_unet(p, params)  # classic/new: first hires call, its patch is thrown away by the reset
    p.reset_forge_objects()
    forge.patch_unet(p, params)
    assert len(seg_functions(p)) == 1
    forge.patch_unet(p, params)  # a host that does not reset: still one
    assert len(seg_functions(p)) == 1
    (out,) = sample(p, inputs)
    assert torch.equal(out, expected)
    assert p.forge_objects_original.unet.model_options == {"transformer_options": {}}

    off = params.replace(hires_mode="off")
    forge.patch_unet(p, off)  # hires SEG off, no reset in between: the stale function goes
    assert seg_functions(p) == []
    p.reset_forge_objects()
    before = p.sd_model.forge_objects.unet
    assert forge.patch_unet(p, off) is None and p.sd_model.forge_objects.unet is before  # nothing to undo
    for disabled in (None, SegParams(enabled=False), SegParams(enabled=True, scale=0.0)):
        assert forge.patch_unet(p, disabled) is None and p.sd_model.forge_objects.unet is before


def test_window_from_the_denoiser_counter(sd1, monkeypatch):
    host.install(monkeypatch, "forge")
    inputs = make_inputs(sd1.config)
    baselines = sample(host.make_processing("forge", sd1), inputs, steps=4)
    p = host.make_processing("forge", sd1)
    forge.patch_unet(p, SegParams(enabled=True, start=0.5, end=0.75))
    outs = sample(p, inputs, steps=4)
    same = [torch.equal(a, b) for a, b in zip(outs, baselines, strict=True)]
    assert same == [True, True, False, False]  # progress 0, .25 outside; .5, .75 inside


def test_window_from_sample_sigmas_without_a_counter(sd1, monkeypatch):
    host.install(monkeypatch, "reforge")
    inputs = make_inputs(sd1.config)
    baselines = sample(host.make_processing("reforge", sd1), inputs, steps=4)
    p = host.make_processing("reforge", sd1)
    sampler, p.sampler = p.sampler, None
    p.sd_model.forge_objects.unet.model_options["transformer_options"]["sample_sigmas"] = schedule(4)
    forge.patch_unet(p, SegParams(enabled=True, start=0.0, end=0.25))
    p.sampler = sampler
    outs = sample(p, inputs, steps=4)
    assert [torch.equal(a, b) for a, b in zip(outs, baselines, strict=True)] == [False, False, True, True]

    p = host.make_processing("reforge", sd1)
    sampler, p.sampler = p.sampler, None
    forge.patch_unet(p, SegParams(enabled=True, start=0.5))
    p.sampler = sampler
    with pytest.raises(RuntimeError, match="does not tell the sampling progress"):
        sample(p, inputs, steps=2)


def test_sampling_progress_prefers_the_counter():
    sigmas = schedule(4)
    counter = SimpleNamespace(step=3, total_steps=4)
    assert forge.sampling_progress(counter, {"sample_sigmas": sigmas}, sigmas[1:2]) == 0.75
    assert forge.sampling_progress(None, {"sample_sigmas": sigmas}, sigmas[1:2]) == 0.25
    assert forge.sampling_progress(SimpleNamespace(step=0, total_steps=None), {}, sigmas[1:2]) is None


# --- token grid -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forge-classic", "reforge"])
@pytest.mark.parametrize("height,width", [(16, 8), (7, 15), (1, 1), (13, 9)])
def test_non_square_and_odd_latents(sdxl, monkeypatch, kind, height, width):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sdxl.config, height=height, width=width)
    (baseline,) = sample(host.make_processing(kind, sdxl), inputs)
    p = host.make_processing(kind, sdxl)
    forge.patch_unet(p, SegParams(enabled=True, blur_sigma=10.0, layers="middle,u0.1,d3"))
    (out,) = sample(p, inputs)
    expected = slow_expected(sdxl, inputs, baseline, "middle,u0.1,d3", 10.0, 3.0)
    assert_network_close(out, expected)


def test_token_grid_prefers_activations_shape():
    # Deep Shrink at 552x528 px: latent 69x66, shrunk by 2.0 -> 35x33 -> level grids no ceil chain gives.
    reforge = {"activations_shape": [1, 8, 16, 18], "original_shape": [1, 4, 64, 66]}
    assert forge.token_grid(288, reforge) == (16, 18)
    assert forge.token_grid(288, {"original_shape": [1, 4, 64, 66]}) is None
    assert forge.token_grid(289, reforge) is None  # exact shape that does not fit: no guessing
    assert forge.token_grid(35, {"original_shape": [2, 4, 13, 9]}) == (7, 5)
    assert forge.token_grid(35, {}) is None


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_takes_exact_grids_and_never_walks_the_chain(sd1, monkeypatch, kind):
    """reForge tells ``activations_shape``; classic and new Forge get the grid SEG's block modifier
    recorded.  The ceil-chain walk is only for a host that tells neither."""
    host.install(monkeypatch, kind)

    def no_chain_walk(*_):
        raise AssertionError("walked the ceil chain")

    monkeypatch.setattr(geometry, "token_grid", no_chain_walk)
    inputs = make_inputs(sd1.config)
    (baseline,) = sample(host.make_processing(kind, sd1), inputs)
    p = host.make_processing(kind, sd1)
    forge.patch_unet(p, SegParams(enabled=True, blur_sigma=2.0, layers="d1,m0"))
    (out,) = sample(p, inputs)
    assert_network_close(out, slow_expected(sd1, inputs, baseline, "d1,m0", 2.0, 3.0))


@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_no_grid_leaves_queries_unblurred_and_warns_once(monkeypatch, caplog, sigma):
    host.install(monkeypatch, "forge-classic")
    key = LayerKey("input", 4, 0)
    patch = forge.attn1_patch("forge-classic", key, sigma, forge.skip_warner())
    q, k, v = (torch.randn(2, 288, 16) for _ in range(3))
    extra = {"n_heads": 2, "dim_head": 8, "original_shape": [2, 4, 64, 66]}
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        outs = [patch(q, k, v, extra) for _ in range(2)]
    if math.isinf(sigma):  # infinite blur is the token mean: it needs no grid
        assert torch.equal(outs[0], attention(q.mean(1, keepdim=True).expand_as(q).contiguous(), k, v, 2))
        assert "unblurred" not in caplog.text
    else:
        assert torch.equal(outs[0], attention(q, k, v, 2)) and torch.equal(outs[1], outs[0])
        assert caplog.text.count("d4.0 sees 288 queries") == 1


# --- unsupported models and errors ----------------------------------------------------------------


class OtherDiT(torch.nn.Module):
    """A transformer SEG does not know (PixArt, HunyuanDiT, ...: plain ``blocks``; Flux without singles)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        self.double_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_dit_models_are_left_untouched(monkeypatch, caplog, kind):
    host.install(monkeypatch, kind)
    p = host.make_processing(kind, build_unet(TINY_SD1, dtype=F64))
    p.sd_model.forge_objects.unet.model.diffusion_model = OtherDiT()
    before = p.sd_model.forge_objects.unet
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        assert forge.patch_unet(p, SegParams(enabled=True)) is None
    assert p.sd_model.forge_objects.unet is before and before.model_options == {"transformer_options": {}}
    assert "OtherDiT) is neither a UNet nor a diffusion transformer SEG knows" in caplog.text


def test_outside_forge_nothing_is_touched(sd1, monkeypatch, caplog):
    for name in [n for n in sys.modules if n.split(".")[0] in ("backend", "ldm_patched", "modules_forge")]:
        monkeypatch.delitem(sys.modules, name)
    p = host.make_processing("forge", sd1)
    before = p.sd_model.forge_objects.unet
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        assert forge.patch_unet(p, SegParams(enabled=True)) is None
    assert p.sd_model.forge_objects.unet is before and "SEG is off" in caplog.text
    error = ValueError("SEG scale must be a number in [0, 20], got 99")
    with pytest.raises(ValueError, match="got 99"):  # no patcher to carry it: raise (the host logs it)
        forge.patch_unet(SimpleNamespace(), None, error=error)


@pytest.mark.parametrize("kind", KINDS)
def test_errors_raise_inside_sampling_with_the_message(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    p = host.make_processing(kind, sd1)
    assert forge.patch_unet(p, SegParams(enabled=True, layers="d2")) is None
    with pytest.raises(ValueError, match="'d2' names attention layers this model does not have; it has d1,d3,m0,u2"):
        sample(p, inputs)

    ssd = host.make_processing(kind, build_unet(UNetConfig(middle_depth=0), dtype=F64))  # SSD-1B: no middle transformer
    forge.patch_unet(ssd, SegParams(enabled=True, layers="middle"))
    with pytest.raises(ValueError, match=r"'middle' names attention layers .* it has d1,d3,u2,u3,u4,u5"):
        sample(ssd, inputs)

    p = host.make_processing(kind, sd1)
    error = ValueError("SEG scale must be a number in [0, 20], got 99")
    assert forge.patch_unet(p, None, error=error) is None
    forge.patch_unet(p, None, error=error)
    assert len(seg_functions(p)) == 1
    with pytest.raises(ValueError, match=r"SEG scale must be a number in \[0, 20\], got 99"):
        sample(p, inputs)


# --- host attention and other extensions' patches -------------------------------------------------


def test_new_forge_attention_is_the_unets_binding_looked_up_at_call_time(sd1, monkeypatch):
    modules = host.install(monkeypatch, "forge")
    inputs = make_inputs(sd1.config)
    (expected,) = sample(_patched("forge", sd1), inputs)
    p = _patched("forge", sd1)
    seen = []

    def later(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
        seen.append(heads)
        return attention(q, k, v, heads)

    def not_this_one(*_args, **_kwargs):
        raise AssertionError("used backend.attention instead of backend.nn.unet's binding")

    monkeypatch.setattr(modules["backend.nn.unet"], "attention_function", later)  # swapped after patching
    monkeypatch.setattr(modules["backend.attention"], "attention_function", not_this_one)
    (out,) = sample(p, inputs)
    assert seen == [sd1.middle_block[1].transformer_blocks[0].n_heads] and torch.equal(out, expected)


@pytest.mark.parametrize("kind", ["forge-classic", "reforge"])
def test_ldm_patched_attention_looked_up_at_call_time(sd1, monkeypatch, kind):
    modules = host.install(monkeypatch, kind)
    attention_module = modules["ldm_patched.ldm.modules.attention"]
    inputs = make_inputs(sd1.config)
    p = host.make_processing(kind, sd1, attn_precision=torch.float32 if kind == "reforge" else None)
    forge.patch_unet(p, SegParams(enabled=True))
    original, seen = attention_module.optimized_attention, []

    def later(q, k, v, heads, **kwargs):
        seen.append(kwargs)
        return original(q, k, v, heads, **kwargs)

    monkeypatch.setattr(attention_module, "optimized_attention", later)
    sample(p, inputs)
    # reForge hands its per-model attn_precision on; classic Forge's function has no such keyword.
    assert seen == ([{"attn_precision": torch.float32}] if kind == "reforge" else [{}])


def _patched(kind, unet, **params):
    p = host.make_processing(kind, unet)
    forge.patch_unet(p, SegParams(enabled=True, **params))
    return p


@pytest.mark.parametrize("kind", KINDS)
def test_existing_attn1_replace_is_called_with_blurred_queries(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    # float64: the main call (4 rows) and the SEG call (2 rows) may round differently on CPUs
    # (batch-size-dependent kernels), so only a float64 run makes their queries comparable to ~1e-12
    unet = build_unet(TINY_SD1, seed=1, dtype=torch.float64)
    x, *conds = make_inputs(unet.config)
    doubled = [[{**e, "model_conds": {k: v.double() for k, v in e["model_conds"].items()}} for e in c] for c in conds]
    inputs = (x.double(), *doubled)
    received = []

    def other_extension(q, k, v, extra_options):  # e.g. StyleAlign / Reference-only on ("middle", 0)
        received.append((list(extra_options["cond_or_uncond"]), q))
        return attention(q, k, v, extra_options["n_heads"])

    p = host.make_processing(kind, unet)
    p.sd_model.forge_objects.unet.set_model_attn1_replace(other_extension, "middle", 0)
    forge.patch_unet(p, SegParams(enabled=True, blur_sigma=2.0, layers="m0"))
    sample(p, inputs)
    (main_roles, q_main), (seg_roles, q_seg) = received  # another attn1 replace: never batched
    assert (main_roles, seg_roles) == ([1, 0], [0])
    cond_q = q_main[2:]
    assert_within(q_seg, reference_blur(cond_q, 4, 3, 2.0), blur_bound(cond_q, 4, 3, 2.0, cond_q.dtype), "SEG queries")
    assert set(p.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]["attn1"]) == {
        ("middle", 0)
    }


def test_with_replaces_copies_on_write():
    """The attn1 patches go into a copy of the call's transformer options; the patcher's dicts stay as they were."""

    def a(*_):
        return None

    def b(*_):
        return None

    options = {"patches_replace": {"attn1": {("middle", 0): a}, "attn2": {}}, "x": 1}
    snapshot = {"patches_replace": {"attn1": {("middle", 0): a}, "attn2": {}}, "x": 1}
    new = forge.with_replaces(options, {("input", 1, 0): b})
    assert options == snapshot
    assert new["patches_replace"]["attn1"] == {("middle", 0): a, ("input", 1, 0): b}
    assert new["x"] == 1 and new["patches_replace"]["attn2"] == {}
    assert forge.with_replaces({}, {("middle", 0, 0): b}) == {"patches_replace": {"attn1": {("middle", 0, 0): b}}}
