"""Official SEG-SDXL layer indices (``seg_applied_layers_index``) against an independent derivation.

The reference below follows the official code's own enumeration (SusungHong/SEG-SDXL
``pipeline_seg.py``: every ``named_modules()`` name with ``attn1`` and without ``to``, split by the
first word of the name) applied to diffusers' module names of the real SD1.5 / SDXL UNets.  Those
names come from the ldm names of our full-size UNet (built on the meta device, no memory) by the
standard ldm -> diffusers conversion (``layers_per_block`` = 2: input block 3i+j+1 is
``down_blocks.i.attentions.j``, output block 3i+j is ``up_blocks.i.attentions.j``), not from
:mod:`lib_seg.core.official_layers`'s "n-th layer of the part" rule.
"""

import re
from pathlib import Path

import pytest
import torch

from lib_seg.core import layers
from lib_seg.core.layers import (
    LayerKey,
    canonical_spec,
    check_spec_syntax,
    official_table_markdown,
    resolve_layers,
    unet_layers,
)
from lib_seg.core.params import SegParams
from tests.support.unet import SD15, SDXL, UNetModel

README = Path(__file__).resolve().parents[2] / "README.md"


def real_unet_names(config) -> list[str]:
    with torch.device("meta"):
        return [name for name, _ in UNetModel(config).named_modules()]


def diffusers_name(ldm_name: str) -> str | None:
    """ldm attn1 name -> diffusers name (layers_per_block = 2, as SD1.5 and SDXL have)."""
    match = re.match(r"^(input_blocks|output_blocks)\.(\d+)\.1\.(transformer_blocks\.\d+\.attn1)$", ldm_name)
    if match:
        kind, number, rest = match.group(1), int(match.group(2)), match.group(3)
        if kind == "input_blocks":
            return f"down_blocks.{(number - 1) // 3}.attentions.{(number - 1) % 3}.{rest}"
        return f"up_blocks.{number // 3}.attentions.{number % 3}.{rest}"
    match = re.match(r"^middle_block\.1\.(transformer_blocks\.\d+\.attn1)$", ldm_name)
    return f"mid_block.attentions.0.{match.group(1)}" if match else None


def ldm_key_of(diffusers: str) -> LayerKey:
    numbers = [int(n) for n in re.findall(r"\.(\d+)", diffusers)]  # ".attn1" has no dot before its 1
    if diffusers.startswith("down_blocks"):
        block, attention, transformer = numbers
        return LayerKey("input", 3 * block + attention + 1, transformer)
    if diffusers.startswith("up_blocks"):
        block, attention, transformer = numbers
        return LayerKey("output", 3 * block + attention, transformer)
    return LayerKey("middle", 0, numbers[-1])


def official_lists(ldm_names: list[str]) -> dict[str, list[str]]:
    """down/mid/up attn1 lists exactly as the official pipeline builds them (diffusers module order)."""
    names = [diffusers_name(n) for n in ldm_names]
    names = sorted((n for n in names if n), key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")])
    lists = {"down": [], "mid": [], "up": []}
    for name in names:
        if "attn1" in name and "to" not in name:
            lists[name.split(".")[0].split("_")[0]].append(name)
    return lists


@pytest.mark.parametrize("config", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_every_official_index_maps_to_the_layer_the_official_code_blurs(config):
    names = real_unet_names(config)
    available = layers.layers_from_module_names(names)
    lists = official_lists(names)
    assert sum(map(len, lists.values())) == len(available)
    for group, letter in (("down", "d"), ("mid", "m"), ("up", "u")):
        for index, diffusers in enumerate(lists[group]):
            assert resolve_layers(f"['{letter}{index}']", available) == (ldm_key_of(diffusers),), (letter, index)
        chosen = resolve_layers(f"['{group}']", available)
        assert chosen == tuple(sorted(map(ldm_key_of, lists[group]), key=layers.sort_key))
    assert resolve_layers("['mid']", available) == resolve_layers("middle", available)  # the paper's default


def test_sdxl_examples_from_the_official_readme():
    available = layers.MODEL_LAYERS["sdxl"]
    assert canonical_spec("['m0']", available) == "m0.0"
    assert canonical_spec("['d4', 'd5', 'm0']", available) == "d7.0-1,m0.0"
    assert canonical_spec('["mid"]', available) == "m0"
    assert canonical_spec("[u35]", available) == "u5.1"
    assert layers.MODEL_LAYERS["sdxl"] == layers.layers_from_module_names(real_unet_names(SDXL))
    assert layers.MODEL_LAYERS["sd1"] == layers.layers_from_module_names(real_unet_names(SD15))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("[]", "official layer list is empty"),
        ("['x1']", "cannot read 'x1' in the official list"),
        ("['d24']", "'d24' is out of range; this model has 24 down, 10 mid, 36 up"),
        ("['m10']", "highest m-index: m9"),
    ],
)
def test_official_errors_name_the_field_and_the_range(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_layers(spec, layers.MODEL_LAYERS["sdxl"])


def test_official_form_is_checked_and_kept_through_params():
    assert check_spec_syntax(" [ 'D4' , \"m0\" ] ") == "[d4,m0]"
    assert SegParams(enabled=True, layers="['d4','m0']").layers == "[d4,m0]"
    with pytest.raises(ValueError, match="official list"):
        SegParams(enabled=True, layers="['d4', 'q']")
    assert resolve_layers("d4", layers.MODEL_LAYERS["sdxl"]) != resolve_layers("[d4]", layers.MODEL_LAYERS["sdxl"])


def test_tiny_unet_official_index_walks_the_real_module_tree():
    from tests.support.unet import TINY_SDXL, build_unet

    unet = build_unet(TINY_SDXL)
    available = unet_layers(unet)
    assert resolve_layers("['m0']", available) == (LayerKey("middle", 0, 0),)


@pytest.mark.parametrize("family,config", [("sdxl", SDXL), ("sd1", SD15)])
def test_readme_table_is_the_generated_one(family, config):
    """The README's mapping tables are this code's output for the real layouts: they cannot drift."""
    table = official_table_markdown(layers.layers_from_module_names(real_unet_names(config)))
    assert table in README.read_text(encoding="utf-8"), f"README lacks the generated {family} table:\n{table}"
