"""SEG axes for the WebUI's built-in X/Y/Z plot script.

The X/Y/Z script copies ``p`` per cell and calls each axis' ``apply(p, value, values)``; AlwaysOn
scripts then run with the same script args for every cell.  So our axes only set attributes on the
cell's ``p`` and the script reads them back in ``process`` as overrides of its own settings.  The
axes must be added before the X/Y/Z script builds its UI, i.e. from ``on_before_ui``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lib_seg.core.params import SegParams

ATTR_PREFIX = "seg_xyz_"
AXES: tuple[tuple[str, str, type, Callable[[], list[str]] | None], ...] = (
    ("enabled", "[SEG] Enabled", str, lambda: ["true", "false"]),
    ("scale", "[SEG] Scale", float, None),
    ("blur_sigma", "[SEG] Blur sigma", str, None),
    ("layers", "[SEG] Layers", str, None),
    ("start", "[SEG] Start", float, None),
    ("end", "[SEG] End", float, None),
)


def _setter(field: str):
    def apply(p: Any, value: Any, _values: Any) -> None:
        setattr(p, ATTR_PREFIX + field, value)

    return apply


def add_axes(xyz_module: Any) -> int:
    """Append our axes to ``xyz_grid.axis_options`` once; returns how many were added."""
    existing = {getattr(option, "label", None) for option in xyz_module.axis_options}
    added = 0
    for field, label, kind, choices in AXES:
        if label in existing:
            continue
        xyz_module.axis_options.append(xyz_module.AxisOption(label, kind, _setter(field), choices=choices))
        added += 1
    return added


def find_xyz_module(scripts_data: Any) -> Any | None:
    """The loaded ``xyz_grid.py`` module among the host's ``scripts.scripts_data``, if any."""
    for data in scripts_data:
        if getattr(data.script_class, "__module__", None) == "xyz_grid.py":
            return data.module
    return None


def apply_overrides(params: SegParams, p: Any) -> SegParams:
    """Settings with this cell's axis values applied (validated like any other input)."""
    changes = {field: getattr(p, ATTR_PREFIX + field) for field, *_ in AXES if hasattr(p, ATTR_PREFIX + field)}
    return params.replace(**changes) if changes else params
