"""The WebUI controls of SEG (gradio 3.41 in A1111/reForge, gradio 4 in Forge), settings and paste.

Host pieces are passed in (gradio module, A1111's ``InputAccordion``, the script's ``elem_id``), so
this module imports no WebUI code and tests build the real components with real gradio.  Every
control's value feeds one positional script argument, in :data:`lib_seg.webui.script_args.UI_ARGS` order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from lib_seg.core.params import HIRES_MODES, SCALE_RANGE, SegParams
from lib_seg.webui import infotext
from lib_seg.webui.script_args import LAYER_PRESETS, SLIDER_SIGMA_RANGE, UI_ARGS, ui_defaults

log = logging.getLogger("sd_webui_seg")

TITLE = "Smoothed Energy Guidance"
SETTINGS_SECTION = ("seg", TITLE)
# key, SegParams field, label, component kind, component args
SETTINGS: tuple[tuple[str, str, str, str, dict], ...] = (
    (
        "seg_default_scale",
        "scale",
        "Default SEG scale",
        "slider",
        {"minimum": SCALE_RANGE[0], "maximum": SCALE_RANGE[1], "step": 0.1},
    ),
    (
        "seg_default_blur_sigma",
        "blur_sigma",
        "Default blur sigma (a number > 0, or inf for infinite blur)",
        "textbox",
        {},
    ),
    (
        "seg_default_layers",
        "layers",
        "Default layers (preset or block list, e.g. middle, or m0,d4,u3; SDXL also u0.3 = transformer 3 of u0; "
        "on a DiT, middle = Flux/Chroma d7-9,s7-9, Flux.2-Klein 4B d2,s10 / 9B d4,s12, SD3 j7-9)",
        "textbox",
        {},
    ),
    ("seg_default_hires_mode", "hires_mode", "Default hires-fix mode", "radio", {"choices": list(HIRES_MODES)}),
)


BATCH_ROWS_SETTING = "seg_batch_rows"
BATCH_ROWS_LABEL = (
    "Run the SEG rows inside the main UNet call when the host batches cond and uncond together "
    "(faster; more VRAM; A1111: never with --medvram/--lowvram; Forge/reForge: when its memory estimate allows)"
)


def register_settings(shared: Any, gr: Any) -> None:
    """Add the settings section (call from ``on_ui_settings``)."""
    kinds = {"slider": gr.Slider, "textbox": gr.Textbox, "radio": gr.Radio}
    default = SegParams()
    for key, field, label, kind, args in SETTINGS:
        value = getattr(default, field)
        value = "inf" if field == "blur_sigma" else value
        option = shared.OptionInfo(value, label, kinds[kind], args, section=SETTINGS_SECTION)
        shared.opts.add_option(key, option)
    option = shared.OptionInfo(True, BATCH_ROWS_LABEL, gr.Checkbox, {}, section=SETTINGS_SECTION)
    shared.opts.add_option(BATCH_ROWS_SETTING, option)


def batch_rows_allowed(opts: Any, cmd_opts: Any, is_sdxl: bool) -> bool:
    """Batched SEG rows need the host's single cond+uncond call and the memory for 1.5x its rows."""
    low_memory = getattr(cmd_opts, "lowvram", False) or getattr(cmd_opts, "medvram", False)
    low_memory = low_memory or (is_sdxl and getattr(cmd_opts, "medvram_sdxl", False))
    wanted = getattr(opts, BATCH_ROWS_SETTING, True) and getattr(opts, "batch_cond_uncond", True)
    return bool(wanted) and not low_memory


def defaults_from_opts(opts: Any) -> SegParams:
    """The user's defaults; a setting that fails validation is ignored with a warning, never fatal."""
    params = SegParams()
    for key, field, *_ in SETTINGS:
        value = getattr(opts, key, None)
        if value is None:
            continue
        try:
            params = params.replace(**{field: value})
        except ValueError as error:
            log.warning("SEG: ignoring setting %s=%r (%s)", key, value, error)
    return params


def paste_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Control values to set when an infotext is pasted.

    Without SEG keys only the enable box changes (to off); malformed values fall back to defaults with
    a warning (see :func:`lib_seg.webui.infotext.from_infotext`).
    """
    params, warnings = infotext.from_infotext(fields)
    for warning in warnings:
        log.warning("SEG: %s", warning)
    if not params.enabled:
        return {"enabled": False}
    return ui_defaults(params)


def _sigma_controls(gr: Any, elem_id: Callable[[str], str], start: Mapping[str, Any], prefix: str):
    """The "infinite blur" checkbox and the sigma slider it disables (main pass or ``hires_``)."""
    label = "Hires " if prefix else ""
    with gr.Row():
        infinite = gr.Checkbox(
            value=start[f"{prefix}infinite_blur"],
            label=f"{label}Infinite blur".capitalize(),
            elem_id=elem_id(f"{prefix}infinite"),
        )
        sigma = gr.Slider(
            *SLIDER_SIGMA_RANGE,
            step=0.5,
            value=start[f"{prefix}blur_sigma"],
            label=f"{label}Blur sigma".capitalize(),
            interactive=not start[f"{prefix}infinite_blur"],
            elem_id=elem_id(f"{prefix}sigma"),
        )
    return infinite, sigma


def build(gr: Any, input_accordion: Any, elem_id: Callable[[str], str], defaults: SegParams):
    """Create the controls; returns (components in UI_ARGS order, infotext paste fields)."""
    start = ui_defaults(defaults)
    with input_accordion(False, label=TITLE, elem_id=elem_id("enabled")) as enabled:
        scale = gr.Slider(*SCALE_RANGE, step=0.1, value=start["scale"], label="SEG scale", elem_id=elem_id("scale"))
        infinite, sigma = _sigma_controls(gr, elem_id, start, "")
        with gr.Row():
            preset = gr.Dropdown(
                list(LAYER_PRESETS), value=start["layer_preset"], label="Layers", elem_id=elem_id("layer_preset")
            )
            custom = gr.Textbox(
                value=start["custom_layers"],
                label="Custom layers",
                placeholder="e.g. m0,d4,u3 (SDXL u0.3 = transformer 3 of u0; Flux d7-9,s7-9; Klein d2,s10; SD3 j7-9)",
                visible=start["layer_preset"] == "custom",
                elem_id=elem_id("custom_layers"),
            )
        with gr.Row():
            first = gr.Slider(0.0, 1.0, step=0.01, value=start["start"], label="Start", elem_id=elem_id("start"))
            last = gr.Slider(0.0, 1.0, step=0.01, value=start["end"], label="End", elem_id=elem_id("end"))
        hires_mode = gr.Radio(
            list(HIRES_MODES), value=start["hires_mode"], label="Hires fix pass", elem_id=elem_id("hires_mode")
        )
        with gr.Group(visible=start["hires_mode"] == "custom") as hires_group:
            hires_scale = gr.Slider(
                *SCALE_RANGE,
                step=0.1,
                value=start["hires_scale"],
                label="Hires SEG scale",
                elem_id=elem_id("hires_scale"),
            )
            hires_infinite, hires_sigma = _sigma_controls(gr, elem_id, start, "hires_")
    for source, target, update in (
        (infinite, sigma, lambda checked: gr.update(interactive=not checked)),
        (hires_infinite, hires_sigma, lambda checked: gr.update(interactive=not checked)),
        (preset, custom, lambda value: gr.update(visible=value == "custom")),
        (hires_mode, hires_group, lambda value: gr.update(visible=value == "custom")),
    ):
        source.change(update, inputs=[source], outputs=[target], show_progress=False)
    components = [
        enabled,
        scale,
        infinite,
        sigma,
        preset,
        custom,
        first,
        last,
        hires_mode,
        hires_scale,
        hires_infinite,
        hires_sigma,
    ]
    paste_fields = [(component, _paste_getter(name)) for name, component in zip(UI_ARGS, components, strict=True)]
    return components, paste_fields


def _paste_getter(name: str):
    def get(fields: Mapping[str, Any]) -> Any:
        if name == "enabled":
            return paste_values(fields)["enabled"]
        params, _ = infotext.from_infotext(fields)
        return ui_defaults(params)[name] if params.enabled else None

    return get


PASTE_FIELD_NAMES = tuple(infotext.KEYS.values())
