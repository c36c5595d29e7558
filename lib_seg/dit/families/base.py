"""What every DiT family module provides (:class:`DitFamily`), and the pieces they share.

A family turns three questions into code: which blocks a model has (:meth:`DitFamily.blocks`, in the
order the model runs them, which the prefix reuse needs), what ``middle`` selects on it
(:meth:`DitFamily.default_spec`), and which forward hooks make one model call blur the image queries
of the chosen blocks (:meth:`DitFamily.arm`).  It also states its facts: the released models it knows and
their blocks (:attr:`DitFamily.released`), its published default and where that comes from.  Hooks go into
the caller's list of handles as they are registered; the caller removes them in ``finally``, so an
exception never leaves one behind.

Two ways to blur share one skeleton each: :class:`QNormFamily` (a forward hook on the chosen blocks' q-norm
modules) and :class:`AttentionCallFamily` (the attention call, :mod:`lib_seg.dit.attention_call`).  Both
record what one model call tells them in a :class:`CallFacts` (:meth:`DitFamily.recorded_call`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core import blocks as dit_layers
from lib_seg.core.blocks import DitLayer
from lib_seg.core.skips import SkipCallback
from lib_seg.dit.attention_call import AttentionCalls, CallShape, ImageTokens, Skip
from lib_seg.dit.geometry import positions_fit_grid
from lib_seg.dit.queries import Rows

__all__ = ["AttentionCallFamily", "CallFacts", "CallShape", "DitFamily", "ImageTokens", "QNormFamily", "Skip"]
OPTIONS = "transformer_options"


class CallFacts:
    """What one model call tells a family's hooks, with the image tokens' place worked out once per call.

    A family's subclass (:attr:`DitFamily.facts`) resets its own fields in :meth:`reset` (calling this one's),
    reads the call's arguments in :meth:`read`, and places the image in :meth:`_locate`, which :meth:`where`
    caches until the next call (the grid and offsets, or the reason they cannot be placed).  :meth:`on_ids`
    records the position ids a model gives its RoPE embedder (a forward pre-hook on it), which the families
    check the grid with; :meth:`recorder` keeps each chosen block's call arguments that :meth:`read_block`
    picks (rotations, a text length) in :attr:`seen`."""

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        self.reset()

    def reset(self) -> None:
        """A new model call: nothing is known of it yet."""
        self.latent: tuple[int, ...] | None = None
        self.n_context: int | None = None
        self.ids: torch.Tensor | None = None
        self.seen: dict[DitLayer, Any] = {}
        self._where: Any = None

    def on_model(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Model pre-hook: a new call, whose arguments (by name; the latent ``x`` named or first) :meth:`read` gets."""
        self.reset()
        call = arguments(model, args, kwargs)
        self.read(call.get("x", args[0] if args else None), call)

    def read(self, x: Any, call: dict[str, Any]) -> None:
        """What the model call's latent ``x`` and its other arguments tell; by default a 4D latent's
        ``(C, H, W)`` and the length of the text ``context`` ``(B, L, C)``."""
        context = call.get("context")
        if torch.is_tensor(x) and x.dim() == 4:
            self.latent = tuple(x.shape[1:])
        if torch.is_tensor(context) and context.dim() == 3:
            self.n_context = int(context.shape[1])

    def on_ids(self, _embedder: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else next(iter(kwargs.values()), None)
        self.ids = ids if torch.is_tensor(ids) and ids.dim() == 3 and ids.shape[-1] >= 3 else None
        self._where = None  # placed anew with these ids

    def recorder(self, layer: DitLayer):
        """A forward pre-hook that keeps what :meth:`read_block` picks of ``layer``'s call arguments."""

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.seen[layer] = self.read_block(layer, arguments(module, args, kwargs))

        return pre_hook

    def read_block(self, layer: DitLayer, call: dict[str, Any]) -> Any:
        """What the hooks need of a chosen block's call arguments (by name)."""
        raise NotImplementedError

    def where(self) -> Any:
        if self._where is None:
            self._where = self._locate()
        return self._where

    def _locate(self) -> Any:
        raise NotImplementedError

    def latent_patch(self, patch_of: Callable[[nn.Module, int], int | None], latent: str = "4D"):
        """``(height, width, patch)`` of this call's ``self.latent`` ``(C, H, W)`` with the patch side that
        ``patch_of(model, channels)`` reads from the model, or the reason there are none."""
        if self.latent is None:
            return f"the model call passed no {latent} latent"
        channels, height, width = self.latent
        patch = patch_of(self.model, channels)
        return "the model's patch size could not be read" if patch is None else (height, width, patch)

    def ids_misplace(self, start: int, grid: tuple[int, int]) -> str | None:
        """Why the recorded position ids do not lay the ``h * w`` tokens from ``start`` row-major on ``grid``
        (axes 1, 2 = row, column), or None (they do, or none were recorded)."""
        stop = start + grid[0] * grid[1]
        if self.ids is not None and (
            self.ids.shape[1] < stop or not positions_fit_grid(self.ids[:, start:stop, 1:3], grid)
        ):
            return f"the model's position ids do not lay its image tokens on the {grid[0]}x{grid[1]} grid"
        return None


class DitFamily:
    """One DiT family.  Subclasses set the class attributes and implement :meth:`matches` and :meth:`arm` (the
    two ways to blur, :class:`QNormFamily` and :class:`AttentionCallFamily`, arm from the facts they state)."""

    name = "dit"
    title = "DiT"  # for messages and the README
    kinds: tuple[str, ...] = ()  # block kinds, in execution order (by default those of :attr:`attributes`)
    attributes: ClassVar[dict[str, str]] = {}  # kind -> the model's ModuleList attribute (default ``<kind>_blocks``)
    released: ClassVar[dict[str, dict[str, int]]] = {}  # released model -> {block kind: count} (each family's own)
    default: str | None = None  # the published default spec, used when the model has those blocks
    default_source = ""  # where :attr:`default` comes from
    prefix_reuse = True  # may the SEG rows skip the blocks before the first blurred one (lib_seg.dit.prefix)
    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {}  # kind -> the block's submodules whose forward
    # hook blurs (a q-norm); :meth:`watch` reports a chosen block none of which ran in a model call
    never_ran = "its q-norm module never ran in this call (a fused kernel); SEG could not blur it"
    facts: ClassVar[type[CallFacts]] = CallFacts  # what one model call tells the hooks (one per :meth:`arm`)
    ids_from = ""  # the model's submodule called with the position ids (a pre-hook records them), if any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A family whose :attr:`attributes` name every kind's ModuleList, in execution order, does not list
        its :attr:`kinds` again."""
        super().__init_subclass__(**kwargs)
        if "attributes" in vars(cls) and "kinds" not in vars(cls):
            cls.kinds = tuple(cls.attributes)

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
        """What ``middle`` selects on ``model`` (:meth:`default_for` its blocks)."""
        return self.default_for(self.layers(model))

    def default_for(self, layers: Iterable[DitLayer]) -> str:
        """What ``middle`` selects on a model with these blocks: :attr:`default` where the model has those
        blocks, else the middle block of each stream (:func:`lib_seg.core.blocks.default_layers`)."""
        return dit_layers.default_layers(layers, self.default)

    def recorded_call(self, model: nn.Module, handles: list[RemovableHandle]) -> CallFacts:
        """A new :attr:`facts` of ``model``'s calls, and, into ``handles``, the hooks that fill it: the model's
        pre-hook, the position ids' (:attr:`ids_from`) and the family's own (:meth:`record`)."""
        call = self.facts(model)
        handles.append(model.register_forward_pre_hook(call.on_model, with_kwargs=True))
        embedder = getattr(model, self.ids_from, None) if self.ids_from else None
        if isinstance(embedder, nn.Module):
            handles.append(embedder.register_forward_pre_hook(call.on_ids, with_kwargs=True))
        self.record(model, call, handles)
        return call

    def record(self, model: nn.Module, call: CallFacts, handles: list[RemovableHandle]) -> None:
        """Register, into ``handles``, the family's further hooks that fill ``call`` (none by default)."""

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


QueryHook = Callable[[nn.Module, tuple, Any], Any]  # a q-norm's forward hook: the blurred queries, or None


class QNormFamily(DitFamily):
    """A family whose chosen blocks are blurred by a forward hook on their q-norm modules
    (:attr:`query_modules`) that returns the blurred queries (``R^-1 blur(R q)`` where the host's RoPE
    follows, :func:`lib_seg.dit.queries.blur_before_rope`).  A subclass states what one model call tells
    the hook (:attr:`facts`, :attr:`ids_from`, :meth:`record`), which module of a chosen block gets the call
    arguments the hook needs (:attr:`arguments_of`), and the hook (:attr:`hook`)."""

    arguments_of: str | None = None  # the chosen block's submodule whose arguments ``facts.recorder`` keeps
    # ("": the block itself; None: none)
    hook: ClassVar[Callable[..., QueryHook]]  # (layer, call, sigma, rows, on_skip) -> the q-norm's forward hook

    def arm(self, model, layers, sigma, rows, on_skip, handles) -> None:  # DitFamily.arm's signature
        call = self.recorded_call(model, handles)
        for layer in layers:
            block = self.block(model, layer)
            if self.arguments_of is not None:
                module = submodules(block, layer, [self.arguments_of])[0]  # "" names the block itself
                handles.append(module.register_forward_pre_hook(call.recorder(layer), with_kwargs=True))
            hook = self.hook(layer, call, sigma, rows, on_skip)
            norms = submodules(block, layer, self.query_modules[layer.kind])
            handles.extend(norm.register_forward_hook(hook) for norm in norms)


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


def has_structure(model: Any, blocks: str, parts: Iterable[str] = (), block_parts: Iterable[str] = ()) -> bool:
    """Whether ``model`` has a non-empty ModuleList ``blocks``, a module under each of ``parts``, and its first
    block a submodule under each of ``block_parts`` (dotted paths)."""
    if not has_blocks(model, blocks) or not len(getattr(model, blocks)):
        return False
    if not all(isinstance(getattr(model, name, None), nn.Module) for name in parts):
        return False
    modules = dict(getattr(model, blocks)[0].named_modules())
    return all(name in modules for name in block_parts)


def submodules(block: nn.Module, layer: DitLayer, names: Iterable[str]) -> list[nn.Module]:
    """The named submodules of ``block`` that exist (at least one must); ``""`` names ``block`` itself."""
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
    ``forward``: Neo's model files import ``attention_function`` there, ComfyUI's ``optimized_attention[_masked]``,
    and look it up at call time)."""
    namespace = getattr(inspect.unwrap(type(module).forward), "__globals__", None)
    return namespace if isinstance(namespace, dict) else None


class AttentionCallFamily(DitFamily):
    """A family whose chosen blocks are blurred at their self/joint attention call
    (:mod:`lib_seg.dit.attention_call`).  A subclass says which submodule of a block runs that attention
    (:attr:`attention`), which module-global names its file calls the kernel by (:attr:`seams`), what one
    model call tells it (:attr:`facts`, :attr:`ids_from`, :meth:`record`) and where the image lies in each
    attention call (:meth:`locate`)."""

    attention: ClassVar[dict[str, str]] = {}  # kind -> the block's submodule that runs its self/joint attention
    # module-global kernel names: Neo's ``attention_function`` (from ``backend.attention``), ComfyUI's
    # ``optimized_attention`` / ``optimized_attention_masked`` (``from comfy.ldm.modules.attention import ...``: e.g.
    # ``comfy/ldm/lumina/model.py:12``, ``qwen_image/model.py:11``, ``wan/model.py:9``, ``cosmos/predict2.py:16``)
    seams: tuple[str, ...] = ("attention_function", "optimized_attention", "optimized_attention_masked")

    def locate(self, record: Any, layer: DitLayer, call: CallShape, rows: Rows) -> ImageTokens | None:
        """Where the image lies in this attention call of ``layer`` (None: another of its calls; raise
        :class:`Skip` when it cannot be placed)."""
        raise NotImplementedError

    def attention_module(self, model: nn.Module, layer: DitLayer) -> nn.Module:
        return submodules(self.block(model, layer), layer, [self.attention.get(layer.kind, "")])[0]

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
        record = self.recorded_call(model, handles)
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
