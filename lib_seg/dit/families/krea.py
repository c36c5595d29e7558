"""Krea 2: one stream of single-stream ``blocks`` over ``[txt | image | reference images]``, RoPE in the attention.

Read at Neo ``webui/backend/nn/krea.py`` (de2193d; ComfyUI's ``comfy/ldm/krea2/model.py`` v0.26.1), interfaces
only, no code taken.  ``SingleStreamDiT`` is its own architecture, not a Flux or Qwen-Image variant (it borrows
Flux's ``EmbedND``/``apply_rope`` and Qwen-Image's VAE): 28 ``blocks`` (``SingleStreamBlock``, lines 273-287)
of grouped-query attention (48 query heads, 12 key/value heads, head 128, a sigmoid output gate), fed by a
text-fusion transformer (``txtfusion``) over 12 tapped Qwen3-VL layers.  It has no ``double_blocks``,
``single_blocks`` or ``joint_blocks``, so no other family claims it; it is asked first all the same, as the
only model with a ``txtfusion`` (the "Flux.1 Krea" checkpoint is a Flux.1 and stays with that family).

* What is blurred: in each chosen block, the image-token queries of the joint attention after the QK-norm
  and after RoPE.  Text and reference-image queries, all keys and values are untouched.
* Hook point: ``blocks[i].attn.qknorm``, called as ``qknorm(q, k) -> (q, k)`` with q ``(B, heads, L, D)``
  (``Attention.forward``, lines 199-212); RoPE follows inside ``apply_rope``, which no extension reaches, so
  the forward hook returns ``R^-1 blur(R q)`` (:func:`lib_seg.dit.queries.blur_before_rope`).  The rotations
  ``freqs`` are recorded by a pre-hook on ``blocks[i].attn`` (not on the block: the reference-image path,
  ``_block_ref_forward`` lines 45-72, never calls the block as a module).
* Geometry from the model and the call: the patch is the model's ``patch`` (2; else the width of ``first``),
  odd sides are padded (``pad_to_patch_size``), so the grid is ``ceil(H / p) x ceil(W / p)`` of the latent,
  4D or Neo's 5D Wan-layout ``(B, C, T, H, W)`` (frames folded into the batch, lines 366-369); the text
  length is the call's ``context.squeeze(1)`` length (the text-fusion keeps it); the model's own position
  ids, recorded at ``pe_embedder(pos)``, must put the tokens after the text row-major on that grid (text
  ``(0, 0, 0)``, image ``(0, row, col)``, reference ``i`` ``(i + 1, row, col)``, lines 116-121, 392-397).
  A call that fails this is left unblurred with a warning, never blurred on a guessed grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.dit.geometry import patch_grid, positions_fit_grid
from lib_seg.dit.layers import DitLayer
from lib_seg.dit.queries import Rows, blur_before_rope

from .base import CallFacts, DitFamily, SkipCallback, arguments, has_blocks, skipped, submodules

# Released block counts: Krea-2-Raw ``transformer/config.json`` ``num_layers`` 28 (Neo
# ``backend/huggingface/krea/Krea-2-Raw``); Neo's detection counts ``blocks.N`` (``huggingface_guess/detection.py``).
RELEASED = {"krea-2": 28}


def model_patch(model: nn.Module, channels: int) -> int | None:
    """Krea's patch side: its ``patch`` attribute, else the width of ``first`` (``channels * patch**2``)."""
    patch = getattr(model, "patch", None)
    if isinstance(patch, int) and patch >= 1:
        return patch
    features = getattr(getattr(model, "first", None), "in_features", None)
    if isinstance(features, int) and channels > 0 and features % channels == 0:
        side = math.isqrt(features // channels)
        return side if side * side * channels == features else None
    return None


def frame_rows(rows: Rows, frames: int, batch: int) -> Rows:
    """The sequence rows of batch ``rows`` when each of the ``batch`` rows holds ``frames`` frames (Neo folds
    ``(B, C, T, H, W)`` into ``B * T`` sequences, batch-major)."""
    if rows is None or frames == 1:
        return rows
    chosen = range(*rows.indices(batch)) if isinstance(rows, slice) else [int(row) for row in rows]
    return [row * frames + t for row in chosen for t in range(frames)]


class _Call(CallFacts):
    """What one model call tells the hooks: latent grid, text length, position ids, each layer's rotations."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.latent: tuple[int, int, int] | None = None  # (C, H, W)
        self.frames = 1
        self.n_txt: int | None = None
        self.ids: torch.Tensor | None = None
        self.freqs: dict[DitLayer, torch.Tensor] = {}
        self._where: tuple | str | None = None

    def on_model(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.reset()
        call = arguments(model, args, kwargs)
        x, context = call.get("x", args[0] if args else None), call.get("context")
        if torch.is_tensor(x) and x.dim() in (4, 5):
            self.latent = (int(x.shape[1]), *map(int, x.shape[-2:]))
            self.frames = int(x.shape[2]) if x.dim() == 5 else 1
        if torch.is_tensor(context) and context.dim() in (3, 4):
            context = context.squeeze(1)  # Neo: ``context.squeeze(1)`` before unpacking the tapped layers
            self.n_txt = int(context.shape[1]) if context.dim() == 3 else None

    def on_ids(self, _embedder: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else next(iter(kwargs.values()), None)
        self.ids = ids if torch.is_tensor(ids) and ids.dim() == 3 and ids.shape[-1] >= 3 else None

    def freqs_recorder(self, layer: DitLayer):
        def pre_hook(attn: nn.Module, args: tuple, kwargs: dict) -> None:
            self.freqs[layer] = arguments(attn, args, kwargs).get("freqs")

        return pre_hook

    def _locate(self) -> tuple[tuple[int, int], int] | str:
        if self.latent is None:
            return "the model call passed no 4D or 5D latent"
        channels, height, width = self.latent
        patch = model_patch(self.model, channels)
        if patch is None:
            return "the model's patch size could not be read"
        if self.n_txt is None:
            return "the model call passed no text sequence"
        grid = patch_grid(height, width, patch, pad=True)
        stop = self.n_txt + grid[0] * grid[1]
        if self.ids is None or self.ids.shape[1] < stop:
            return f"the model's position ids do not hold {self.n_txt} text and {grid[0]}x{grid[1]} image tokens"
        if not positions_fit_grid(self.ids[:, self.n_txt : stop, 1:3], grid):
            return f"the model's position ids do not lay its image tokens on the {grid[0]}x{grid[1]} grid"
        return grid, self.n_txt


def _hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on ``attn.qknorm``: ``(q, k) -> (R^-1 blur(R q), k)`` on the image queries."""

    def hook(_norm: nn.Module, _args: tuple, output: Any) -> Any:
        q, k = output
        where = call.where()
        if isinstance(where, str):
            return skipped(on_skip, layer, q.shape[-2], None, where)
        grid, n_txt = where
        freqs = call.freqs.get(layer)
        if q.dim() != 4 or not torch.is_tensor(freqs) or freqs.dim() != 6:
            return skipped(on_skip, layer, q.shape[-2], grid, "no RoPE rotations reached the block")
        image = slice(n_txt, n_txt + grid[0] * grid[1])
        if image.stop > q.shape[2] or freqs.shape[2] != q.shape[2]:
            return skipped(on_skip, layer, q.shape[2], grid)
        seq_rows = frame_rows(rows, call.frames, q.shape[0] // call.frames)
        return blur_before_rope(q, freqs, image, grid, sigma, seq_rows), k

    return hook


class Krea2Family(DitFamily):
    """Krea 2: ``blocks`` of single-stream joint attention; the letter is ``s`` (``SingleStreamBlock``)."""

    name, title = "krea2", "Krea 2"
    kinds = ("single",)
    attributes: ClassVar[dict[str, str]] = {"single": "blocks"}
    default = None
    default_source = (
        "no published Krea 2 SEG, PAG or skip-layer choice: the middle block, s14 of Krea 2's 28 "
        "(Krea-2-Raw transformer/config.json)"
    )

    def matches(self, model: Any) -> bool:
        if not has_blocks(model, "blocks") or not has_blocks(
            getattr(model, "txtfusion", None), "layerwise_blocks", "refiner_blocks"
        ):
            return False
        return isinstance(getattr(model, "pe_embedder", None), nn.Module) and all(
            isinstance(getattr(getattr(block, "attn", None), "qknorm", None), nn.Module) for block in model.blocks
        )

    def arm(
        self,
        model: nn.Module,
        layers: Iterable[DitLayer],
        sigma: float,
        rows: Rows,
        on_skip: SkipCallback | None,
        handles: list[RemovableHandle],
    ) -> None:
        call = _Call(model)
        handles.append(model.register_forward_pre_hook(call.on_model, with_kwargs=True))
        handles.append(model.pe_embedder.register_forward_pre_hook(call.on_ids, with_kwargs=True))
        for layer in layers:
            block = self.block(model, layer)
            attn, norm = submodules(block, layer, ["attn"])[0], submodules(block, layer, ["attn.qknorm"])[0]
            handles.append(attn.register_forward_pre_hook(call.freqs_recorder(layer), with_kwargs=True))
            handles.append(norm.register_forward_hook(_hook(layer, call, sigma, rows, on_skip)))


KREA2 = Krea2Family()
