"""SEG rows in the Forge-family main UNet call (lib_seg/forge_rows.py and the adapter's wrapper), driven
through the imitation of the hosts' batching loop in tests/support/forge_host.py (classic Forge
4a9c8f32 / new Forge dfdcbab ``calc_cond_uncond_batch``, reForge 3b56b26 ``_calc_cond_batch``: reverse
order, memory-limited chunking, ``model_function_wrapper(apply_model, {"input", "timestep", "c",
"cond_or_uncond"})``, ControlNet ``get_control`` before the wrapper)."""

from __future__ import annotations

import sys

import pytest
import torch

from lib_seg.core.params import SegParams
from lib_seg.forge import adapter as forge
from lib_seg.forge import host as forge_host
from lib_seg.forge import rows as forge_rows
from tests.support import forge_host as host
from tests.support.forge_host import make_inputs
from tests.support.tolerance import assert_network_close
from tests.support.unet import TINY_SD1, build_unet

KINDS = host.KINDS
SIGMAS = torch.tensor([6.0, 2.5, 0.0], dtype=torch.float64)


def run(kind, unet, inputs, batch_rows, params=None, cond_scale=7.0, before=None, after=None):
    """Sample two steps; returns the denoiser outputs and the row count of every UNet call."""
    p = host.make_processing(kind, unet)
    if before is not None:
        p.sd_model.forge_objects.unet.set_model_sampler_post_cfg_function(before)
    forge.patch_unet(p, params or SegParams(enabled=True, blur_sigma=2.0, layers="d1,m0"), batch_rows=batch_rows)
    if after is not None:
        p.sd_model.forge_objects.unet.set_model_sampler_post_cfg_function(after)
    x, cond, uncond = inputs
    outs = p.sampler.sample(x, SIGMAS, cond, uncond, cond_scale)
    return outs, p.sd_model.forge_objects.unet.model.rows


def assert_same(batched, separate):
    for a, b in zip(batched, separate, strict=True):
        assert_network_close(a, b)


# --- the batched main call --------------------------------------------------------------------------


@pytest.mark.parametrize("cond_scale", [7.0, 1.0])
@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_separate_in_one_call_per_step(sd1, monkeypatch, kind, cond_scale):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    separate, separate_rows = run(kind, sd1, inputs, False, cond_scale=cond_scale)
    batched, batched_rows = run(kind, sd1, inputs, True, cond_scale=cond_scale)
    assert_same(batched, separate)
    main = 4 if cond_scale != 1.0 else 2
    assert separate_rows == [main, 2] * 2  # main call, then the cond-only SEG call
    assert batched_rows == [main + 2] * 2  # one call per step holding the SEG rows


@pytest.mark.parametrize("kind", KINDS)
def test_and_prompts_with_strengths_and_sdxl_conds(sdxl, monkeypatch, kind):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sdxl.config, entries=2, strengths=(0.7, 1.3), height=7, width=15)
    params = SegParams(enabled=True, blur_sigma=2.0, layers="d3,m0")
    separate, _ = run(kind, sdxl, inputs, False, params=params)
    batched, rows = run(kind, sdxl, inputs, True, params=params)
    assert_same(batched, separate)
    assert rows == [6 + 4] * 2  # two cond chunks, one uncond chunk, two SEG chunks


@pytest.mark.parametrize("kind", KINDS)
def test_area_conds_in_separate_calls_fall_back_exactly(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    x, cond, uncond = make_inputs(sd1.config, entries=2)
    cond[1]["area"] = (8, 6, 2, 1)  # a regional prompt: its own call (different crop size)
    separate, _ = run(kind, sd1, (x, cond, uncond), False)
    batched, rows = run(kind, sd1, (x, cond, uncond), True)
    assert_same(batched, separate)
    # step 1: the first call got SEG rows, the replay was refused, the separate pass made; step 2: no rows
    assert rows == [6, 2, 2, 2, 4, 2, 2, 2]


@pytest.mark.parametrize("kind", KINDS)
def test_memory_estimate_refuses_the_larger_call(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    margin = 1.5 if kind == "reforge" else 1.0
    monkeypatch.setattr(host.get_free_memory, "free", int(4 * 2**20 * margin) + 1)  # 4 rows fit, 6 do not
    separate, separate_rows = run(kind, sd1, inputs, False)
    batched, batched_rows = run(kind, sd1, inputs, True)
    assert batched_rows == separate_rows == [4, 2] * 2
    assert_same(batched, separate)


@pytest.mark.parametrize("kind", KINDS)
def test_host_split_main_call_falls_back(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    margin = 1.5 if kind == "reforge" else 1.0
    monkeypatch.setattr(host.get_free_memory, "free", int(2 * 2**20 * margin) + 1)  # one chunk per call
    separate, separate_rows = run(kind, sd1, inputs, False)
    batched, batched_rows = run(kind, sd1, inputs, True)
    assert separate_rows == batched_rows == [2, 2, 2] * 2  # uncond, cond, SEG: nothing added
    assert_same(batched, separate)


@pytest.mark.parametrize("kind", KINDS)
def test_controlnet_rows_are_copied_and_not_recomputed(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    x, cond, uncond = make_inputs(sd1.config)
    control = host.Control(sd1.config.model_channels * sd1.config.channel_mult[-1])
    for entry in cond + uncond:
        entry["control"] = control
    separate, _ = run(kind, sd1, (x, cond, uncond), False)
    separate_calls, control.calls = control.calls, []
    batched, rows = run(kind, sd1, (x, cond, uncond), True)
    assert_same(batched, separate)
    assert separate_calls == [4, 2] * 2 and control.calls == [4] * 2  # the replay runs no ControlNet
    assert rows == [6] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_another_extensions_passes_are_never_batched(sd1, monkeypatch, kind):
    """A PAG-like post-CFG function making its own cond pass, before and after SEG's."""
    modules = host.install(monkeypatch, kind)

    def extra_pass(args):
        if kind == "reforge":
            calc = modules["ldm_patched.modules.samplers"].calc_cond_batch
            cond_pred = calc(args["model"], [args["cond"]], args["input"], args["sigma"], args["model_options"])[0]
        else:
            name = "backend.sampling.sampling_function" if kind in host.BACKEND else "ldm_patched.modules.samplers"
            calc = modules[name].calc_cond_uncond_batch
            cond_pred = calc(args["model"], args["cond"], None, args["input"], args["sigma"], args["model_options"])[0]
        return args["denoised"] + 0.5 * (args["cond_denoised"] - cond_pred)

    inputs = make_inputs(sd1.config)
    for where in ("before", "after"):
        separate, _ = run(kind, sd1, inputs, False, **{where: extra_pass})
        batched, rows = run(kind, sd1, inputs, True, **{where: extra_pass})
        assert_same(batched, separate)
        assert rows == [6, 2] * 2  # main call with the SEG rows, the other pass as it was


@pytest.mark.parametrize("kind", KINDS)
def test_an_existing_model_function_wrapper_is_kept(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    seen = []

    def theirs(apply_model, args):
        seen.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    p = host.make_processing(kind, sd1)
    p.sd_model.forge_objects.unet.set_model_unet_function_wrapper(theirs)
    forge.patch_unet(p, SegParams(enabled=True, blur_sigma=2.0), batch_rows=True)
    assert p.sd_model.forge_objects.unet.model_options["model_function_wrapper"] is theirs
    x, cond, uncond = make_inputs(sd1.config)
    p.sampler.sample(x, SIGMAS, cond, uncond, 7.0)
    assert seen == [4, 2] * 2  # separate pass through their wrapper, no SEG rows


@pytest.mark.parametrize("kind", KINDS)
def test_no_rows_outside_the_window_and_reinstall_replaces_the_wrapper(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    params = SegParams(enabled=True, blur_sigma=2.0, start=0.5, end=1.0)
    plain, _ = run(kind, sd1, inputs, True, params=SegParams(enabled=False))
    outs, rows = run(kind, sd1, inputs, True, params=params)
    assert rows == [4, 6]  # step 0 is outside the window
    assert torch.equal(outs[0], plain[0]) and not torch.equal(outs[1], plain[1])
    p = host.make_processing(kind, sd1)
    forge.patch_unet(p, params)
    forge.patch_unet(p, params)  # hires: the hook runs twice on the same patcher
    options = p.sd_model.forge_objects.unet.model_options
    assert getattr(options["model_function_wrapper"], forge.SEG_MARK)
    assert sum(getattr(f, forge.SEG_MARK, False) for f in options["sampler_post_cfg_function"]) == 1
    forge.patch_unet(p, SegParams(enabled=False))
    assert not forge.has_seg(p.sd_model.forge_objects.unet)


# --- the pieces -------------------------------------------------------------------------------------


def call_args(flags=(1, 0), chunk=2, **extra):
    rows = chunk * len(flags)
    x = torch.arange(rows, dtype=torch.float32)[:, None, None, None].expand(rows, 4, 3, 3).clone()
    c = {
        "c_crossattn": torch.arange(rows, dtype=torch.float32)[:, None, None].expand(rows, 5, 8).clone(),
        "transformer_options": {"cond_or_uncond": list(flags), "sigmas": torch.ones(chunk), **extra},
    }
    return {"input": x, "timestep": torch.ones(rows), "c": c, "cond_or_uncond": list(flags)}


def test_batched_call_appends_one_copy_per_cond_chunk():
    args = call_args(flags=(1, 0, 0), cond_mark=None, cond_indices=[], uncond_indices=[], uuids=["u", "a", "b"])
    args["c"]["y"] = torch.arange(6, dtype=torch.float32)[:, None]
    args["c"]["control"] = {"middle": [torch.arange(6.0)[:, None, None, None], None], "input": [torch.ones(1, 3)]}
    args["c"]["control_model"] = object()
    before = dict(args["c"]["transformer_options"])
    call = forge_rows.batched_call(args)
    order = [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
    assert call.main_rows == 6 and call.input[:, 0, 0, 0].tolist() == order
    assert call.c["c_crossattn"][:, 0, 0].tolist() == order and call.c["y"][:, 0].tolist() == order
    assert call.c["control"]["middle"][0].flatten().tolist() == order and call.c["control"]["middle"][1] is None
    assert call.c["control"]["input"][0].shape == (1, 3)  # broadcast residual left as it is
    assert call.c["control_model"] is args["c"]["control_model"]
    options = call.c["transformer_options"]
    assert options["cond_or_uncond"] == [1, 0, 0, 0, 0] and options["uuids"] == ["u", "a", "b", "a", "b"]
    assert options["cond_mark"].tolist() == [1, 1] + [0] * 8
    assert options["cond_indices"] == list(range(2, 10)) and options["uncond_indices"] == [0, 1]
    assert forge_rows.SEG_ROWS not in options and "patches_replace" not in options  # the target blurs
    assert args["c"]["transformer_options"] == before  # the host's dict is not touched


def test_the_patched_unet_blurs_the_seg_rows_of_a_call_by_attn1_patches(sd1):
    """The Forge UNet target puts one attn1 patch per chosen layer and the SEG rows into a copy of the
    call's options; an attn1 replace already there for the key is wrapped, not dropped."""
    from lib_seg.core.layers import LayerKey
    from lib_seg.forge.patches import PatchedUnet

    other = {("output", 3, 0): print}
    options = {"patches_replace": {"attn1": dict(other)}, "cond_or_uncond": [1, 0]}
    keys = (LayerKey("middle", 0, 0), LayerKey("output", 3, 0))
    with PatchedUnet(sd1, "forge").blurring(keys, 2.0, slice(6, 10), None, options) as seg_options:
        assert seg_options[forge_rows.SEG_ROWS] == (6, 10)
        assert set(seg_options["patches_replace"]["attn1"]) == {tuple(k) for k in keys}
        assert seg_options["patches_replace"]["attn1"][("output", 3, 0)] is not print
    assert options == {"patches_replace": {"attn1": other}, "cond_or_uncond": [1, 0]}  # copy on write


@pytest.mark.parametrize(
    "change",
    [
        lambda a: a.update(cond_or_uncond=[1, 1]),  # no cond chunk
        lambda a: a["c"].update(c_unknown=torch.zeros(4)),  # a conditioning we cannot copy
        lambda a: a["c"].update(y=torch.zeros(3, 2)),  # rows we cannot tell
        lambda a: a["c"]["transformer_options"].update(patches_replace={"attn1": {("middle", 0): print}}),
        lambda a: a["c"]["transformer_options"].update(patches={"attn2_patch": [print]}),
    ],
)
def test_batched_call_refuses_what_it_cannot_account_for(change):
    args = call_args()
    change(args)
    assert forge_rows.batched_call(args) is None


def test_block_level_patches_do_not_block_batching():
    args = call_args()
    args["c"]["transformer_options"]["patches"] = {"output_block_patch": [print]}  # FreeU-like, per row
    assert forge_rows.batched_call(args) is not None


def test_replay_serves_the_kept_rows_once_and_only_for_the_same_chunks():
    kept = forge_rows.KeptRows(3, torch.Size([2, 4, 3, 3]), torch.randn(4, 4, 3, 3))
    wrapper = forge_rows.replay_wrapper(kept)
    args = {"input": torch.zeros(4, 4, 3, 3), "cond_or_uncond": [0, 0]}
    assert wrapper(None, args) is kept.outputs
    with pytest.raises(forge_rows.ReplayMismatch):
        wrapper(None, args)  # a second call: the host split what the main call held together
    for bad in ({"input": torch.zeros(2, 4, 3, 3), "cond_or_uncond": [0]}, {**args, "cond_or_uncond": [0, 1]}):
        with pytest.raises(forge_rows.ReplayMismatch):
            forge_rows.replay_wrapper(kept)(None, bad)
    with pytest.raises(forge_rows.ReplayMismatch):
        forge_rows.replay_wrapper(kept)(None, {"input": torch.zeros(4, 4, 5, 3), "cond_or_uncond": [0, 0]})


def test_memory_check_needs_the_hosts_functions(monkeypatch):
    host.install(monkeypatch, "forge")
    model = host.BaseModel(build_unet(TINY_SD1, seed=1))
    assert forge_host.fits_in_memory("forge", model, (6, 4, 8, 8), torch.device("cpu"))
    monkeypatch.setattr(host.get_free_memory, "free", 6 * 2**20 * 1.5)  # the 1.5 margin is not met
    assert not forge_host.fits_in_memory("forge", model, (6, 4, 8, 8), torch.device("cpu"))
    assert not forge_host.fits_in_memory("forge", object(), (6, 4, 8, 8), torch.device("cpu"))
    monkeypatch.delitem(sys.modules, "backend.memory_management")
    assert not forge_host.fits_in_memory("forge", model, (1, 4, 8, 8), torch.device("cpu"))


def batched_with_first_layer_rows(kind, unet, inputs, params):
    """A batched run, and the rows the first layer of input block 1 computed on in each UNet call
    (read from its output, which the prefix hooks leave slim: only the block's last layer widens)."""
    seen = []
    handle = unet.input_blocks[1][0].register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    try:
        batched, rows = run(kind, unet, inputs, True, params=params)
    finally:
        handle.remove()
    return batched, rows, seen


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_before_the_first_blurred_block_is_computed_once(sd1, monkeypatch, kind):
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    params = SegParams(enabled=True, blur_sigma=2.0, layers="m0")
    separate, _ = run(kind, sd1, inputs, False, params=params)
    batched, rows, seen = batched_with_first_layer_rows(kind, sd1, inputs, params)
    assert rows == [6, 6] and seen == [4, 4]  # the down path ran without the SEG rows
    assert_same(batched, separate)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in sd1.modules())


@pytest.mark.parametrize("blocker", ["inner_modifier", "patched_forward"])
def test_prefix_reuse_falls_back_to_full_rows(sd1, monkeypatch, blocker):
    host.install(monkeypatch, "forge")
    inputs = make_inputs(sd1.config)
    params = SegParams(enabled=True, blur_sigma=2.0, layers="m0")
    separate, _ = run("forge", sd1, inputs, False, params=params)
    if blocker == "patched_forward":  # another extension wrapped the UNet's forward on the instance
        monkeypatch.setattr(sd1, "forward", sd1.forward)
    else:  # new Forge's block_inner_modifiers see every row of every layer
        patch_unet = forge.patch_unet

        def with_modifier(p, *args, **kwargs):
            p.sd_model.forge_objects.unet.model_options["transformer_options"]["block_inner_modifiers"] = [print]
            return patch_unet(p, *args, **kwargs)

        monkeypatch.setattr(forge, "patch_unet", with_modifier)
    batched, rows, seen = batched_with_first_layer_rows("forge", sd1, inputs, params)
    assert rows == [6, 6] and seen == [6, 6]
    assert_same(batched, separate)


def test_no_prefix_reuse_for_a_single_seg_row(sd1, monkeypatch):
    host.install(monkeypatch, "forge")
    inputs = make_inputs(sd1.config, images=1)
    params = SegParams(enabled=True, blur_sigma=2.0, layers="m0")
    separate, _ = run("forge", sd1, inputs, False, params=params)
    batched, rows, seen = batched_with_first_layer_rows("forge", sd1, inputs, params)
    assert rows == [3, 3] and seen == [3, 3]
    assert_same(batched, separate)


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_memory_in_the_batched_call_falls_back_for_the_pass(sd1, monkeypatch, kind, caplog):
    """The host's estimate said it fits, the card disagreed: that step and the rest of the pass go on
    with the separate SEG call, same result."""
    host.install(monkeypatch, kind)
    inputs = make_inputs(sd1.config)
    separate, _ = run(kind, sd1, inputs, False)
    host.small_card(monkeypatch, max_rows=4)
    batched, rows = run(kind, sd1, inputs, True)
    assert rows == [6, 4, 2, 4, 2]  # the failed try once, then main and SEG calls
    assert_same(batched, separate)
    assert "out of memory with the SEG rows" in caplog.text


def test_comfyui_lumina_conds_ride_along():
    """ComfyUI's Lumina 2 / Z-Image conds (model_base.py:1224-1235, hiddenswitch/pip-and-uv-installable-ComfyUI
    87606c5f): ``num_tokens`` is one int every row of the call shares; ``attention_mask`` has one row per row."""
    args = call_args(flags=(1, 0, 0))
    args["c"]["num_tokens"] = 37
    args["c"]["attention_mask"] = torch.arange(6)[:, None].expand(6, 5)
    call = forge_rows.batched_call(args)
    assert call.c["num_tokens"] == 37
    assert call.c["attention_mask"][:, 0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
    args["c"]["num_tokens"] = "37"  # anything else that is no tensor still refuses
    assert forge_rows.batched_call(args) is None
