"""Blur the image queries of chosen DiT blocks for one model call, with module hooks.

Why module hooks: Forge 2.x's Flux/Chroma ``forward`` drops ``transformer_options`` (no patch reaches
the blocks), reForge offers only whole-block replacement, A1111 has no patch system at all, and Neo's
RoPE runs inside a function no extension can reach; but on every host the q-normalisation is a
submodule *called as a module*, so a forward hook on it fires everywhere (``docs/dit.md``, "Hook
points per host").  Which modules, and how the grid and the image tokens are found, is each family's
business (:mod:`lib_seg.dit.families`); this module only asks the registry and guarantees that the
hooks live only inside :func:`blurred_dit_queries` (removed in ``finally``).

A block whose queries do not hold the image's grid (a tiling extension, position ids that contradict
the grid) is left unblurred and reported through ``on_skip``: never a partial blur on a wrong grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core.blocks import DitLayer

from .families import DitFamily, family_of
from .families.base import SkipCallback
from .queries import Rows

__all__ = ["SkipCallback", "available_layers", "blurred_dit_queries", "default_spec", "dit_family"]


def dit_family(model: Any) -> str | None:
    """The registry name of ``model``'s family (``"flux"``, ``"flux2"``, ``"mmdit"``), or None."""
    family = family_of(model)
    return None if family is None else family.name


def _family(model: Any) -> DitFamily:
    family = family_of(model)
    if family is None:
        raise ValueError(f"SEG: {type(model).__name__} is not a diffusion transformer SEG knows")
    return family


def available_layers(model: nn.Module) -> tuple[DitLayer, ...]:
    """Every block of ``model`` SEG can blur (empty for a model no family knows)."""
    family = family_of(model)
    return () if family is None else family.layers(model)


def default_spec(model: nn.Module) -> str:
    """What ``middle`` (the default) selects on ``model``, as a block spec."""
    return _family(model).default_spec(model)


@contextmanager
def blurred_dit_queries(
    model: nn.Module,
    layers: Iterable[DitLayer],
    sigma: float,
    rows: Rows = None,
    on_skip: SkipCallback | None = None,
) -> Iterator[None]:
    """Within the block, calls of ``model`` blur the image queries of ``layers`` (batch ``rows`` only if given)."""
    family = _family(model)
    handles: list[RemovableHandle] = []
    try:
        family.arm(model, list(layers), sigma, rows, on_skip, handles)
        family.watch(model, list(layers), on_skip, handles)
        yield
    finally:
        for handle in handles:
            handle.remove()
