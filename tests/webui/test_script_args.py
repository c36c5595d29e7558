import math

import pytest

from lib_seg.core.params import SegParams
from lib_seg.webui.script_args import UI_ARGS, from_script_args, from_ui, ui_defaults


def test_true_alone_means_on_with_defaults():
    assert from_script_args([True]) == SegParams(enabled=True)
    assert from_script_args([]) == SegParams()


def test_full_positional_list_in_ui_order():
    values = [True, 4.0, False, 12.0, "custom", "d4,m0", 0.1, 0.9, "custom", 2.0, True, 3.0]
    assert len(values) == len(UI_ARGS)
    assert from_ui(values) == SegParams(
        enabled=True,
        scale=4.0,
        blur_sigma=12.0,
        layers="d4,m0",
        start=0.1,
        end=0.9,
        hires_mode="custom",
        hires_scale=2.0,
        hires_blur_sigma=math.inf,
    )


def test_preset_ignores_custom_text_and_infinite_overrides_slider():
    p = from_ui([True, 3.0, True, 55.0, "all", "garbage that is not read"])
    assert p.layers == "all" and math.isinf(p.blur_sigma)


def test_dict_first_takes_precedence_over_ui_defaults_behind_it():
    defaults = [ui_defaults()[name] for name in UI_ARGS]
    assert from_script_args([{"blur_sigma": 10}, *defaults[1:]]) == SegParams(enabled=True, blur_sigma=10)


@pytest.mark.parametrize(
    "values,message",
    [
        ([True, 3.0, True, 10.0, "nowhere"], "layer_preset must be one of middle, input, output, all, custom"),
        ([True, 3.0, "perhaps"], "infinite_blur must be true or false"),
        ([True] * 13, "at most 12 positional args"),
        ([True, 3.0, False, -2.0], "blur_sigma must be a number > 0"),
    ],
)
def test_positional_errors(values, message):
    with pytest.raises(ValueError, match=message):
        from_ui(values)


@pytest.mark.parametrize(
    "params",
    [
        SegParams(),
        SegParams(enabled=True, blur_sigma=7.5, layers="u0.1-3", start=0.2, hires_mode="custom", hires_blur_sigma=2.0),
    ],
)
def test_ui_values_round_trip(params):
    values = ui_defaults(params)
    assert tuple(values) == UI_ARGS
    assert from_ui([values[name] for name in UI_ARGS]) == params


def test_settings_defaults_fill_missing_values_in_both_forms():
    defaults = SegParams(scale=5.0, blur_sigma=20.0, layers="all")
    assert from_script_args([True], defaults) == defaults.replace(enabled=True)
    assert from_script_args([{"end": 0.5}], defaults) == defaults.replace(enabled=True, end=0.5)
