"""Smoothed Energy Guidance: the WebUI script (UI, infotext, and the calls of one adapter protocol,
:mod:`lib_seg.webui.hosts`, which knows the hosts).

Everything else lives in ``lib_seg``: the WebUI puts this extension's folder on ``sys.path`` while it
loads the scripts, so the package imports from here.
"""

from __future__ import annotations

import logging

import gradio as gr
from modules import script_callbacks, scripts, shared

from lib_seg.webui import infotext, script_args, xyz
from lib_seg.webui import ui as seg_ui
from lib_seg.webui.hosts import on_cfg_denoiser, webui_adapter

try:
    from modules.ui_components import InputAccordion
except ImportError:  # pragma: no cover - hosts older than A1111 1.7
    InputAccordion = None

log = logging.getLogger("sd_webui_seg")
STATE_ATTR = "_seg_state"


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
        params, error, layer_text = webui_adapter().prepare(p, params)
        setattr(p, STATE_ATTR, (params, error))
        if layer_text is not None:
            p.extra_generation_params.update(infotext.to_infotext(params, layer_text))

    def process_before_every_sampling(self, p, *args, **kwargs):
        params, error = getattr(p, STATE_ATTR, (None, None))
        if params is None and error is None:
            return
        cmd_opts = getattr(shared, "cmd_opts", None)
        layer_text = webui_adapter().before_sampling(p, params, error, shared.opts, cmd_opts)
        if layer_text is not None and not p.is_hr_pass:
            p.extra_generation_params.update(infotext.to_infotext(params, layer_text))

    def postprocess(self, p, *args):
        webui_adapter().after_sampling(p)


def _on_before_ui():
    module = xyz.find_xyz_module(scripts.scripts_data)
    if module is not None:
        xyz.add_axes(module)


script_callbacks.on_ui_settings(lambda: seg_ui.register_settings(shared, gr))
script_callbacks.on_before_ui(_on_before_ui)
script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
