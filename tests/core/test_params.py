import math

import pytest

from lib_seg.core.params import FIELDS, SegParams, format_sigma, from_dict, parse_sigma


def test_defaults_are_the_papers():
    p = SegParams()
    assert (p.enabled, p.scale, p.blur_sigma, p.layers, p.start, p.end, p.hires_mode) == (
        False,
        3.0,
        math.inf,
        "middle",
        0.0,
        1.0,
        "same",
    )


@pytest.mark.parametrize(
    "value,expected",
    [
        ("inf", math.inf),
        ("Infinite", math.inf),
        (" INF ", math.inf),
        (10, 10.0),
        ("2.5", 2.5),
        (9999, 9999.0),
        (10000, math.inf),
        (math.inf, math.inf),
        (1e7, math.inf),
    ],
)
def test_sigma_inputs(value, expected):
    assert parse_sigma("blur_sigma", value) == expected


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"scale": -0.1}, r"SEG scale must be a number in \[0, 20\]"),
        ({"scale": 20.5}, r"SEG scale must be a number in \[0, 20\]"),
        ({"scale": "x"}, r"SEG scale must be a number"),
        ({"scale": True}, r"SEG scale must be a number"),
        ({"blur_sigma": 0}, r"SEG blur_sigma must be a number > 0 or 'inf'"),
        ({"blur_sigma": "nan"}, r"SEG blur_sigma must be a number > 0"),
        ({"blur_sigma": None}, r"SEG blur_sigma must be a number > 0"),
        ({"hires_blur_sigma": -3}, r"SEG hires_blur_sigma must be a number > 0"),
        ({"start": 1.2}, r"SEG start must be a number in \[0, 1\]"),
        ({"end": -1}, r"SEG end must be a number in \[0, 1\]"),
        ({"start": 0.8, "end": 0.2}, r"SEG start \(0.8\) must not be after SEG end \(0.2\)"),
        ({"hires_mode": "sometimes"}, r"SEG hires_mode must be one of same, off, custom"),
        ({"hires_scale": 99}, r"SEG hires_scale must be a number in \[0, 20\]"),
        ({"layers": "q7"}, r"SEG layers: cannot read 'q7'"),
        ({"enabled": "maybe"}, r"SEG enabled must be true or false"),
    ],
)
def test_validation_names_field_and_range(changes, message):
    with pytest.raises(ValueError, match=message):
        SegParams(**changes)


def test_from_dict_named_values():
    p = from_dict({"scale": 5, "blur_sigma": "inf", "layers": "M0, d4"})
    assert p.enabled is True and p.scale == 5.0 and p.layers == "m0,d4" and math.isinf(p.blur_sigma)
    assert from_dict({"enabled": False}).enabled is False
    assert from_dict({}) == SegParams(enabled=True)


def test_from_dict_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) 'sigma'.*known: enabled, scale"):
        from_dict({"sigma": 3})
    assert FIELDS == (
        "enabled",
        "scale",
        "blur_sigma",
        "layers",
        "start",
        "end",
        "hires_mode",
        "hires_scale",
        "hires_blur_sigma",
    )


def test_for_pass_hires_modes():
    p = SegParams(enabled=True, scale=2.0, blur_sigma=4.0, hires_scale=5.0, hires_blur_sigma=math.inf)
    assert p.for_pass(False) == (2.0, 4.0)
    assert p.for_pass(True) == (2.0, 4.0)
    assert p.replace(hires_mode="off").for_pass(True) is None
    assert p.replace(hires_mode="off").for_pass(False) == (2.0, 4.0)
    assert p.replace(hires_mode="custom").for_pass(True) == (5.0, math.inf)
    assert p.replace(hires_mode="custom", hires_scale=0).for_pass(True) is None
    assert p.replace(enabled=False).for_pass(False) is None
    assert p.replace(scale=0).for_pass(False) is None


def test_frozen_and_format():
    with pytest.raises(AttributeError):
        SegParams().scale = 1  # type: ignore[misc]
    assert format_sigma(math.inf) == "inf" and format_sigma(2.5) == "2.5"


def test_from_dict_uses_given_defaults():
    defaults = SegParams(scale=4.0, layers="d4")
    assert from_dict({"start": 0.1}, defaults) == SegParams(enabled=True, scale=4.0, layers="d4", start=0.1)
