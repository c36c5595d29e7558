"""SEG's lines in the generation parameters ("infotext") and reading them back.

Keys are written only when SEG ran, so an image made without SEG pastes as "SEG off".  Reading is
forgiving on purpose: a value someone edited by hand falls back to its default with a warning
instead of breaking the paste.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lib_seg.core.params import SegParams, format_sigma

KEYS = {
    "scale": "SEG scale",
    "blur_sigma": "SEG blur sigma",
    "layers": "SEG layers",
    "start": "SEG start",
    "end": "SEG end",
    "hires_mode": "SEG hires",
    "hires_scale": "SEG hires scale",
    "hires_blur_sigma": "SEG hires blur sigma",
}


def to_infotext(params: SegParams, layers_text: str | None = None) -> dict[str, str]:
    """Infotext entries for ``params``; ``layers_text`` is the canonical spec the adapter resolved."""
    if not params.enabled:
        return {}
    values = {
        "scale": f"{params.scale:g}",
        "blur_sigma": format_sigma(params.blur_sigma),
        "layers": layers_text or params.layers,
        "start": f"{params.start:g}",
        "end": f"{params.end:g}",
        "hires_mode": params.hires_mode,
    }
    if params.hires_mode == "custom":
        values["hires_scale"] = f"{params.hires_scale:g}"
        values["hires_blur_sigma"] = format_sigma(params.hires_blur_sigma)
    return {KEYS[field]: value for field, value in values.items()}


def from_infotext(fields: Mapping[str, Any]) -> tuple[SegParams, list[str]]:
    """Params from parsed infotext, plus warnings for values that fell back to their default.

    Without any SEG key the result is SEG off.  Each value is validated on its own and then the
    whole (a start after the end resets both to the default window).
    """
    if not any(key in fields for key in KEYS.values()):
        return SegParams(), []
    accepted: dict[str, Any] = {"enabled": True}
    warnings: list[str] = []
    for field, key in KEYS.items():
        if key not in fields:
            continue
        try:
            SegParams(**{**_window_safe(field), field: fields[key]})
        except ValueError as error:
            warnings.append(f"ignored infotext '{key}: {fields[key]}' ({error}); using the default")
            continue
        accepted[field] = fields[key]
    try:
        return SegParams(**accepted), warnings
    except ValueError as error:
        default = SegParams()
        accepted.update(start=default.start, end=default.end)
        warnings.append(f"ignored infotext SEG start/end ({error}); using the default window")
        return SegParams(**accepted), warnings


def _window_safe(field: str) -> dict[str, float]:
    """Checking start alone must not fail on the default end (and vice versa)."""
    return {"end": 1.0} if field == "start" else {"start": 0.0} if field == "end" else {}
