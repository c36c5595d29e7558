"""The registry of DiT families SEG knows: one small module per family, asked through :func:`family_of`.

Each family module says which models it knows (by their structure, never by a class name a host may
rename), which blocks they have in execution order, what ``middle`` (the default) selects there and
where that default comes from, which released models it covers with their block counts
(:func:`released_models` lists them all), and how to arm the query hooks for one model call.  Shared code
(:mod:`lib_seg.dit.hooks`, :mod:`lib_seg.dit.prefix`, the targets) asks the registry and never
branches on a family's name.  The order matters: a more specific family (Flux.2) is asked before the
one whose structure it shares (Flux.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lib_seg.core.blocks import DitLayer, format_layers, model_layers

from .anima import ANIMA
from .base import DitFamily
from .ernie import ERNIE
from .flux import FLUX1, FLUX2
from .krea import KREA2
from .mmdit import MMDIT
from .nextdit import LUMINA2, ZIMAGE
from .pixeldit import PIXELDIT
from .qwen import QWEN_IMAGE
from .qwen21 import QWEN21
from .wan import WAN

FAMILIES: tuple[DitFamily, ...] = (
    KREA2,
    ERNIE,
    PIXELDIT,
    FLUX2,
    FLUX1,
    MMDIT,
    ZIMAGE,
    LUMINA2,
    QWEN_IMAGE,
    QWEN21,
    WAN,
    ANIMA,
)

__all__ = ["FAMILIES", "DitFamily", "family_of", "released_models", "released_table_markdown"]


def family_of(model: Any) -> DitFamily | None:
    """The family whose structure ``model`` has, or None (SEG then leaves the model alone)."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    return None


def released_models() -> Iterator[tuple[DitFamily, str, tuple[DitLayer, ...]]]:
    """Every released model the families know: ``(family, model name, its blocks in spec order)``, in registry
    order (:attr:`DitFamily.released`; any table of released models is derived from this)."""
    for family in FAMILIES:
        for name, counts in family.released.items():
            yield family, name, model_layers(**counts)


def released_table_markdown() -> str:
    """The README's table of released models, blocks and what ``middle`` selects, made from the registry."""
    rows = ["| model | family | blocks | `middle` | chosen because |", "|---|---|---|---|---|"]
    for family, name, layers in released_models():
        default = family.default_for(layers)
        reason = "published" if family.default is not None and default == family.default else "middle block"
        rows.append(f"| {name} | {family.title} | `{format_layers(layers)}` | `{default}` | {reason} |")
    return "\n".join(rows) + "\n"
