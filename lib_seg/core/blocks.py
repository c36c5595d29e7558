"""Which DiT blocks SEG blurs, and how a user names them: the grammar of block specs.

A block is ``(kind, index)``: Flux/Chroma have ``double``-stream blocks (``d0``-``d18``, separate
image and text weights, joint attention) and ``single``-stream blocks (``s0``-``s37``, one joint
sequence); SD3/SD3.5 MMDiT have ``joint`` blocks (``j0``-``j23`` Medium, ``j0``-``j37`` 3.5 Large).
Indices are the hosts' ``double_blocks[i]`` / ``single_blocks[i]`` / ``joint_blocks[i]`` (and
reForge's ``patches_replace["dit"][("double_block", i)]`` keys).  Note that ``d`` here is a
double-stream block, not a UNet down block: DiT specs are a separate namespace.

A spec is a comma-separated, case-insensitive list of presets (``double``, ``single``, ``joint``,
``all``) and items (``d7``, ranges inclusive ``d7-9``).  It is checked against the blocks the loaded
model really has (the adapter passes the counts it finds), and an error names the field and lists
them, as :mod:`lib_seg.core.layers` does for UNets (whose spec helpers are reused).

What ``middle`` (the default preset) selects is :func:`default_layers`: a family's published default
where the model has all its blocks, else the middle block of each stream.  The released models, their
blocks and the published defaults with their evidence (``docs/dit.md``, "Default layers") are the
families' facts (:mod:`lib_seg.dit.families`: Flux/Chroma ``d7-9,s7-9`` from ComfyUI's
``SkipLayerGuidanceDiT``, SD3/SD3.5 ``j7-9`` from Stability's skip-layer guidance; none published for the
others); which default applies is the model's family's, not the block counts'.

No real DiT weights were available while writing this, so none of these was tuned for SEG; they are
starting points that users are expected to adjust.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from lib_seg.core.layers import compress_runs, index_range, spec_items

# Block kinds, in spec order: Flux double/single stream, two-stream joint blocks (SD3, Qwen-Image),
# single-stream ``layer``s (Lumina 2 / Z-Image), self-attention ``block``s (Wan, Anima).
KINDS = ("double", "single", "joint", "layer", "block")
KIND_OF_LETTER = {"d": "double", "s": "single", "j": "joint", "l": "layer", "b": "block"}
LETTER_OF_KIND = {kind: letter for letter, kind in KIND_OF_LETTER.items()}
PRESETS: dict[str, tuple[str, ...]] = {**{kind: (kind,) for kind in KINDS}, "all": KINDS}
DEFAULT_WORDS = ("middle", "mid")  # the UNet default preset's name means "this DiT's default blocks"
_ITEM = re.compile(r"^([dsjlb])(\d+)(?:-(\d+))?$")


class DitLayer(NamedTuple):
    kind: str
    index: int


def model_layers(
    double: int = 0, single: int = 0, joint: int = 0, layer: int = 0, block: int = 0
) -> tuple[DitLayer, ...]:
    """All blocks of a model with these block counts, in spec order (:data:`KINDS`)."""
    counts = {"double": double, "single": single, "joint": joint, "layer": layer, "block": block}
    for kind, count in counts.items():
        if int(count) < 0:
            raise ValueError(f"{kind} block count must be >= 0, got {count}")
    return tuple(DitLayer(kind, i) for kind in KINDS for i in range(int(counts[kind])))


def default_layers(available: Iterable[DitLayer], released: str | None = None) -> str:
    """What ``middle`` (the default preset) selects on a DiT with ``available`` blocks.

    ``released``: the family's published default (Flux/Chroma ``d7-9,s7-9``, SD3 ``j7-9``; the family
    module says where it comes from), used when the model has all its blocks.  Otherwise (no published
    default, as for Flux.2; pruned or distilled variants; test models) the middle block of each stream,
    ``index = count // 2``, the DiT counterpart of a UNet's middle block.
    """
    available = tuple(sorted(set(available), key=sort_key))
    if released is not None:
        wanted = [
            DitLayer(kind, i) for item in spec_items(released) for kind, indices in [_parse(item)] for i in indices
        ]
        if wanted and set(wanted) <= set(available):
            return released
    counts = {kind: sum(layer.kind == kind for layer in available) for kind in KINDS}
    return format_layers(DitLayer(kind, count // 2) for kind, count in counts.items() if count)


def sort_key(layer: DitLayer) -> tuple[int, int]:
    return KINDS.index(layer.kind), layer.index


def format_layers(layers: Iterable[DitLayer]) -> str:
    """Canonical spec of ``layers``: consecutive indices as ranges, ``d7-9,s7-9``."""
    per_kind: dict[str, list[int]] = {}
    for layer in sorted(set(layers), key=sort_key):
        per_kind.setdefault(layer.kind, []).append(layer.index)
    return ",".join(
        f"{LETTER_OF_KIND[kind]}{run}" for kind, indices in per_kind.items() for run in compress_runs(indices)
    )


def _syntax_error(item: str) -> ValueError:
    return ValueError(
        f"SEG layers: cannot read {item!r}; use presets {', '.join(PRESETS)} or blocks like d7, d7-9, s0-37, j7-9, l15"
    )


def _missing(item: str, available: tuple[DitLayer, ...]) -> ValueError:
    return ValueError(f"SEG layers: {item!r} names blocks this model does not have; it has {format_layers(available)}")


def _parse(item: str) -> tuple[str, range] | None:
    """``(kind, indices)`` of a block item, None for a preset; raises on anything else."""
    if item in PRESETS or item in DEFAULT_WORDS:
        return None
    match = _ITEM.match(item)
    if match is None:
        raise _syntax_error(item)
    letter, low, high = match.groups()
    try:
        return KIND_OF_LETTER[letter], index_range(low, high)
    except ValueError as error:
        raise ValueError(f"SEG layers: {error}") from None


def _select(item: str, available: tuple[DitLayer, ...], default: str) -> list[DitLayer]:
    if item in DEFAULT_WORDS:
        return [layer for block in spec_items(default) for layer in _select(block, available, default)]
    parsed = _parse(item)
    if parsed is None:
        chosen = [layer for layer in available if layer.kind in PRESETS[item]]
    else:
        kind, indices = parsed
        wanted = [DitLayer(kind, i) for i in indices]
        chosen = wanted if set(wanted) <= set(available) else []
    if not chosen:
        raise _missing(item, available)
    return chosen


def check_spec_syntax(spec: str) -> str:
    """Normalise a spec's spelling (lower case, no spaces) and reject what no model could accept."""
    items = spec_items(spec)
    if not items:
        raise ValueError("SEG layers: the block list is empty; use e.g. 'd7-9,s7-9' or 'j7-9'")
    for item in items:
        _parse(item)
    return ",".join(items)


def resolve_layers(spec: str, available: Iterable[DitLayer], default: str | None = None) -> tuple[DitLayer, ...]:
    """Blocks a spec selects on a model with ``available`` blocks (sorted, unique).

    ``default``: what ``middle`` means on this model (its family's :meth:`default_spec`); without it,
    the middle block of each stream."""
    items = check_spec_syntax(spec).split(",")
    available = tuple(sorted(set(available), key=sort_key))
    if not available:
        raise ValueError("SEG layers: this model has no transformer blocks SEG can blur")
    default = default or default_layers(available)
    chosen = {layer for item in items for layer in _select(item, available, default)}
    return tuple(sorted(chosen, key=sort_key))


def canonical_spec(spec: str, available: Iterable[DitLayer], default: str | None = None) -> str:
    """What infotext records: a lone preset keeps its name, anything else (``middle`` included: its
    blocks differ per model) becomes explicit blocks."""
    normal = check_spec_syntax(spec)
    chosen = resolve_layers(normal, available, default)
    return normal if normal in PRESETS else format_layers(chosen)
