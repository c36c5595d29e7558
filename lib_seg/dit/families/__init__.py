"""The registry of DiT families SEG knows: one small module per family, asked through :func:`family_of`.

Each family module says which models it knows (by their structure, never by a class name a host may
rename), which blocks they have in execution order, what ``middle`` (the default) selects there and
where that default comes from, and how to arm the query hooks for one model call.  Shared code
(:mod:`lib_seg.dit.hooks`, :mod:`lib_seg.dit.prefix`, the targets) asks the registry and never
branches on a family's name.  The order matters: a more specific family (Flux.2) is asked before the
one whose structure it shares (Flux.1).
"""

from __future__ import annotations

from typing import Any

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

__all__ = ["FAMILIES", "DitFamily", "family_of"]


def family_of(model: Any) -> DitFamily | None:
    """The family whose structure ``model`` has, or None (SEG then leaves the model alone)."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    return None
