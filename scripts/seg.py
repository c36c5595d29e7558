"""Smoothed Energy Guidance: the WebUI script (UI, infotext, dispatch to the host adapter).

Everything else lives in ``lib_seg``: the WebUI puts this extension's folder on ``sys.path`` while it
loads the scripts, so the package imports from here.
"""

from __future__ import annotations

import logging

import gradio as gr
from modules import script_callbacks, scripts, shared

from lib_seg.a1111 import adapter as a1111
from lib_seg.webui import infotext, script_args, xyz
from lib_seg.webui import ui as seg_ui

try:
    from modules.ui_components import InputAccordion
except ImportError:  # pragma: no cover - hosts older than A1111 1.7
    InputAccordion = None

log = logging.getLogger("sd_webui_seg")
STATE_ATTR = "_seg_state"


def _forge():
    """The Forge-family adapter if this host is Forge, new Forge or reForge, else None."""
    try:
        from lib_seg.forge import adapter as forge
    except ImportError:
        return None
    return forge if forge.host_kind() else None


class SmoothedEnergyGuidanceScript(scripts.Script):
    sorting_priority = 13.5  # Forge: next to the built-in SAG (12.5) and PAG (13) guidance tools

    def title(self):
        return seg_ui.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        defaults = seg_ui.defaults_from_opts(shared.opts)
        components, self.infotext_fields = seg_ui.build(gr, InputAccordion, lambda item: f"seg-{tab}-{item}", defaults)
        self.paste_field_names = list(seg_ui.PASTE_FIELD_NAMES)
        return components

    def process(self, p, *args):
        for key in infotext.KEYS.values():  # X/Y/Z cells share this dict
            p.extra_generation_params.pop(key, None)
        params, error = None, None
        try:
            params = script_args.from_script_args(args, seg_ui.defaults_from_opts(shared.opts))
            params = xyz.apply_overrides(params, p)
        except ValueError as exc:
            error = exc
            message = str(exc) if str(exc).startswith("SEG") else f"SEG: {exc}"  # messages name their field
            log.error("%s (the generation will fail with this message)", message)
        setattr(p, STATE_ATTR, (params, error))
        if params is None or not params.enabled:
            return
        forge = _forge()
        if forge is None:
            reason = a1111.unsupported_reason(p.sd_model, _custom_unet())
            if reason:
                log.warning("SEG is off for this model: %s", reason)
                setattr(p, STATE_ATTR, (None, None))
                return
            try:
                layer_text = a1111.layer_text(p.sd_model, params.layers)
            except ValueError as exc:
                setattr(p, STATE_ATTR, (None, exc))
                return
            p.extra_generation_params.update(infotext.to_infotext(params, layer_text))

    def process_before_every_sampling(self, p, *args, **kwargs):
        params, error = getattr(p, STATE_ATTR, (None, None))
        if params is None and error is None:
            return
        forge = _forge()
        if forge is not None:
            batch_rows = bool(getattr(shared.opts, seg_ui.BATCH_ROWS_SETTING, True))
            layer_text = forge.patch_unet(p, params, error, batch_rows)
            if layer_text is not None and not p.is_hr_pass:
                p.extra_generation_params.update(infotext.to_infotext(params, layer_text))
            return
        denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
        if denoiser is not None:
            is_sdxl = bool(getattr(p.sd_model, "is_sdxl", False))
            batch_rows = seg_ui.batch_rows_allowed(shared.opts, getattr(shared, "cmd_opts", None), is_sdxl)
            hr = bool(getattr(p, "is_hr_pass", False))
            a1111.attach(denoiser, a1111.SegRun(params, is_hr_pass=hr, error=error, batch_rows=batch_rows))

    def postprocess(self, p, processed, *args):
        a1111.detach(getattr(getattr(p, "sampler", None), "model_wrap_cfg", None))


def _custom_unet():
    try:
        from modules import sd_unet
    except ImportError:
        return None
    return getattr(sd_unet, "current_unet", None)


def _on_before_ui():
    module = xyz.find_xyz_module(scripts.scripts_data)
    if module is not None:
        xyz.add_axes(module)


script_callbacks.on_ui_settings(lambda: seg_ui.register_settings(shared, gr))
script_callbacks.on_before_ui(_on_before_ui)
script_callbacks.on_cfg_denoiser(a1111.on_cfg_denoiser)
