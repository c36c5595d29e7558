"""Which DiT blocks SEG blurs, and how a user names them.

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

Defaults (:func:`default_layer_spec`) follow the only published DiT layer choices, from perturbed-
or skipped-layer guidance (``docs/dit.md``, "Default layers"):

* SD3/SD3.5 ``j7-9``: Stability's skip-layer guidance for SD3.5 Medium uses layers 7, 8, 9
  (``Stability-AI/sd3.5`` ``sd3_infer.py:509-518``); ComfyUI's ``SkipLayerGuidanceSD3`` defaults to
  "7, 8, 9"; diffusers' SLG and SEG guiders recommend ``[7, 8, 9]`` for SD3.5 Medium (its SEG guider
  itself has no default).  The same is used for SD3 Medium and SD3.5 Large, untuned.
* Flux/Chroma ``d7-9,s7-9``: ComfyUI's ``SkipLayerGuidanceDiT`` default (double "7, 8, 9", single
  "7, 8, 9", ``comfy_extras/nodes_slg.py:24-28``).  No published Flux SEG or PAG default exists.
* Flux.2 (Klein 4B: 5 double + 20 single blocks, 9B: 8 + 24): nothing published, and Flux.1's indices
  7-9 do not exist in Klein's double stream; the middle block of each stream, ``d2,s10`` / ``d4,s12``.

Which default applies is the model's family's (:mod:`lib_seg.dit.families`), not the block counts'.

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

# Block counts of the released models (double, single, joint).
MODEL_BLOCKS: dict[str, tuple[int, ...]] = {  # (double, single, joint, layer, block)
    "flux": (19, 38, 0),
    "chroma": (19, 38, 0),
    "sd3": (0, 0, 24),
    "sd3.5-medium": (0, 0, 24),
    "sd3.5-large": (0, 0, 38),
    "flux2-klein-4b": (5, 20, 0),  # Neo huggingface_guess: depth from the checkpoint; BFL's Klein configs
    "flux2-klein-9b": (8, 24, 0),
    "z-image-turbo": (0, 0, 0, 30),  # Tongyi-MAI/Z-Image-Turbo transformer config: n_layers 30
    "neta-lumina": (0, 0, 0, 26),  # neta-art/Neta-Lumina: num_layers 26
    "krea-2": (0, 28),
    "ernie-image": (0, 0, 0, 36),
    "pid": (0, 0, 14, 0, 2),  # PixelDiT / PiD: 14 patch (joint) blocks, 2 pixel blocks
    "qwen-image": (0, 0, 60),  # Neo backend/huggingface/Qwen/Qwen-Image/transformer/config.json
    "wan2.2-a14b": (0, 0, 0, 0, 40),  # each expert; Wan 2.1 14B too (Wan-Video wan/configs)
    "wan2.2-ti2v-5b": (0, 0, 0, 0, 30),  # Wan 2.1 1.3B too
    "anima": (0, 0, 0, 0, 28),  # Neo huggingface_guess/detection.py
    "anima-2.9b": (0, 0, 0, 0, 40),  # Neo 2.29 anima.py BLOCK_MAPPINGS depths 28 / 40 / 52
    "anima-3.8b": (0, 0, 0, 0, 52),
    "qwen-image-2.1": (0, 32),  # Neo 2.29 qwen21.py (and ComfyUI's) num_layers default
}
FLUX1_DEFAULT, SD3_DEFAULT = "d7-9,s7-9", "j7-9"  # published choices (module docstring)
PUBLISHED_DEFAULTS: dict[str, str | None] = {
    "flux": FLUX1_DEFAULT,
    "chroma": FLUX1_DEFAULT,
    "sd3": SD3_DEFAULT,
    "sd3.5-medium": SD3_DEFAULT,
    "sd3.5-large": SD3_DEFAULT,
    "flux2-klein-4b": None,  # none published: the middle block of each stream
    "flux2-klein-9b": None,
    "z-image-turbo": None,  # none of these has a published SEG/PAG/SLG choice: the middle block
    "neta-lumina": None,
    "krea-2": None,
    "ernie-image": None,
    "pid": "j7",  # the middle patch block (the pixel blocks are the per-pixel head before the output)
    "qwen-image": None,
    "wan2.2-a14b": None,
    "wan2.2-ti2v-5b": None,
    "anima": None,
    "anima-2.9b": None,
    "anima-3.8b": None,
    "qwen-image-2.1": None,
}


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


def family_layers(family: str) -> tuple[DitLayer, ...]:
    """Blocks of a released model (a key of :data:`MODEL_BLOCKS`: ``flux``, ``sd3.5-medium``, ``flux2-klein-4b``,
    ``z-image-turbo``, ...)."""
    if family not in MODEL_BLOCKS:
        raise ValueError(f"unknown DiT family {family!r}; known: {', '.join(MODEL_BLOCKS)}")
    return model_layers(*MODEL_BLOCKS[family])


def default_layer_spec(family: str) -> str:
    """The default blocks of a released model; see the module docstring for the evidence (and its limits)."""
    return default_layers(family_layers(family), PUBLISHED_DEFAULTS[family])


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
