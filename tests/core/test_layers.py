import pytest

from lib_seg.core.layers import (
    MODEL_LAYERS,
    LayerKey,
    canonical_spec,
    check_spec_syntax,
    format_layers,
    layer_from_module_name,
    layers_from_module_names,
    resolve_layers,
)
from lib_seg.core.params import SegParams

SD1, SDXL = MODEL_LAYERS["sd1"], MODEL_LAYERS["sdxl"]


def test_presets():
    assert resolve_layers("middle", SD1) == (LayerKey("middle", 0, 0),)
    assert resolve_layers("mid", SDXL) == tuple(LayerKey("middle", 0, t) for t in range(10))
    assert {k.part for k in resolve_layers("down", SDXL)} == {"input"}
    assert len(resolve_layers("output", SDXL)) == 36
    assert resolve_layers("all", SDXL) == SDXL and len(SDXL) == 70
    assert len(resolve_layers("all", SD1)) == 16


def test_block_items_and_ranges():
    assert resolve_layers("d4", SDXL) == (LayerKey("input", 4, 0), LayerKey("input", 4, 1))
    assert resolve_layers("u0.3", SDXL) == (LayerKey("output", 0, 3),)
    assert resolve_layers("d7.2-9", SDXL) == tuple(LayerKey("input", 7, t) for t in range(2, 10))
    assert resolve_layers("d4-5", SD1) == (LayerKey("input", 4, 0), LayerKey("input", 5, 0))
    assert resolve_layers(" M0 , d1 ", SD1) == (LayerKey("input", 1, 0), LayerKey("middle", 0, 0))
    assert resolve_layers("m0,middle", SD1) == (LayerKey("middle", 0, 0),)  # unique


@pytest.mark.parametrize("spec", ["d2", "d4.2", "u0.9-10", "d4-6", "m1", "d0-1"])
def test_missing_layers_list_the_valid_ones(spec):
    with pytest.raises(ValueError, match="does not have; it has d4,d5,d7,d8,m0,u0,u1,u2,u3,u4,u5"):
        resolve_layers(spec, SDXL)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "empty"),
        (" , ", "empty"),
        ("x1", "cannot read"),
        ("d", "cannot read"),
        ("d5-4", "range 5-4 is empty"),
        ("d4.3-1", "range 3-1 is empty"),
    ],
)
def test_syntax_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        check_spec_syntax(spec)
    with pytest.raises(ValueError, match=match):
        resolve_layers(spec, SDXL)


def test_model_without_middle_attention():
    ssd1b = tuple(k for k in SDXL if k.part != "middle")  # SSD-1B drops the middle transformers
    with pytest.raises(ValueError, match="'middle' names attention layers this model does not have"):
        resolve_layers("middle", ssd1b)
    with pytest.raises(ValueError, match="no self-attention"):
        resolve_layers("middle", ())


@pytest.mark.parametrize("spec", ["m0", "d4.1,u0.3-4", "d7-8.2-9", "all", "u5,d4.0", "d7.0,d7.2,d7.4-6", "output"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_parse_format_parse_round_trip(spec, family):
    available = MODEL_LAYERS[family]
    try:
        keys = resolve_layers(spec, available)
    except ValueError:
        pytest.skip("spec not valid on this family")
    text = format_layers(keys, available)
    assert resolve_layers(text, available) == keys
    assert format_layers(resolve_layers(text, available), available) == text


def test_format_collapses_whole_blocks_only_when_known():
    keys = resolve_layers("m0", SDXL)
    assert format_layers(keys, SDXL) == "m0"
    assert format_layers(keys) == "m0.0-9"
    assert format_layers(resolve_layers("d7.0,d7.2,d7.4-6", SDXL), SDXL) == "d7.0,d7.2,d7.4-6"


def test_canonical_spec():
    assert canonical_spec("Mid", SDXL) == "middle"
    assert canonical_spec("u0.0-9, d4", SDXL) == "d4,u0"
    with pytest.raises(ValueError):
        canonical_spec("middle", ())


def test_module_names():
    assert layer_from_module_name("middle_block.1.transformer_blocks.3.attn1") == LayerKey("middle", 0, 3)
    assert layer_from_module_name("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1") == (
        LayerKey("input", 4, 0)
    )
    assert layer_from_module_name("output_blocks.11.1.transformer_blocks.0.attn1") == LayerKey("output", 11, 0)
    assert layer_from_module_name("output_blocks.11.1.transformer_blocks.0.attn2") is None
    assert layer_from_module_name("output_blocks.11.1.transformer_blocks.0.attn1.to_q") is None
    names = [
        "output_blocks.3.1.transformer_blocks.0.attn1",
        "input_blocks.1.1.transformer_blocks.0.attn1",
        "middle_block.1.transformer_blocks.0.attn1",
        "input_blocks.1.1.transformer_blocks.0.attn1",
    ]
    assert layers_from_module_names(names) == (
        LayerKey("input", 1, 0),
        LayerKey("middle", 0, 0),
        LayerKey("output", 3, 0),
    )


def test_the_default_middle_selects_the_middle_block_on_every_family():
    """``middle`` (the paper's default, :class:`SegParams`' default layers) is the middle block's
    self-attention: one layer on SD1/SD2, all ten of SDXL's middle transformer."""
    for family in ("sd1", "sd2", "sdxl"):
        assert {key.part for key in resolve_layers(SegParams().layers, MODEL_LAYERS[family])} == {"middle"}
    assert len(resolve_layers("middle", SDXL)) == 10
