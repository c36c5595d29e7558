"""Which self-attention (attn1) layers SEG blurs.

A layer is addressed like Forge's ``patches_replace["attn1"]`` keys: ``(part, block, transformer)``
with part ``input`` / ``middle`` / ``output``, ``block`` the index in ``input_blocks`` /
``output_blocks`` (0 for the middle block) and ``transformer`` the index inside the block's
SpatialTransformer (SDXL stacks 2 or 10 of them).

A spec is a comma-separated list of presets or block items:

* presets ``middle`` (alias ``mid``), ``input`` (``down``), ``output`` (``up``), ``all``;
* items ``d4`` (input block 4, every transformer), ``m0`` (middle block), ``u0.3`` (output block 0,
  transformer 3), ranges inclusive on either index: ``d4-5``, ``d2.2-9``, ``u0-2.0-4``.

The official SEG-SDXL indices are accepted too, in brackets as written in the official call:
``['d4', 'm0']`` (single attention layers, see :mod:`lib_seg.core.official_layers`).

Specs are validated against the layers a model really has, and errors list them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from lib_seg.core import official_layers

PARTS = ("input", "middle", "output")
PART_LETTERS = {"d": "input", "m": "middle", "u": "output"}
LETTER_OF_PART = {part: letter for letter, part in PART_LETTERS.items()}
PRESETS = {"middle": ("middle",), "input": ("input",), "output": ("output",), "all": PARTS}
PRESET_ALIASES = {"mid": "middle", "down": "input", "up": "output"}
_ITEM = re.compile(r"^([dmu])(\d+)(?:-(\d+))?(?:\.(\d+)(?:-(\d+))?)?$")
_MODULE = re.compile(
    r"(?:^|\.)(input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))\.\d+\.transformer_blocks\.(\d+)\.attn1$"
)


class LayerKey(NamedTuple):
    part: str
    block: int
    transformer: int


def layer_from_module_name(name: str) -> LayerKey | None:
    """Key of an ldm/sgm attn1 module name such as ``middle_block.1.transformer_blocks.3.attn1``."""
    match = _MODULE.search(name)
    if match is None:
        return None
    whole, input_block, output_block, transformer = match.groups()
    if whole == "middle_block":
        return LayerKey("middle", 0, int(transformer))
    if input_block is not None:
        return LayerKey("input", int(input_block), int(transformer))
    return LayerKey("output", int(output_block), int(transformer))


def layers_from_module_names(names: Iterable[str]) -> tuple[LayerKey, ...]:
    """Sorted attn1 layer keys of a UNet, from its ``named_modules()`` names."""
    found = {key for key in map(layer_from_module_name, names) if key is not None}
    return tuple(sorted(found, key=sort_key))


def unet_layers(unet: Any) -> tuple[LayerKey, ...]:
    """attn1 layer keys of an ldm-layout UNet module (anything with ``named_modules()``)."""
    return layers_from_module_names(name for name, _ in unet.named_modules())


def sort_key(key: LayerKey) -> tuple[int, int, int]:
    return PARTS.index(key.part), key.block, key.transformer


def spec_items(spec: str) -> list[str]:
    """The comma-separated items of a spec, stripped and lower-cased (specs are case-insensitive)."""
    return [item.strip().lower() for item in str(spec).split(",") if item.strip()]


def index_range(first: str, last: str | None) -> range:
    """Inclusive range ``first-last`` of a spec item (``last`` None: the one index)."""
    low, high = int(first), int(last) if last is not None else int(first)
    if low > high:
        raise ValueError(f"range {low}-{high} is empty (write the smaller index first)")
    return range(low, high + 1)


def _select(item: str, available: tuple[LayerKey, ...]) -> list[LayerKey]:
    preset = PRESET_ALIASES.get(item, item)
    if preset in PRESETS:
        chosen = [key for key in available if key.part in PRESETS[preset]]
        if not chosen:
            raise _missing(item, available)
        return chosen
    match = _ITEM.match(item)
    if match is None:
        raise ValueError(
            f"SEG layers: cannot read {item!r}; use presets {', '.join(PRESETS)} or items like "
            "m0, d4, d4-5, u0.3, d7.2-9"
        )
    letter, block_lo, block_hi, tr_lo, tr_hi = match.groups()
    part = PART_LETTERS[letter]
    blocks = index_range(block_lo, block_hi)
    transformers = index_range(tr_lo, tr_hi) if tr_lo is not None else None
    chosen = [
        key
        for key in available
        if key.part == part and key.block in blocks and (transformers is None or key.transformer in transformers)
    ]
    wanted = len(blocks) * len(transformers) if transformers is not None else None
    if not chosen or (wanted is not None and len(chosen) != wanted) or not _covers_blocks(chosen, blocks):
        raise _missing(item, available)
    return chosen


def _missing(item: str, available: tuple[LayerKey, ...]) -> ValueError:
    return ValueError(
        f"SEG layers: {item!r} names attention layers this model does not have; "
        f"it has {format_layers(available, available)}"
    )


def _covers_blocks(chosen: list[LayerKey], blocks: range) -> bool:
    return {key.block for key in chosen} == set(blocks)


def resolve_layers(spec: str, available: Iterable[LayerKey]) -> tuple[LayerKey, ...]:
    """Layer keys a spec selects on a model with ``available`` attn1 layers (sorted, unique)."""
    available = tuple(sorted(set(available), key=sort_key))
    if official_layers.is_official_spec(spec):
        official_layers.official_items(spec)  # syntax errors first, whatever the model
        if not available:
            raise ValueError("SEG layers: this model has no self-attention layers SEG can blur")
        return tuple(sorted(set(official_layers.resolve_official(spec, available)), key=sort_key))
    items = spec_items(spec)
    if not items:
        raise ValueError("SEG layers: the layer list is empty; use e.g. 'middle' or 'm0'")
    if not available:
        raise ValueError("SEG layers: this model has no self-attention layers SEG can blur")
    chosen = {key for item in items for key in _select(item, available)}
    return tuple(sorted(chosen, key=sort_key))


def compress_runs(numbers: Iterable[int]) -> list[str]:
    """Sorted runs of consecutive numbers, written ``3`` or ``4-9``."""
    runs: list[list[int]] = []
    for number in sorted(numbers):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in runs]


def format_layers(keys: Iterable[LayerKey], available: Iterable[LayerKey] | None = None) -> str:
    """Canonical spec for ``keys``; blocks chosen whole are written bare (``m0``) if ``available`` is known."""
    keys = sorted(set(keys), key=sort_key)
    per_block: dict[tuple[str, int], list[int]] = {}
    for key in keys:
        per_block.setdefault((key.part, key.block), []).append(key.transformer)
    whole: dict[tuple[str, int], set[int]] = {}
    for key in available or ():
        whole.setdefault((key.part, key.block), set()).add(key.transformer)
    items = []
    for (part, block), transformers in per_block.items():
        prefix = f"{LETTER_OF_PART[part]}{block}"
        if whole.get((part, block)) == set(transformers):
            items.append(prefix)
        else:
            items.extend(f"{prefix}.{run}" for run in compress_runs(transformers))
    return ",".join(items)


def _blocks(part: str, depths: dict[int, int]) -> list[LayerKey]:
    return [LayerKey(part, block, t) for block, depth in depths.items() for t in range(depth)]


_SD1_LAYERS = tuple(
    _blocks("input", {1: 1, 2: 1, 4: 1, 5: 1, 7: 1, 8: 1})
    + _blocks("middle", {0: 1})
    + _blocks("output", {i: 1 for i in range(3, 12)})
)
_SDXL_LAYERS = tuple(
    _blocks("input", {4: 2, 5: 2, 7: 10, 8: 10})
    + _blocks("middle", {0: 10})
    + _blocks("output", {0: 10, 1: 10, 2: 10, 3: 2, 4: 2, 5: 2})
)
MODEL_LAYERS: dict[str, tuple[LayerKey, ...]] = {"sd1": _SD1_LAYERS, "sd2": _SD1_LAYERS, "sdxl": _SDXL_LAYERS}


def check_spec_syntax(spec: str) -> str:
    """Normalise a spec's spelling (lower case, no spaces) and reject what no model could accept."""
    if official_layers.is_official_spec(spec):
        return official_layers.normalise(spec)
    items = spec_items(spec)
    if not items:
        raise ValueError("SEG layers: the layer list is empty; use e.g. 'middle' or 'm0'")
    for item in items:
        if PRESET_ALIASES.get(item, item) not in PRESETS:
            match = _ITEM.match(item)
            if match is None:
                _select(item, ())  # raises the descriptive syntax error
            _, block_lo, block_hi, tr_lo, tr_hi = match.groups()
            index_range(block_lo, block_hi)
            if tr_lo is not None:
                index_range(tr_lo, tr_hi)
    return ",".join(PRESET_ALIASES.get(item, item) for item in items)


def canonical_spec(spec: str, available: Iterable[LayerKey]) -> str:
    """What infotext records: a lone preset keeps its name, anything else becomes explicit blocks."""
    normal = check_spec_syntax(spec)
    available = tuple(available)
    if normal in PRESETS:
        resolve_layers(normal, available)  # still fail on a model that lacks the preset's layers
        return normal
    return format_layers(resolve_layers(normal, available), available)


def official_table(available: Sequence[Any]) -> list[tuple[str, str, str]]:
    """Rows ``(official indices, our single layers, our whole block)``, one per UNet block."""
    blocks: dict[tuple[str, int], list[tuple[str, Any]]] = {}
    for name, key in official_layers.official_names(available):
        blocks.setdefault((key.part, key.block), []).append((name, key))
    rows = []
    for members in blocks.values():
        (first, first_key), (last, last_key) = members[0], members[-1]
        official = f"`{first}`" if first == last else f"`{first}`–`{last}`"
        single = format_layers([first_key])
        ours = f"`{single}`" if first == last else f"`{single}`–`{format_layers([last_key])}`"
        rows.append((official, ours, f"`{format_layers([key for _, key in members], available)}`"))
    return rows


def official_table_markdown(available: Sequence[Any]) -> str:
    lines = ["| official index | our layer | = our block |", "|---|---|---|"]
    lines += [f"| {official} | {ours} | {block} |" for official, ours, block in official_table(available)]
    return "\n".join(lines)
