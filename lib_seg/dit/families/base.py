"""What every DiT family module provides (:class:`DitFamily`), and the pieces they share.

A family turns three questions into code: which blocks a model has (:meth:`DitFamily.blocks`, in the
order the model runs them, which the prefix reuse needs), what ``middle`` selects on it
(:meth:`DitFamily.default_spec`), and which forward hooks make one model call blur the image queries
of the chosen blocks (:meth:`DitFamily.arm`).  Hooks go into the caller's list of handles as they are
registered; the caller removes them in ``finally``, so an exception never leaves one behind.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.dit import layers as dit_layers
from lib_seg.dit.layers import DitLayer
from lib_seg.dit.queries import Rows

SkipCallback = Callable[..., None]  # (layer, n_tokens, grid=None[, reason])


class DitFamily:
    """One DiT family.  Subclasses set the class attributes and implement the three methods."""

    name = "dit"
    title = "DiT"  # for messages and the README
    kinds: tuple[str, ...] = ()  # block kinds, in execution order
    attributes: ClassVar[dict[str, str]] = {}  # kind -> the model's ModuleList attribute (default ``<kind>_blocks``)
    default: str | None = None  # the published default spec, used when the model has those blocks
    default_source = ""  # where :attr:`default` comes from
    prefix_reuse = True  # may the SEG rows skip the blocks before the first blurred one (lib_seg.dit.prefix)

    def matches(self, model: Any) -> bool:
        raise NotImplementedError

    def block_list(self, model: nn.Module, kind: str) -> nn.ModuleList:
        return getattr(model, self.attributes.get(kind, f"{kind}_blocks"))

    def blocks(self, model: nn.Module) -> list[tuple[DitLayer, nn.Module]]:
        """Every block SEG can blur, in execution order."""
        return [(DitLayer(kind, i), b) for kind in self.kinds for i, b in enumerate(self.block_list(model, kind))]

    def block(self, model: nn.Module, layer: DitLayer) -> nn.Module:
        blocks = self.block_list(model, layer.kind) if layer.kind in self.kinds else None
        if blocks is None or not 0 <= layer.index < len(blocks):
            raise ValueError(f"SEG layers: this model has no {layer.kind} block {layer.index}")
        return blocks[layer.index]

    def layers(self, model: nn.Module) -> tuple[DitLayer, ...]:
        return tuple(layer for layer, _ in self.blocks(model))

    def default_spec(self, model: nn.Module) -> str:
        """What ``middle`` selects on ``model``: :attr:`default` where the model has those blocks, else
        the middle block of each stream (:func:`lib_seg.dit.layers.default_layers`)."""
        return dit_layers.default_layers(self.layers(model), self.default)

    def arm(
        self,
        model: nn.Module,
        layers: Iterable[DitLayer],
        sigma: float,
        rows: Rows,
        on_skip: SkipCallback | None,
        handles: list[RemovableHandle],
    ) -> None:
        """Register, into ``handles``, the hooks by which calls of ``model`` blur ``layers``' image queries
        (into the list as they are made, so the caller can remove them all even if this raises)."""
        raise NotImplementedError


class CallFacts:
    """What one model call tells a family's hooks, with the image tokens' place worked out once per call:
    :meth:`where` caches :meth:`_locate` (the family's own: grid and offsets, or the reason they cannot be
    placed); a subclass sets ``_where = None`` when a new call starts."""

    _where: Any = None

    def where(self) -> Any:
        if self._where is None:
            self._where = self._locate()
        return self._where

    def _locate(self) -> Any:
        raise NotImplementedError


def has_blocks(model: Any, *attributes: str) -> bool:
    """Whether ``model`` is a module with a ModuleList under every one of ``attributes``."""
    return isinstance(model, nn.Module) and all(
        isinstance(getattr(model, name, None), nn.ModuleList) for name in attributes
    )


def submodules(block: nn.Module, layer: DitLayer, names: Iterable[str]) -> list[nn.Module]:
    """The named submodules of ``block`` that exist (at least one must)."""
    names = list(names)
    modules = dict(block.named_modules())
    found = [modules[name] for name in names if name in modules]
    if not found:
        raise ValueError(f"SEG layers: {dit_layers.format_layers([layer])} has no {names[0]} to hook")
    return found


def arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by parameter name (hosts pass the same argument positionally or by keyword)."""
    try:
        return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def skipped(
    on_skip: SkipCallback | None, layer: DitLayer, n_tokens: int, grid: tuple | None, reason: str | None = None
) -> None:
    """Leave the block's queries as they are (a forward hook returning None) and say why."""
    if on_skip is not None:
        on_skip(layer, int(n_tokens), grid, *(() if reason is None else (reason,)))
    return None
