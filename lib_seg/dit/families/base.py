"""What every DiT family module provides (:class:`DitFamily`), and the pieces they share.

A family turns three questions into code: which blocks a model has (:meth:`DitFamily.blocks`, in the
order the model runs them, which the prefix reuse needs), what ``middle`` selects on it
(:meth:`DitFamily.default_spec`), and which forward hooks make one model call blur the image queries
of the chosen blocks (:meth:`DitFamily.arm`).  Hooks go into the caller's list of handles as they are
registered; the caller removes them in ``finally``, so an exception never leaves one behind.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core import blocks as dit_layers
from lib_seg.core.blocks import DitLayer
from lib_seg.core.skips import SkipCallback
from lib_seg.dit.attention_call import AttentionCalls, CallShape, ImageTokens, Skip
from lib_seg.dit.queries import Rows

__all__ = ["AttentionCallFamily", "CallShape", "DitFamily", "ImageTokens", "Skip"]
OPTIONS = "transformer_options"


class DitFamily:
    """One DiT family.  Subclasses set the class attributes and implement the three methods."""

    name = "dit"
    title = "DiT"  # for messages and the README
    kinds: tuple[str, ...] = ()  # block kinds, in execution order
    attributes: ClassVar[dict[str, str]] = {}  # kind -> the model's ModuleList attribute (default ``<kind>_blocks``)
    default: str | None = None  # the published default spec, used when the model has those blocks
    default_source = ""  # where :attr:`default` comes from
    prefix_reuse = True  # may the SEG rows skip the blocks before the first blurred one (lib_seg.dit.prefix)
    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {}  # kind -> the block's submodules whose forward
    # hook blurs (a q-norm); :meth:`watch` reports a chosen block none of which ran in a model call
    never_ran = "its q-norm module never ran in this call (a fused kernel); SEG could not blur it"

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

    def prefix(self, model: nn.Module, layers: Iterable[DitLayer]) -> tuple[list[nn.Module], list[nn.Module]]:
        """The modules a batched call's SEG rows may skip (they run before the first of ``layers`` on rows that
        equal their cond rows there), in execution order, and those after which the rows are put back
        (:mod:`lib_seg.dit.prefix`).  By default the blocks before the first chosen one, widened after the
        last; none where the family opts out (:attr:`prefix_reuse`)."""
        if not self.prefix_reuse:
            return [], []
        first = min(dit_layers.sort_key(layer) for layer in layers)
        before = [block for layer, block in self.blocks(model) if dit_layers.sort_key(layer) < first]
        return before, before[-1:]

    def default_spec(self, model: nn.Module) -> str:
        """What ``middle`` selects on ``model``: :attr:`default` where the model has those blocks, else
        the middle block of each stream (:func:`lib_seg.core.blocks.default_layers`)."""
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

    def watch(self, model: nn.Module, layers: Iterable[DitLayer], on_skip: SkipCallback | None, handles: list) -> None:
        """Report, after each model call, every chosen block none of whose :attr:`query_modules` ran: a q-norm
        hook that never fires is a block SEG silently left alone (a fused kernel took its place)."""
        fired: set[DitLayer] = set()
        layers = [layer for layer in layers if layer.kind in self.query_modules]
        for layer in layers:
            names = self.query_modules[layer.kind]
            for module in submodules(self.block(model, layer), layer, names):
                handles.append(module.register_forward_hook(lambda *_, layer=layer: fired.add(layer)))

        def report(_model: nn.Module, _args: tuple, _output: Any) -> None:
            for layer in layers:
                if layer not in fired:
                    skipped(on_skip, layer, 0, None, self.never_ran)
            fired.clear()

        if layers:
            handles.append(model.register_forward_pre_hook(lambda *_: fired.clear()))
            handles.append(model.register_forward_hook(report))


class CallFacts:
    """What one model call tells a family's hooks, with the image tokens' place worked out once per call:
    :meth:`where` caches :meth:`_locate` (the family's own: grid and offsets, or the reason they cannot be
    placed); a subclass sets ``_where = None`` when a new call starts.  :meth:`on_ids` records the position
    ids a model gives its RoPE embedder (a forward pre-hook on it), which the families check the grid with."""

    _where: Any = None
    ids: torch.Tensor | None = None

    def on_ids(self, _embedder: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else next(iter(kwargs.values()), None)
        self.ids = ids if torch.is_tensor(ids) and ids.dim() == 3 and ids.shape[-1] >= 3 else None
        self._where = None  # placed anew with these ids

    def where(self) -> Any:
        if self._where is None:
            self._where = self._locate()
        return self._where

    def _locate(self) -> Any:
        raise NotImplementedError


def placed(where: Any) -> Any:
    """A family's :meth:`CallFacts.where` answer for :meth:`AttentionCallFamily.locate`: the placement, or
    :class:`Skip` with the reason it could not be placed (``where`` answers with the reason's text)."""
    if isinstance(where, str):
        raise Skip(where)
    return where


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


def override_injector(calls: AttentionCalls):
    """Model pre-hook: the call's ``transformer_options`` (keyword, positional, or absent where ``forward``
    takes them) replaced by a copy that carries SEG's attention override (:meth:`AttentionCalls.with_override`);
    the caller's dict is never changed."""

    def pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if isinstance(kwargs.get(OPTIONS), dict):
            return args, {**kwargs, OPTIONS: calls.with_override(kwargs[OPTIONS])}
        try:
            position = list(inspect.signature(model.forward).parameters).index(OPTIONS)
        except (TypeError, ValueError):
            return None
        if position >= len(args) and OPTIONS not in kwargs:
            return args, {**kwargs, OPTIONS: calls.with_override({})}
        if position < len(args) and isinstance(args[position], dict):
            return (*args[:position], calls.with_override(args[position]), *args[position + 1 :]), kwargs
        return None

    return pre_hook


def seam_namespace(module: nn.Module) -> dict | None:
    """The module globals an attention module's class calls its attention function through (those of its
    ``forward``: Neo's model files import ``attention_function`` there and look it up at call time)."""
    namespace = getattr(inspect.unwrap(type(module).forward), "__globals__", None)
    return namespace if isinstance(namespace, dict) else None


class AttentionCallFamily(DitFamily):
    """A family whose chosen blocks are blurred at their self/joint attention call
    (:mod:`lib_seg.dit.attention_call`).  A subclass says which submodule of a block runs that attention
    (:attr:`attention`), which module-global names its file calls the kernel by (:attr:`seams`), what one
    model call tells it (:meth:`record`) and where the image lies in each attention call (:meth:`locate`)."""

    attention: ClassVar[dict[str, str]] = {}  # kind -> the block's submodule that runs its self/joint attention
    seams: tuple[str, ...] = ("attention_function",)  # module-global kernel names (Neo: ``backend.attention``)

    def record(self, model: nn.Module, handles: list[RemovableHandle]) -> Any:
        """Register, into ``handles``, the hooks that record what one model call tells :meth:`locate`; return
        the record (the family's own object)."""
        raise NotImplementedError

    def locate(self, record: Any, layer: DitLayer, call: CallShape, rows: Rows) -> ImageTokens | None:
        """Where the image lies in this attention call of ``layer`` (None: another of its calls; raise
        :class:`Skip` when it cannot be placed)."""
        raise NotImplementedError

    def attention_module(self, model: nn.Module, layer: DitLayer) -> nn.Module:
        block = self.block(model, layer)
        path = self.attention.get(layer.kind, "")
        return submodules(block, layer, [path])[0] if path else block

    def arm(
        self,
        model: nn.Module,
        layers: Iterable[DitLayer],
        sigma: float,
        rows: Rows,
        on_skip: SkipCallback | None,
        handles: list[RemovableHandle],
    ) -> None:
        calls = AttentionCalls(sigma, on_skip)
        record = self.record(model, handles)
        handles.append(model.register_forward_pre_hook(override_injector(calls), with_kwargs=True))
        for layer in layers:
            module = self.attention_module(model, layer)
            namespace = seam_namespace(module)
            if namespace is not None:
                handles.extend(w for name in self.seams if (w := calls.wrap(namespace, name)) is not None)
            handles.extend(_expecting(module, layer, calls, partial(self.locate, record, layer, rows=rows)))


def _expecting(module: nn.Module, layer: DitLayer, calls: AttentionCalls, locate) -> list[RemovableHandle]:
    """The pre-hook that arms ``layer``'s blur when ``module`` is called, and the hook that reports it when
    the module returns without having made the attention call."""

    def expect(_module: nn.Module, _args: tuple) -> None:
        calls.expect(layer, locate)

    def finish(_module: nn.Module, args: tuple, _output: Any) -> None:
        x = args[0] if args else None
        calls.finish(layer, x.shape[-2] if torch.is_tensor(x) and x.dim() == 3 else 0)  # (B, L, C) tokens

    return [module.register_forward_pre_hook(expect), module.register_forward_hook(finish, always_call=True)]
