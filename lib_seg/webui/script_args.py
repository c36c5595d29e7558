"""The script's positional arguments (UI order) and how they map to :class:`SegParams`.

The WebUI hands an AlwaysOn script its components' values in UI order; API callers send the same
list in ``alwayson_scripts``.  This module is that contract, written once, so the UI, the API table
in the README and the tests cannot drift apart.  The blur sigma is two controls in the UI (a slider
and an "infinite blur" checkbox), and the layers are a preset dropdown plus a text field for
``custom``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lib_seg.core.params import SegParams, from_dict, parse_bool

UI_ARGS = (
    "enabled",
    "scale",
    "infinite_blur",
    "blur_sigma",
    "layer_preset",
    "custom_layers",
    "start",
    "end",
    "hires_mode",
    "hires_scale",
    "hires_infinite_blur",
    "hires_blur_sigma",
)
LAYER_PRESETS = ("middle", "input", "output", "all", "custom")
SLIDER_SIGMA_RANGE = (0.5, 100.0)
DEFAULT_SLIDER_SIGMA = 10.0


def ui_defaults(params: SegParams | None = None) -> dict[str, Any]:
    """Control values that show ``params`` (defaults when None)."""
    params = params or SegParams()
    preset = params.layers if params.layers in LAYER_PRESETS else "custom"
    return {
        "enabled": params.enabled,
        "scale": params.scale,
        "infinite_blur": math.isinf(params.blur_sigma),
        "blur_sigma": _slider_sigma(params.blur_sigma),
        "layer_preset": preset,
        "custom_layers": params.layers if preset == "custom" else "",
        "start": params.start,
        "end": params.end,
        "hires_mode": params.hires_mode,
        "hires_scale": params.hires_scale,
        "hires_infinite_blur": math.isinf(params.hires_blur_sigma),
        "hires_blur_sigma": _slider_sigma(params.hires_blur_sigma),
    }


def _slider_sigma(sigma: float) -> float:
    return DEFAULT_SLIDER_SIGMA if math.isinf(sigma) else sigma


def from_ui(values: Sequence[Any], defaults: SegParams | None = None) -> SegParams:
    """Params from positional values in :data:`UI_ARGS` order; a short list keeps the defaults."""
    if len(values) > len(UI_ARGS):
        raise ValueError(f"SEG takes at most {len(UI_ARGS)} positional args ({', '.join(UI_ARGS)}), got {len(values)}")
    ui = {**ui_defaults(defaults), **dict(zip(UI_ARGS, values, strict=False))}
    preset = str(ui["layer_preset"]).strip().lower()
    if preset not in LAYER_PRESETS:
        raise ValueError(f"SEG layer_preset must be one of {', '.join(LAYER_PRESETS)}, got {ui['layer_preset']!r}")
    infinite = parse_bool("infinite_blur", ui["infinite_blur"])
    hires_infinite = parse_bool("hires_infinite_blur", ui["hires_infinite_blur"])
    return SegParams(
        enabled=ui["enabled"],
        scale=ui["scale"],
        blur_sigma=math.inf if infinite else ui["blur_sigma"],
        layers=ui["custom_layers"] if preset == "custom" else preset,
        start=ui["start"],
        end=ui["end"],
        hires_mode=ui["hires_mode"],
        hires_scale=ui["hires_scale"],
        hires_blur_sigma=math.inf if hires_infinite else ui["hires_blur_sigma"],
    )


def from_script_args(values: Sequence[Any], defaults: SegParams | None = None) -> SegParams:
    """What the host passes the script: UI values, or one dict of named values first (API).

    ``defaults`` are the user's settings-page defaults; the UI controls start from them too, so a
    short positional list and a dict with missing keys mean the same thing.
    """
    if values and isinstance(values[0], Mapping):
        return from_dict(values[0], defaults)
    return from_ui(values, defaults)
