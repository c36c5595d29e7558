"""All user settings of SEG in one validated, frozen value.

Every entry point (UI, API, infotext, XYZ) builds a :class:`SegParams`; construction validates, so an
adapter never sees a bad value.  Errors name the field and the allowed range, in the words the README
and the API use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lib_seg.core import blocks as dit_layers
from lib_seg.core import blur, layers, schedule

SCALE_RANGE = (0.0, 20.0)
HIRES_MODES = ("same", "off", "custom")
INFINITY_WORDS = ("inf", "infinite", "infinity", "∞")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def parse_bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError(f"SEG {field} must be true or false, got {value!r}")


def parse_number(field: str, value: Any, low: float, high: float) -> float:
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, AttributeError):
        number = math.nan
    if isinstance(value, bool) or math.isnan(number) or not low <= number <= high:
        raise ValueError(f"SEG {field} must be a number in [{low:g}, {high:g}], got {value!r}")
    return number


def parse_sigma(field: str, value: Any) -> float:
    """Blur sigma: a number > 0, or 'inf'/'infinite'; anything above 9999 means infinite blur."""
    if isinstance(value, str) and value.strip().lower() in INFINITY_WORDS:
        return math.inf
    try:
        sigma = blur.check_sigma(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"SEG {field} must be a number > 0 or 'inf' (infinite blur), got {value!r}") from None
    if isinstance(value, bool):
        raise ValueError(f"SEG {field} must be a number > 0 or 'inf' (infinite blur), got {value!r}")
    return math.inf if blur.is_infinite_sigma(sigma) else sigma


def check_layer_syntax(spec: Any) -> str:
    """A layer spec any model could accept: UNet layers (``middle``, ``d4``, ``u0.3``) or DiT blocks
    (``d7-9,s7-9``, ``j7-9``).  Which one it means is decided against the loaded model."""
    try:
        return layers.check_spec_syntax(spec)
    except ValueError as unet_error:
        try:
            return dit_layers.check_spec_syntax(spec)
        except ValueError:
            letters = ", ".join(f"{letter} ({kind})" for letter, kind in dit_layers.KIND_OF_LETTER.items())
            raise ValueError(
                f"{unet_error}; on a diffusion transformer use presets {', '.join(dit_layers.PRESETS)} or blocks "
                f"named by a letter and an index or range, {letters}: e.g. d7-9, s7-9, j7-9, l15, b20"
            ) from None


def format_sigma(sigma: float) -> str:
    return "inf" if math.isinf(sigma) else f"{sigma:g}"


@dataclass(frozen=True)
class SegParams:
    """SEG settings.  ``layers`` is a spec (see :mod:`lib_seg.core.layers`), checked for syntax here and
    against the model by the adapter; ``hires_*`` apply to the hires-fix pass when mode is custom."""

    enabled: bool = False
    scale: float = 3.0
    blur_sigma: float = math.inf
    layers: str = "middle"
    start: float = 0.0
    end: float = 1.0
    hires_mode: str = "same"
    hires_scale: float = 3.0
    hires_blur_sigma: float = math.inf

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "enabled", parse_bool("enabled", self.enabled))
        set_(self, "scale", parse_number("scale", self.scale, *SCALE_RANGE))
        set_(self, "blur_sigma", parse_sigma("blur_sigma", self.blur_sigma))
        set_(self, "layers", check_layer_syntax(self.layers))
        start = parse_number("start", self.start, 0.0, 1.0)
        end = parse_number("end", self.end, 0.0, 1.0)
        set_(self, "start", schedule.check_window(start, end)[0])
        set_(self, "end", end)
        mode = str(self.hires_mode).strip().lower()
        if mode not in HIRES_MODES:
            raise ValueError(f"SEG hires_mode must be one of {', '.join(HIRES_MODES)}, got {self.hires_mode!r}")
        set_(self, "hires_mode", mode)
        set_(self, "hires_scale", parse_number("hires_scale", self.hires_scale, *SCALE_RANGE))
        set_(self, "hires_blur_sigma", parse_sigma("hires_blur_sigma", self.hires_blur_sigma))

    def for_pass(self, is_hr_pass: bool) -> tuple[float, float] | None:
        """(seg_scale, sigma) for the first pass or the hires pass; None where SEG must not run."""
        if not self.enabled or (is_hr_pass and self.hires_mode == "off"):
            return None
        custom = is_hr_pass and self.hires_mode == "custom"
        scale, sigma = (self.hires_scale, self.hires_blur_sigma) if custom else (self.scale, self.blur_sigma)
        return None if scale == 0.0 else (scale, sigma)

    def replace(self, **changes: Any) -> SegParams:
        return dataclasses.replace(self, **changes)


FIELDS = tuple(field.name for field in dataclasses.fields(SegParams))


def from_dict(values: Mapping[str, Any], defaults: SegParams | None = None) -> SegParams:
    """Named settings (API): keys are the field names; missing keys take ``defaults``.

    ``enabled`` defaults to true here: a request that sends SEG settings means to use them.  An
    unknown key is an error, because a typo would otherwise silently fall back to a default.
    """
    unknown = [key for key in values if key not in FIELDS]
    if unknown:
        raise ValueError(f"SEG: unknown setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
    return (defaults or SegParams()).replace(**{"enabled": True, **values})
