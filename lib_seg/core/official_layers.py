"""The official SEG-SDXL layer names, read as they are meant there.

The official pipeline (SusungHong/SEG-SDXL ``pipeline_seg.py``) lists the UNet's ``attn1`` modules in
diffusers' module order and splits them by the name's prefix (``down_``, ``mid_``, ``up_``):
``seg_applied_layers_index=['d4', 'm0']`` means the fifth self-attention layer of the down path and
the first of the middle block.  Each index is a *single* attention layer (one transformer block),
while our ``d4`` / ``m0`` name whole UNet blocks; on SDXL the official ``m0`` is our ``m0.0`` and the
official ``d4`` our ``d7.0``.  ``seg_applied_layers=['mid']`` (the paper's default) is every middle
layer: our ``middle``.

diffusers orders the layers down block, attention, transformer block: the order of ldm's
``input_blocks`` / ``middle_block`` / ``output_blocks``.  So official ``<letter><n>`` is the n-th
attn1 layer (counted from 0) of that part of the UNet, in our sorted order, on any model.

The syntax is a list in square brackets, as written in the official call, so it cannot be confused
with our block items: ``['d4', 'd5', 'm0']``, ``[d4, m0]`` and ``['mid']`` / ``['down', 'up']``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

OFFICIAL_PARTS = {"d": "input", "m": "middle", "u": "output"}
OFFICIAL_GROUPS = {"down": "input", "mid": "middle", "up": "output"}
_INDEX = re.compile(r"^([dmu])(\d+)$")


def is_official_spec(spec: str) -> bool:
    text = str(spec).strip()
    return text.startswith("[") and text.endswith("]")


def official_items(spec: str) -> list[str]:
    """The names inside ``[...]``, unquoted and lower case; raises on anything the official code rejects."""
    inner = str(spec).strip()[1:-1]
    items = [item.strip().strip("'\"").strip().lower() for item in inner.split(",")]
    items = [item for item in items if item]
    if not items:
        raise ValueError("SEG layers: the official layer list is empty; use e.g. ['m0'] or ['mid']")
    for item in items:
        if item not in OFFICIAL_GROUPS and _INDEX.match(item) is None:
            raise ValueError(
                f"SEG layers: cannot read {item!r} in the official list; it takes indices d<n>, m<n>, u<n> "
                "(single attention layers counted from 0) or down, mid, up, e.g. ['d4', 'm0']"
            )
    return items


def normalise(spec: str) -> str:
    """Canonical spelling of an official list: ``[d4,m0]``."""
    return "[" + ",".join(official_items(spec)) + "]"


def layers_of_part(available: Sequence[Any], part: str) -> list[Any]:
    """The attn1 layers of ``part`` in official index order (``available`` is sorted as ldm orders it)."""
    return [key for key in available if key.part == part]


def resolve_official(spec: str, available: Sequence[Any]) -> list[Any]:
    """The layer keys an official list selects among ``available`` (sorted layer keys)."""
    chosen = []
    for item in official_items(spec):
        if item in OFFICIAL_GROUPS:
            chosen.extend(layers_of_part(available, OFFICIAL_GROUPS[item]))
            continue
        letter, number = _INDEX.match(item).groups()
        part_layers = layers_of_part(available, OFFICIAL_PARTS[letter])
        if int(number) >= len(part_layers):
            counts = ", ".join(
                f"{len(layers_of_part(available, part))} {name}" for name, part in OFFICIAL_GROUPS.items()
            )
            highest = f"{letter}{len(part_layers) - 1}" if part_layers else "none"
            raise ValueError(
                f"SEG layers: official index {item!r} is out of range; this model has {counts} self-attention "
                f"layers (highest {letter}-index: {highest})"
            )
        chosen.append(part_layers[int(number)])
    return chosen


def official_names(available: Sequence[Any]) -> list[tuple[str, Any]]:
    """Every layer of a model with its official index: ``[("d0", key), ...]``, in order."""
    return [
        (f"{letter}{index}", key)
        for letter, part in OFFICIAL_PARTS.items()
        for index, key in enumerate(layers_of_part(available, part))
    ]
