import json
import math

import pytest

from lib_seg.core.params import SegParams
from lib_seg.webui.infotext import KEYS, from_infotext, to_infotext
from tests.support.infotext_fields import parameter_fields


def test_nothing_written_when_off():
    assert to_infotext(SegParams()) == {}


def test_keys_written_when_on():
    text = to_infotext(SegParams(enabled=True), "m0")
    assert text == {
        "SEG scale": "3",
        "SEG blur sigma": "inf",
        "SEG layers": "m0",
        "SEG start": "0",
        "SEG end": "1",
        "SEG hires": "same",
    }
    custom = to_infotext(SegParams(enabled=True, hires_mode="custom", hires_blur_sigma=4.5))
    assert custom["SEG hires scale"] == "3" and custom["SEG hires blur sigma"] == "4.5"
    assert custom["SEG layers"] == "middle"


@pytest.mark.parametrize(
    "params",
    [
        SegParams(enabled=True),
        SegParams(enabled=True, scale=1.25, blur_sigma=10, layers="d4.1,u0", start=0.25, end=0.75),
        SegParams(enabled=True, hires_mode="custom", hires_scale=6, hires_blur_sigma=0.5),
        SegParams(enabled=True, hires_mode="off"),
    ],
)
def test_round_trip(params):
    assert from_infotext(to_infotext(params)) == (params, [])


def test_missing_keys_mean_off():
    assert from_infotext({"Steps": "20", "Sampler": "Euler"}) == (SegParams(), [])


def test_malformed_values_fall_back_with_warnings():
    fields = {"SEG scale": "lots", "SEG blur sigma": "-1", "SEG layers": "x9", "SEG hires": "maybe", "SEG start": "0.5"}
    params, warnings = from_infotext(fields)
    assert params == SegParams(enabled=True, start=0.5)
    assert len(warnings) == 4 and all("using the default" in w for w in warnings)
    assert any("SEG scale: lots" in w for w in warnings)


def test_inverted_window_falls_back_to_default_window():
    params, warnings = from_infotext({"SEG scale": "2", "SEG start": "0.9", "SEG end": "0.1"})
    assert (params.scale, params.start, params.end) == (2.0, 0.0, 1.0)
    assert warnings and "window" in warnings[0]


def test_keys_are_params_fields():
    assert set(KEYS) <= set(SegParams.__dataclass_fields__)
    assert math.isinf(from_infotext({"SEG blur sigma": "inf"})[0].blur_sigma)


def _host_line(fields: dict[str, str]) -> str:
    """The parameters line as A1111 1.10 / Forge / Neo write it: a value with a comma, colon or newline
    becomes a JSON string (``modules/infotext_utils.py`` ``quote``)."""
    quote = lambda v: json.dumps(v) if any(c in v for c in ",:\n") else v  # noqa: E731
    return ", ".join(f"{key}: {quote(value)}" for key, value in fields.items())


@pytest.mark.parametrize("layers", ["m0", "d0,s0", "d7-9,s7-9", "u0.3,m0"])
def test_infotext_fields_read_back_as_the_hosts_quote_them(layers):
    """tests/e2e reads SEG's fields with tests/support/infotext_fields.py: quoted or not, the values return."""
    written = {"Steps": "3", **to_infotext(SegParams(enabled=True, blur_sigma=2.5), layers), "Version": "neo-2.26"}
    parameters = "a prompt, with commas\nNegative prompt: x\n" + _host_line(written)
    fields = parameter_fields(parameters)
    assert fields == written
    assert from_infotext(fields)[0] == SegParams(enabled=True, blur_sigma=2.5, layers=layers)
