"""lib_seg.core.blocks: DiT block specs, presets, ranges, validation against the model's blocks."""

import pytest

from lib_seg.core.blocks import (
    canonical_spec,
    check_spec_syntax,
    default_layers,
    format_layers,
    model_layers,
    resolve_layers,
)
from tests.support.blocks import d, j, s

# Flux.1's, SD3.5 Medium's and SD3.5 Large's blocks (the released models' are the families' facts,
# tests/dit/test_released.py)
FLUX, SD35M, SD35L = model_layers(double=19, single=38), model_layers(joint=24), model_layers(joint=38)


def test_model_layers():
    assert FLUX == d(*range(19)) + s(*range(38))
    assert SD35M == j(*range(24)) and SD35L == j(*range(38))
    assert model_layers(double=2, joint=1) == (*d(0, 1), *j(0))
    with pytest.raises(ValueError, match="single block count"):
        model_layers(single=-1)


def test_presets():
    assert resolve_layers("double", FLUX) == d(*range(19))
    assert resolve_layers("single", FLUX) == s(*range(38))
    assert resolve_layers("all", FLUX) == FLUX
    assert resolve_layers("joint", SD35L) == SD35L == resolve_layers("ALL", SD35L)


def test_items_ranges_lists_case_and_spaces():
    assert resolve_layers("d7-9", FLUX) == d(7, 8, 9)
    assert resolve_layers(" S37 , d0 ", FLUX) == (*d(0), *s(37))
    assert resolve_layers("s9,s7-8,d7-9,s8", FLUX) == (*d(7, 8, 9), *s(7, 8, 9))  # sorted, unique
    assert resolve_layers("double,d3", FLUX) == d(*range(19))
    assert resolve_layers("j7-9", SD35M) == j(7, 8, 9)
    assert resolve_layers("j0-37", SD35L) == SD35L


@pytest.mark.parametrize("spec", ["d19", "s30-38", "j0", "joint", "d18-19"])
def test_flux_errors_list_its_blocks(spec):
    with pytest.raises(ValueError, match=r"^SEG layers: .* names blocks this model does not have; it has d0-18,s0-37$"):
        resolve_layers(spec, FLUX)


@pytest.mark.parametrize("spec", ["j24", "d7", "single", "double,j1"])
def test_sd3_errors_list_its_blocks(spec):
    with pytest.raises(ValueError, match=r"does not have; it has j0-23$"):
        resolve_layers(spec, SD35M)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "SEG layers: the block list is empty"),
        (" , ", "SEG layers: the block list is empty"),
        ("m0", "SEG layers: cannot read 'm0'; use presets double, single, joint, layer, block, all"),
        ("d", "cannot read 'd'"),
        ("d7.2", "cannot read"),
        ("d-1", "cannot read"),
        ("input", "cannot read 'input'"),  # UNet presets other than the default mean nothing on a DiT
        ("d9-7", "SEG layers: range 9-7 is empty"),
    ],
)
def test_syntax_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        check_spec_syntax(spec)
    with pytest.raises(ValueError, match=match):
        resolve_layers(spec, FLUX)


def test_model_without_blocks():
    with pytest.raises(ValueError, match="SEG layers: this model has no transformer blocks"):
        resolve_layers("all", ())


def test_format_and_round_trip():
    assert format_layers(d(7, 8, 9) + s(7, 8, 9)) == "d7-9,s7-9"
    assert format_layers((*j(3), *j(1), *j(2), *j(5))) == "j1-3,j5"
    for spec in ["d0,d2-4,s37", "all", "single", "d18,s0-1"]:
        layers = resolve_layers(spec, FLUX)
        assert resolve_layers(format_layers(layers), FLUX) == layers


def test_canonical_spec():
    assert check_spec_syntax(" D7-9 , Single ") == "d7-9,single"
    assert canonical_spec("Double", FLUX) == "double"
    assert canonical_spec("d9,d8,d7, s7-9", FLUX) == "d7-9,s7-9"
    with pytest.raises(ValueError, match="does not have"):
        canonical_spec("joint", FLUX)


@pytest.mark.parametrize(
    "counts,expected",
    [((0, 0, 2), "j1"), ((0, 0, 9), "j4"), ((2, 3, 0), "d1,s1"), ((8, 38, 0), "d4,s19"), ((10, 10, 0), "d7-9,s7-9")],
)
def test_the_default_on_smaller_models_is_the_middle_block_of_each_stream(counts, expected):
    """A family's published default where the model has its blocks, else the middle of each stream."""
    available = model_layers(*counts)
    released = "j7-9" if counts[2] else "d7-9,s7-9"
    assert default_layers(available, released) == expected
    assert default_layers(model_layers(10, 10, 0)) == "d5,s5"  # no published default (Flux.2)
    assert format_layers(resolve_layers("middle,all", available)) == format_layers(available)
