"""The attention-call seam: blur a chosen block's image queries where its self/joint attention is called.

Why here: the queries that enter a host's attention function are final, normalised and rotated (RoPE)
already, so blurring their image rows is exactly blurring the image rows of the pre-softmax logits
(paper Prop. 3.1), with no RoPE algebra and whatever kernel computed q.  Hooking the q-norm module and
undoing RoPE (``R^-1 blur(R q)``) stopped working when Forge Neo 2.27 fused the norm and the rotation
into single kernels (``ck.rms_rope``, ``rms_rope_split_half``): no q-norm module is called any more.

How a call is caught.  A pre-hook on the module of a chosen block that runs its self/joint attention
(:meth:`AttentionCalls.expect`) arms one blur; the first attention call made inside that module takes
it (or the first whose tokens hold the image, where a block makes several calls: Qwen-Image 2.1 attends
segment by segment, the target image last), through whichever of two interceptors it reaches first:

* the host's official seam, ``transformer_options["optimized_attention_override"]`` (Neo >= 2.27's
  ``wrap_attn``, ComfyUI's): :meth:`AttentionCalls.with_override` returns a copy of the call's options
  with SEG's override, chained in front of any override another extension set (never replacing it);
* the model file's module-global attention function, looked up by name at call time (Neo 2.26, Forge 2.x,
  reForge, and 2.27+ files alike; ComfyUI's files import theirs as ``optimized_attention`` or
  ``optimized_attention_masked``): :meth:`AttentionCalls.wrap` replaces that name while armed and puts the
  host's function back on removal (unless another wrapper was put over it since; then SEG's stays in the
  chain and passes every call through once disarmed).  Newer ComfyUI passes q, k, v to it boxed in
  ``AttentionTensorContainer`` s: their tensors are read without being taken, and a blurred q goes on in a new
  box (:func:`unwrapped`, :func:`rewrapped`); its ``wrap_attn`` unboxes them before it calls an override.

Both lead to the same armed blur, which is taken once, so a call that passes both is blurred once.
Calls outside an armed module (the cross-attention to the text, refiners, unchosen blocks) pass
untouched.  When the module returns and its blur was never taken, the block is reported through
``on_skip`` (never a silent no-op): a fused kernel that bypasses both seams, as Nunchaku's.

The family says where the image sits in the call (:class:`ImageTokens`, or :class:`Skip` with the reason):
text, reference and pad rows are never blurred, and each frame of a video is blurred over its own grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lib_seg.core.blocks import DitLayer
from lib_seg.core.skips import SkipCallback
from lib_seg.dit.queries import Rows, blur_image_queries

OVERRIDE = "optimized_attention_override"  # the key Neo >= 2.27 and ComfyUI's ``wrap_attn`` honour
NEVER_CALLED = (
    "its attention call never reached SEG (a fused kernel that bypasses the host's attention function, "
    "such as Nunchaku's)"
)


class Skip(Exception):
    """This block's queries cannot be placed on the image grid in this call; the message says why."""


@dataclass(frozen=True)
class ImageTokens:
    """Where the image lies in one attention call's token axis: ``frames`` consecutive ``h x w`` frames
    (row-major each) from ``start``; ``rows``: the batch rows of that call to blur (None: all)."""

    start: int
    grid: tuple[int, int]
    frames: int = 1
    rows: Rows = None

    @property
    def stop(self) -> int:
        return self.start + self.frames * self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class CallShape:
    """What an attention call's arguments say: query and key tokens, batch rows."""

    queries: int
    keys: int
    batch: int


Locate = Callable[[CallShape], "ImageTokens | None"]  # None: not this call (keep waiting); raises Skip


def unwrapped(value: Any) -> Any:
    """The tensor inside newer ComfyUI's ``AttentionTensorContainer`` (``comfy/ldm/modules/attention.py``: a
    single-owner box with ``peek()`` / ``take()`` that its models pass q, k, v in), read with ``peek()`` so the
    host still finds it full; anything else as it is."""
    peek = getattr(value, "peek", None)
    return value if torch.is_tensor(value) or not callable(peek) else peek()


def rewrapped(original: Any, tensor: torch.Tensor) -> Any:
    """``tensor`` in a new container of ``original``'s type where ``original`` was one (:func:`unwrapped`), so the
    host's attention gets what it was called with; else ``tensor``."""
    return tensor if torch.is_tensor(original) or unwrapped(original) is original else type(original)(tensor)


def query_layout(q: Any, kwargs: dict) -> str | None:
    """The layout of an attention function's q: ``(B, heads, L, D)`` with ``skip_reshape`` (Flux-style
    callers), else ``(B, L, heads * D)``; None for anything else (then nothing is blurred)."""
    if not torch.is_tensor(q):
        return None
    if kwargs.get("skip_reshape", False):
        return "bhld" if q.dim() == 4 else None
    return "bld" if q.dim() == 3 else None


def blur_call_queries(q: torch.Tensor, layout: str, image: ImageTokens, sigma: float) -> torch.Tensor:
    """``q`` with the image rows blurred, each frame over its own grid (no temporal blur)."""
    image_rows = slice(image.start, image.stop)
    return blur_image_queries(q, image_rows, image.grid, sigma, layout, image.rows, image.frames)


class _Wrapper:
    """One module-global attention function replaced while armed; restored by :meth:`remove`."""

    def __init__(self, calls: AttentionCalls, namespace: dict, name: str):
        self.calls, self.namespace, self.name = calls, namespace, name
        self.original = namespace[name]
        self.function = self.attention  # one bound method: removal compares by identity
        namespace[name] = self.function

    def attention(self, *args, **kwargs):
        return self.original(*self.calls.blurred(args, kwargs), **kwargs)

    def remove(self) -> None:
        if self.namespace.get(self.name) is self.function:
            self.namespace[self.name] = self.original
        else:  # another wrapper sits on top: stay in its chain, passing everything through
            self.calls = _DISARMED


class AttentionCalls:
    """The armed state of one :func:`lib_seg.dit.hooks.blurred_dit_queries` block: at most one chosen
    attention module is inside its forward at a time (blocks run one after another)."""

    def __init__(self, sigma: float, on_skip: SkipCallback | None):
        self.sigma, self.on_skip = sigma, on_skip
        self._pending: tuple[DitLayer, Locate] | None = None
        self._wrapped: dict[tuple[int, str], _Wrapper] = {}

    # the armed blur
    def expect(self, layer: DitLayer, locate: Locate) -> None:
        """The next attention call belongs to ``layer``; ``locate`` places its image tokens."""
        self._pending = (layer, locate)

    def finish(self, layer: DitLayer, n_tokens: int = 0) -> None:
        """``layer``'s attention module returned: report it if its attention call never came."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == layer:
            self.skip(layer, n_tokens, None, NEVER_CALLED)

    def skip(self, layer: DitLayer, n_tokens: int, grid: tuple | None, reason: str | None = None) -> None:
        if self.on_skip is not None:
            self.on_skip(layer, int(n_tokens), grid, *(() if reason is None else (reason,)))

    def blurred(self, args: tuple, kwargs: dict) -> tuple:
        """The attention function's positional arguments, q blurred if a chosen call is pending."""
        if self._pending is None or len(args) < 2:
            return args
        layer, locate = self._pending
        q, k = unwrapped(args[0]), unwrapped(args[1])
        layout = query_layout(q, kwargs)
        if layout is None or not torch.is_tensor(k) or k.dim() != q.dim():
            self._pending = None
            shape = tuple(q.shape) if torch.is_tensor(q) else type(q).__name__
            self.skip(layer, 0, None, f"its attention was called with queries of an unknown layout {shape}")
            return args
        token_axis = 2 if layout == "bhld" else 1
        length = q.shape[token_axis]
        try:
            image = locate(CallShape(length, k.shape[token_axis], q.shape[0]))
        except Skip as reason:
            self._pending = None
            self.skip(layer, length, None, str(reason))
            return args
        if image is None:  # another of the block's calls (a text or reference segment): wait for the image's
            return args
        self._pending = None
        if image.stop > length:
            self.skip(layer, length, image.grid)
            return args
        return (rewrapped(args[0], blur_call_queries(q, layout, image, self.sigma)), *args[1:])

    # the interceptors
    def override(self, previous: Callable | None) -> Callable:
        """SEG's ``optimized_attention_override(func, *args, **kwargs)``, in front of ``previous``."""

        def override(func: Callable, *args, **kwargs):
            args = self.blurred(args, kwargs)
            return func(*args, **kwargs) if previous is None else previous(func, *args, **kwargs)

        return override

    def with_override(self, options: Any) -> Any:
        """A copy of a call's ``transformer_options`` with SEG's override (the caller's dict is untouched)."""
        if not isinstance(options, dict):
            return options
        return {**options, OVERRIDE: self.override(options.get(OVERRIDE))}

    def wrap(self, namespace: dict, name: str) -> _Wrapper | None:
        """Wrap ``namespace[name]`` (once per namespace and name); None when it is no callable."""
        key = (id(namespace), name)
        if key not in self._wrapped and callable(namespace.get(name)):
            self._wrapped[key] = _Wrapper(self, namespace, name)
        return self._wrapped.get(key)


class _Disarmed(AttentionCalls):
    def blurred(self, args: tuple, kwargs: dict) -> tuple:
        return args


_DISARMED = _Disarmed(0.0, None)
