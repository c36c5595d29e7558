"""XYZ axes against an imitation of scripts/xyz_grid.py (A1111 v1.10.1): ``axis_options`` list and
``AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0, choices=None, prepare=None)``."""

import copy
import math
from types import SimpleNamespace

import pytest

from lib_seg.core.params import SegParams
from lib_seg.webui import xyz


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.choices = label, type, apply, choices


def fake_xyz_module():
    return SimpleNamespace(axis_options=[AxisOption("Nothing", str, lambda p, x, xs: None)], AxisOption=AxisOption)


def test_axes_added_once():
    module = fake_xyz_module()
    assert xyz.add_axes(module) == 6
    assert xyz.add_axes(module) == 0
    labels = [o.label for o in module.axis_options]
    assert labels[1:] == [
        "[SEG] Enabled",
        "[SEG] Scale",
        "[SEG] Blur sigma",
        "[SEG] Layers",
        "[SEG] Start",
        "[SEG] End",
    ]
    assert module.axis_options[1].choices() == ["true", "false"]


def test_cells_override_script_settings_per_copy():
    module = fake_xyz_module()
    xyz.add_axes(module)
    options = {o.label: o for o in module.axis_options}
    p = SimpleNamespace()
    cells = []
    for sigma in ["inf", "10"]:
        for enabled in ["true", "false"]:
            cell = copy.copy(p)  # xyz_grid copies p shallowly per cell
            options["[SEG] Blur sigma"].apply(cell, options["[SEG] Blur sigma"].type(sigma), None)
            options["[SEG] Enabled"].apply(cell, enabled, None)
            cells.append(xyz.apply_overrides(SegParams(enabled=False, scale=2.0), cell))
    assert [(c.enabled, c.blur_sigma) for c in cells] == [
        (True, math.inf),
        (False, math.inf),
        (True, 10.0),
        (False, 10.0),
    ]
    assert all(c.scale == 2.0 for c in cells)
    assert xyz.apply_overrides(SegParams(), p) == SegParams()


def test_bad_axis_value_is_a_named_error():
    cell = SimpleNamespace(seg_xyz_start=1.5)
    with pytest.raises(ValueError, match=r"SEG start must be a number in \[0, 1\]"):
        xyz.apply_overrides(SegParams(), cell)


def test_find_xyz_module():
    module = object()
    data = [
        SimpleNamespace(script_class=type("S", (), {"__module__": "other.py"}), module=None),
        SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=module),
    ]
    assert xyz.find_xyz_module(data) is module
    assert xyz.find_xyz_module(data[:1]) is None
