"""The released models the DiT families know (their own facts, lib_seg.dit.families.released_models): every
model's default resolves on its blocks; Flux/Chroma and SD3 get their published defaults, the others the
middle block (PiD: the middle patch block)."""

import pytest

from lib_seg.core.blocks import canonical_spec, format_layers, model_layers, resolve_layers
from lib_seg.dit.families import FAMILIES, released_models
from lib_seg.dit.families.flux import FLUX1
from lib_seg.dit.families.mmdit import MMDIT
from tests.support.blocks import d, j, s

RELEASED = {name: (family, layers) for family, name, layers in released_models()}
FLUX, SD35M = RELEASED["flux"][1], RELEASED["sd3.5-medium"][1]
MIDDLE_OF_RELEASED = {
    **{"z-image-turbo": "l15", "neta-lumina": "l13", "krea-2": "s14", "ernie-image": "l18", "pid": "j7"},
    **{"ernie-image-turbo": "l18", "qwen-image": "j30", "qwen-image-edit": "j30", "qwen-image-2.1": "s16"},
    **{"wan2.1-t2v-1.3b": "b15", "wan2.1-t2v-14b": "b20", "wan2.1-i2v-14b": "b20", "wan2.2-t2v-a14b": "b20"},
    **{"wan2.2-i2v-a14b": "b20", "wan2.2-ti2v-5b": "b15", "anima": "b14", "anima-2.9b": "b20", "anima-3.8b": "b26"},
}


def test_every_family_states_its_released_models_once():
    names = [name for _, name, _ in released_models()]
    assert len(names) == len(set(names)) == len(RELEASED)  # no model under two families (nor inherited twice)
    for family in FAMILIES:
        assert family.released, f"{family.name} names no released model"
        for name, counts in family.released.items():
            assert set(counts) <= set(family.kinds) and all(count > 0 for count in counts.values()), name
            assert RELEASED[name] == (family, model_layers(**counts))
    assert "sdxl" not in RELEASED and "sd1" not in RELEASED  # UNets are no released DiT


def test_released_blocks():
    assert FLUX == d(*range(19)) + s(*range(38))
    assert RELEASED["chroma"] == (FLUX1, FLUX)
    assert SD35M == j(*range(24)) and RELEASED["sd3"] == (MMDIT, SD35M) and RELEASED["sd3.5-large"][1] == j(*range(38))
    assert RELEASED["flux2-klein-4b"][1] == d(*range(5)) + s(*range(20))
    assert RELEASED["pid"][1] == model_layers(joint=14, block=2)


@pytest.mark.parametrize("model", list(RELEASED))
def test_defaults_resolve_on_their_family(model):
    family, blocks = RELEASED[model]
    layers = resolve_layers(family.default_for(blocks), blocks)
    if model in ("flux", "chroma"):
        assert layers == (*d(7, 8, 9), *s(7, 8, 9))  # ComfyUI SkipLayerGuidanceDiT default
    elif model == "flux2-klein-4b":  # 5 + 20 blocks, nothing published: the middle of each stream
        assert layers == (*d(2), *s(10))
    elif model == "flux2-klein-9b":  # 8 + 24 blocks
        assert layers == (*d(4), *s(12))
    elif model in MIDDLE_OF_RELEASED:  # nothing published: the middle block (PiD: the middle patch block)
        assert format_layers(layers) == MIDDLE_OF_RELEASED[model]
    else:
        assert model in ("sd3", "sd3.5-medium", "sd3.5-large")
        assert layers == j(7, 8, 9)  # Stability's SD3.5-M skip-layer guidance layers


@pytest.mark.parametrize("word", ["middle", "mid", "MIDDLE"])
def test_the_default_preset_selects_the_released_models_defaults(word):
    flux, sd35 = FLUX1.default_for(FLUX), MMDIT.default_for(SD35M)
    assert format_layers(resolve_layers(word, FLUX, flux)) == "d7-9,s7-9"
    assert format_layers(resolve_layers(word, SD35M, sd35)) == "j7-9"
    assert canonical_spec(word, FLUX, flux) == "d7-9,s7-9"  # infotext names the blocks, not the UNet word
    assert format_layers(resolve_layers(word, FLUX)) == "d9,s19"  # no family default given: the middle


def test_the_readme_table_of_released_models_is_the_registry():
    """README's table of released models is derived from the families' own facts: it cannot drift."""
    from pathlib import Path

    from lib_seg.dit.families import released_table_markdown

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert released_table_markdown() in readme
