"""Blur the image queries of chosen DiT blocks for one model call, with module hooks.

Why module hooks: Forge 2.x's Flux/Chroma ``forward`` drops ``transformer_options`` (no patch reaches
the blocks), reForge offers only whole-block replacement, and A1111 has no patch system at all; but
on every host the q-normalisation is a submodule *called as a module*, so a forward hook on it fires
on all three (``docs/dit.md``, "Hook points per host").  Hooks live only inside
:func:`blurred_dit_queries` and are removed in ``finally``.

* Flux/Chroma (``double_blocks``/``single_blocks``): the hook replaces the ``q`` of the QK-norm's
  ``(q, k)`` output with :func:`.queries.blur_before_rope`, so that the host's RoPE then yields the
  blurred post-RoPE queries.  The rotations ``pe`` come from a pre-hook on the block, the text length
  from the first double block's ``txt`` and the latent size from the model's ``x``.
* SD3/SD3.5 MMDiT (``joint_blocks``): the image stream's ``ln_q`` output ``(B, L_img, heads, D)`` is
  what enters attention (no RoPE); it is blurred directly.  SD3.5's second, image-only self-attention
  (``x_block.attn2``, blocks 0-12 of Medium) is blurred too: its queries are image queries of the
  chosen block as well.

The patch grid is found from the latent and the token count: every host pads odd sides
(``(H + 1) // 2``) except Forge 2.x's MMDiTX and A1111's SD3 (``H // 2``); for MMDiT the image query
count tells which, for Flux/Chroma both hosts pad.  A query count that fits no grid (a tiling
extension) leaves that block unblurred and calls ``on_skip``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import layers as dit_layers
from .geometry import patch_grid
from .layers import DitLayer
from .queries import Rows, blur_before_rope, blur_image_queries

FLUX, MMDIT = "flux", "mmdit"  # block layouts: Flux/Chroma double+single stream, SD3 joint
SkipCallback = Callable[..., None]  # (layer, n_tokens, grid=None)


def dit_family(model: Any) -> str | None:
    """``"flux"`` (Flux, Chroma), ``"mmdit"`` (SD3, SD3.5), or None when ``model`` is neither."""
    if not isinstance(model, nn.Module):
        return None
    if isinstance(getattr(model, "double_blocks", None), nn.ModuleList) and isinstance(
        getattr(model, "single_blocks", None), nn.ModuleList
    ):
        return FLUX
    if isinstance(getattr(model, "joint_blocks", None), nn.ModuleList):
        return MMDIT
    return None


def available_layers(model: nn.Module) -> tuple[DitLayer, ...]:
    """Every block of ``model`` SEG can blur."""
    if dit_family(model) == FLUX:
        return dit_layers.model_layers(double=len(model.double_blocks), single=len(model.single_blocks))
    if dit_family(model) == MMDIT:
        return dit_layers.model_layers(joint=len(model.joint_blocks))
    return ()


def _block(model: nn.Module, layer: DitLayer) -> nn.Module:
    blocks = getattr(model, f"{layer.kind}_blocks", None)
    if blocks is None or not 0 <= layer.index < len(blocks):
        raise ValueError(f"SEG layers: this model has no {layer.kind} block {layer.index}")
    return blocks[layer.index]


def _arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name (hosts pass ``pe`` positionally or by keyword)."""
    try:
        return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


class _Call:
    """What one model call tells the hooks: latent size, text length, the rotations per block."""

    def __init__(self) -> None:
        self.latent: tuple[int, int] | None = None
        self.n_txt: int | None = None
        self.pe: dict[DitLayer, torch.Tensor] = {}

    def record_latent(self, _model: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        self.latent = tuple(x.shape[-2:]) if torch.is_tensor(x) and x.dim() == 4 else None

    def record_text(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        txt = _arguments(block, args, kwargs).get("txt")
        self.n_txt = int(txt.shape[1]) if torch.is_tensor(txt) and txt.dim() == 3 else None

    def pe_recorder(self, key: DitLayer):
        def pre_hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            self.pe[key] = _arguments(block, args, kwargs).get("pe")

        return pre_hook

    def grid(self, n_image: int | None = None, pad: bool = True) -> tuple[int, int] | None:
        """The patch grid; with ``n_image`` the convention (pad or not) whose grid holds that many tokens."""
        if self.latent is None:
            return None
        for candidate in (pad, not pad):
            grid = patch_grid(*self.latent, pad=candidate)
            if n_image is None or grid[0] * grid[1] == n_image:
                return grid
        return None


def _flux_hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on a Flux/Chroma QK-norm: ``(q, k) -> (R^-1 blur(R q), k)`` on the image queries."""

    def hook(_norm: nn.Module, _args: tuple, output: Any) -> Any:
        q, k = output
        pe, grid = call.pe.get(layer), call.grid()
        n_txt = 0 if layer.kind == "double" else call.n_txt
        if pe is None or grid is None or n_txt is None or q.dim() != 4:
            return _skipped(on_skip, layer, q.shape[-2], grid)
        if layer.kind == "double":  # image-stream q: its rotations are the last q.shape[2] of pe
            pe = pe[:, :, pe.shape[2] - q.shape[2] :]
        image = slice(n_txt, n_txt + grid[0] * grid[1])
        if image.stop > q.shape[2] or pe.shape[2] != q.shape[2]:
            return _skipped(on_skip, layer, q.shape[2], grid)
        return blur_before_rope(q, pe, image, grid, sigma, rows), k

    return hook


def _mmdit_hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on an MMDiT image stream's ``ln_q``: ``(B, L_img, heads, D)`` blurred over the grid."""

    def hook(_norm: nn.Module, _args: tuple, q: torch.Tensor) -> Any:
        grid = call.grid(q.shape[1], pad=True) if q.dim() == 4 else None
        if grid is None:
            return _skipped(on_skip, layer, q.shape[1], call.grid())
        return blur_image_queries(q, slice(0, q.shape[1]), grid, sigma, "blhd", rows)

    return hook


def _skipped(on_skip: SkipCallback | None, layer: DitLayer, n_tokens: int, grid: tuple | None) -> None:
    """Leave the block's queries as they are (the hook returns None) and say so."""
    if on_skip is not None:
        on_skip(layer, int(n_tokens), grid)
    return None


def _query_norms(block: nn.Module, layer: DitLayer) -> list[nn.Module]:
    """The modules whose output is the block's image queries before attention (see module docstring)."""
    if layer.kind == "double":
        names = ["img_attn.norm"]
    elif layer.kind == "single":
        names = ["norm"]
    else:
        names = ["x_block.attn.ln_q", "x_block.attn2.ln_q"]
    modules = dict(block.named_modules())
    found = [modules[name] for name in names if name in modules]
    if not found:
        raise ValueError(f"SEG layers: {dit_layers.format_layers([layer])} has no {names[0]} to hook")
    return found


@contextmanager
def blurred_dit_queries(
    model: nn.Module,
    layers: Iterable[DitLayer],
    sigma: float,
    rows: Rows = None,
    on_skip: SkipCallback | None = None,
) -> Iterator[None]:
    """Within the block, calls of ``model`` blur the image queries of ``layers`` (batch ``rows`` only if given)."""
    family = dit_family(model)
    if family is None:
        raise ValueError(f"SEG: {type(model).__name__} is not a Flux, Chroma or SD3 transformer")
    call = _Call()
    handles = [model.register_forward_pre_hook(call.record_latent, with_kwargs=True)]
    try:
        if family == FLUX and len(model.double_blocks):
            handles.append(model.double_blocks[0].register_forward_pre_hook(call.record_text, with_kwargs=True))
        for layer in layers:
            block = _block(model, layer)
            if family == FLUX:
                handles.append(block.register_forward_pre_hook(call.pe_recorder(layer), with_kwargs=True))
                hook = _flux_hook(layer, call, sigma, rows, on_skip)
            else:
                hook = _mmdit_hook(layer, call, sigma, rows, on_skip)
            handles.extend(norm.register_forward_hook(hook) for norm in _query_norms(block, layer))
        yield
    finally:
        for handle in handles:
            handle.remove()
