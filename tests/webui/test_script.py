"""scripts/seg.py loaded as the WebUI loads it, against tests/support/webui_modules.py, with real
gradio building its UI and the A1111 CFGDenoiser imitation running its SEG pass."""

import math
from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from lib_seg.a1111 import adapter as a1111
from lib_seg.webui.script_args import UI_ARGS, ui_defaults
from tests.a1111.test_a1111_adapter import has_hooks, make_inputs
from tests.support import webui_modules
from tests.support.a1111_host import CFGDenoiser, FakeSDModel
from tests.support.unet import TINY_SD1, build_unet


@pytest.fixture
def host():
    parts = webui_modules.install_fake_modules()
    parts.module = webui_modules.load_script()
    yield parts
    webui_modules.uninstall_fake_modules()


@pytest.fixture(scope="module")
def sd_model():
    return FakeSDModel(build_unet(TINY_SD1, seed=3))


def make_p(sd_model, is_hr_pass=False):
    return SimpleNamespace(sd_model=sd_model, extra_generation_params={}, is_hr_pass=is_hr_pass, sampler=None)


def default_args():
    return [ui_defaults()[name] for name in UI_ARGS]


def build_ui(host, is_img2img=False):
    script = host.module.SmoothedEnergyGuidanceScript()
    with gr.Blocks():
        components = script.ui(is_img2img)
    return script, components


def test_title_show_and_registered_callbacks(host):
    script = host.module.SmoothedEnergyGuidanceScript()
    assert script.title() == "Smoothed Energy Guidance"
    assert script.show(False) is host.scripts.AlwaysVisible
    assert {k: len(v) for k, v in host.callbacks.items()} == {
        "on_ui_settings": 1,
        "on_before_ui": 1,
        "on_cfg_denoiser": 1,
    }


def test_ui_components_follow_ui_args_and_defaults(host):
    _, components = build_ui(host)
    assert len(components) == len(UI_ARGS)
    assert isinstance(components[0], webui_modules.InputAccordion) and components[0].value is False
    values = {name: component.value for name, component in zip(UI_ARGS, components, strict=True)}
    assert values == ui_defaults()
    assert components[3].interactive is False  # sigma slider disabled while infinite blur is on
    ids = {c.elem_id for c in components}
    assert "seg-txt2img-scale" in ids and "seg-txt2img-enabled-checkbox" in ids


def test_settings_registered_and_used_as_ui_defaults(host):
    for callback in host.callbacks["on_ui_settings"]:
        callback()
    labels = host.shared.opts.data_labels
    assert set(labels) == {
        "seg_default_scale",
        "seg_default_blur_sigma",
        "seg_default_layers",
        "seg_default_hires_mode",
        "seg_batch_rows",
    }
    assert all(info.section == ("seg", "Smoothed Energy Guidance") for info in labels.values())
    host.shared.opts.seg_default_blur_sigma = "12"
    host.shared.opts.seg_default_layers = "all"
    host.shared.opts.seg_default_scale = 99  # invalid: ignored with a warning
    _, components = build_ui(host, is_img2img=True)
    values = {name: component.value for name, component in zip(UI_ARGS, components, strict=True)}
    assert (values["infinite_blur"], values["blur_sigma"], values["layer_preset"], values["scale"]) == (
        False,
        12.0,
        "all",
        3.0,
    )


def test_paste_fields(host):
    script, components = build_ui(host)
    fields = dict((component, getter) for component, getter in script.infotext_fields)
    by_name = dict(zip(UI_ARGS, components, strict=True))
    pasted = {
        "SEG scale": "2",
        "SEG blur sigma": "7.5",
        "SEG layers": "d4,m0",
        "SEG start": "0",
        "SEG end": "1",
        "SEG hires": "custom",
        "SEG hires scale": "4",
        "SEG hires blur sigma": "inf",
    }
    got = {name: fields[by_name[name]](pasted) for name in UI_ARGS}
    assert got == {
        "enabled": True,
        "scale": 2.0,
        "infinite_blur": False,
        "blur_sigma": 7.5,
        "layer_preset": "custom",
        "custom_layers": "d4,m0",
        "start": 0.0,
        "end": 1.0,
        "hires_mode": "custom",
        "hires_scale": 4.0,
        "hires_infinite_blur": True,
        "hires_blur_sigma": 10.0,
    }
    without = {name: fields[by_name[name]]({"Steps": "20"}) for name in UI_ARGS}
    assert without["enabled"] is False and all(v is None for k, v in without.items() if k != "enabled")
    assert fields[by_name["scale"]]({"SEG scale": "bogus"}) == 3.0  # falls back, no exception
    assert set(script.paste_field_names) >= {"SEG scale", "SEG blur sigma", "SEG layers"}


def test_process_writes_infotext_only_when_enabled(host, sd_model):
    script = host.module.SmoothedEnergyGuidanceScript()
    p = make_p(sd_model)
    p.extra_generation_params["SEG scale"] = "stale"  # an X/Y/Z cell before this one
    script.process(p, *default_args())
    assert "SEG scale" not in p.extra_generation_params
    script.process(p, True, 3.0, False, 10.0, "custom", "d3,m0")
    assert p.extra_generation_params == {
        "SEG scale": "3",
        "SEG blur sigma": "10",
        "SEG layers": "d3,m0",
        "SEG start": "0",
        "SEG end": "1",
        "SEG hires": "same",
    }
    script.process(p, {"blur_sigma": "inf"})
    assert p.extra_generation_params["SEG layers"] == "middle"


def run_job(host, sd_model, args, steps=2, batch_rows=True):
    host.shared.opts.seg_batch_rows = batch_rows
    script = host.module.SmoothedEnergyGuidanceScript()
    p = make_p(sd_model)
    denoiser = CFGDenoiser(sd_model, p=p, callbacks=host.callbacks["on_cfg_denoiser"])
    denoiser.total_steps = steps
    p.sampler = SimpleNamespace(model_wrap_cfg=denoiser)
    script.process(p, *args)
    script.process_before_every_sampling(p, *args, x=None, noise=None, c=None, uc=None)
    inputs = make_inputs(sd_model.model.diffusion_model.config)
    try:
        with torch.no_grad():
            outs = [denoiser(**inputs) for _ in range(steps)]
    finally:
        script.postprocess(p, None, *args)
    assert "combine_denoised" not in vars(denoiser) and not hasattr(denoiser, a1111.RUN_ATTR)
    return outs, p


@pytest.mark.parametrize("batch_rows", [True, False])
def test_job_off_on_and_next_job_unchanged(host, sd_model, batch_rows):
    baseline, _ = run_job(host, sd_model, default_args())
    with_seg, p = run_job(host, sd_model, [{"enabled": True}], batch_rows=batch_rows)
    assert p.sampler.model_wrap_cfg.__dict__.get("_seg_run") is None
    after, _ = run_job(host, sd_model, default_args())
    assert all(torch.equal(a, b) for a, b in zip(baseline, after, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(baseline, with_seg, strict=True))
    assert p.extra_generation_params["SEG blur sigma"] == "inf"
    assert not has_hooks(sd_model.model.diffusion_model)


@pytest.mark.parametrize(
    "args,message",
    [
        ([{"enabled": True, "sigma": 3}], r"unknown setting\(s\) 'sigma'"),
        ([{"scale": 50}], r"SEG scale must be a number in \[0, 20\]"),
        ([{"layers": "d2"}], r"'d2' names attention layers this model does not have; it has d1,d3,m0"),
    ],
)
def test_bad_args_fail_inside_sampling_and_leave_nothing_behind(host, sd_model, args, message):
    with pytest.raises(ValueError, match=message):
        run_job(host, sd_model, args)
    baseline, _ = run_job(host, sd_model, default_args())
    again, _ = run_job(host, sd_model, default_args())
    assert all(torch.equal(a, b) for a, b in zip(baseline, again, strict=True))
    assert not has_hooks(sd_model.model.diffusion_model)


def test_unsupported_model_is_left_untouched(host, sd_model):
    script = host.module.SmoothedEnergyGuidanceScript()
    unet, sd_model.model.diffusion_model = sd_model.model.diffusion_model, torch.nn.Linear(4, 4)  # neither UNet nor DiT
    try:
        p = make_p(sd_model)
        script.process(p, True)
        assert p.extra_generation_params == {}
        p.sampler = SimpleNamespace(model_wrap_cfg=CFGDenoiser(sd_model, p=p))
        script.process_before_every_sampling(p, True)
        assert not hasattr(p.sampler.model_wrap_cfg, a1111.RUN_ATTR)
    finally:
        sd_model.model.diffusion_model = unet


def test_xyz_overrides_reach_the_job(host, sd_model):
    script = host.module.SmoothedEnergyGuidanceScript()
    p = make_p(sd_model)
    p.seg_xyz_enabled, p.seg_xyz_blur_sigma = "true", "4"
    script.process(p, *default_args())
    params, error = p._seg_state
    assert error is None and params.enabled and math.isclose(params.blur_sigma, 4.0)


def test_batch_rows_allowed():
    from lib_seg.webui.ui import batch_rows_allowed

    opts = SimpleNamespace(seg_batch_rows=True, batch_cond_uncond=True)
    assert batch_rows_allowed(opts, SimpleNamespace(), is_sdxl=False)
    assert not batch_rows_allowed(opts, SimpleNamespace(medvram=True), is_sdxl=False)
    assert not batch_rows_allowed(opts, SimpleNamespace(lowvram=True), is_sdxl=False)
    assert not batch_rows_allowed(opts, SimpleNamespace(medvram_sdxl=True), is_sdxl=True)
    assert batch_rows_allowed(opts, SimpleNamespace(medvram_sdxl=True), is_sdxl=False)
    assert not batch_rows_allowed(SimpleNamespace(seg_batch_rows=False), None, is_sdxl=False)
    assert not batch_rows_allowed(SimpleNamespace(batch_cond_uncond=False), None, is_sdxl=False)


@pytest.mark.parametrize("batch_rows", [True, False])
def test_forge_dispatch_follows_the_batch_rows_setting(host, monkeypatch, batch_rows):
    """On a Forge-family host the script installs on the UNet patcher, with the model-function
    wrapper only when the setting allows SEG rows in the main call (tests/support/forge_host.py)."""
    from lib_seg.forge import adapter as forge
    from tests.support import forge_host

    forge_host.install(monkeypatch, "forge")
    host.shared.opts.seg_batch_rows = batch_rows
    script = host.module.SmoothedEnergyGuidanceScript()
    p = forge_host.make_processing("forge", build_unet(TINY_SD1, seed=3))
    p.extra_generation_params = {}
    script.process(p, {"enabled": True})
    script.process_before_every_sampling(p, {"enabled": True}, x=None, noise=None, c=None, uc=None)
    options = p.sd_model.forge_objects.unet.model_options
    assert forge.has_seg(p.sd_model.forge_objects.unet)
    assert ("model_function_wrapper" in options) == batch_rows
    assert p.extra_generation_params["SEG layers"] == "middle"
