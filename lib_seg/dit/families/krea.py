"""Krea 2: one stream of single-stream ``blocks`` over text, reference images and the image, RoPE in the attention.

Read at Neo 2.26 ``webui/backend/nn/krea.py`` (exo101/sd-webui-forge-neo-v3 de2193d; ComfyUI's
``comfy/ldm/krea2/model.py`` v0.26.1) and Neo >= 2.27 ``backend/nn/krea.py`` (xxxqwerty337/
sd-webui-forge-classic-1337 ba50f188, iqddd/stable-diffusion-webui-forge b4b6d513), interfaces only, no code
taken.  ``SingleStreamDiT`` is its own architecture, not a Flux or Qwen-Image variant: ``blocks``
(``SingleStreamBlock``) of grouped-query attention (48 query heads, 12 key/value heads, head 128, a sigmoid
output gate), fed by a text-fusion transformer (``txtfusion``) over 12 tapped Qwen3-VL layers.  It has no
``double_blocks``, ``single_blocks`` or ``joint_blocks``, so no other family claims it; it is asked first all
the same, as the only model with a ``txtfusion`` (the "Flux.1 Krea" checkpoint is a Flux.1).

* What is blurred: in each chosen block, the image-token queries as they enter the attention (after the
  QK-norm and RoPE).  Text and reference-image queries, all keys and values are untouched.
* Hook point: the attention call of ``blocks[i].attn`` (:mod:`lib_seg.dit.attention_call`):
  ``attention_function(q, k, v, heads, mask=mask, skip_reshape=True, transformer_options=...)``, a
  module global of ``krea.py`` (2.26 line 211, ba50f188 line 92), q ``(B, heads, L, D)`` after ``qknorm``
  and RoPE (2.26 Flux's ``apply_rope``, 2.27+ ``ck.apply_rope``; neither fuses the norm).  The 2.26
  reference path (``_forward_with_refs`` / ``_block_ref_forward``, lines 45-144) calls ``block.attn`` without
  calling the block, so the attention module, not the block, is armed.  The text fusion's attentions call
  the same function outside any armed module and pass untouched.
* Token order, from the model's own position ids (recorded at ``pe_embedder(pos)``): 2.26 runs
  ``[txt | image | references]``, 2.27+ ``[txt | reference 1 ... N | image]`` (ba50f188 lines 274-293;
  2.27+ resizes every reference to the image's size, so each has the image's grid).  Text ids are
  ``(0, 0, 0)``, the image's ``(0, row, col)``, reference ``i``'s ``(i + 1, row, col)``.  The image is the
  first run of ``h * w`` tokens after the text whose ids are ``(0, row, col)`` row-major on EVERY axis: a
  reference of the same size, ``(i + 1, row, col)``, is never taken for it.
* Text length: the tokens entering ``txtfusion``, ``(B, L, tapped layers, width)`` in both versions (2.26
  unpacks the call's ``(B, L, 12 * 2560)`` context after ``squeeze(1)``; 2.27+ passes the call's 4D
  ``(B, L, 12, 2560)`` context as it is).
* Grid: the patch is the model's ``patch`` (2; else the width of ``first``), odd sides padded, so
  ``ceil(H / p) x ceil(W / p)`` of the latent, 4D or Neo's 5D Wan layout ``(B, C, T, H, W)`` (2.26 folds
  frames into the batch, lines 366-369; 2.27+ squeezes the single frame).  A call whose ids hold no such
  image is left unblurred with a warning, never blurred on a guessed grid.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.queries import Rows

from .base import AttentionCallFamily, CallFacts, CallShape, ImageTokens, Skip, has_blocks, placed


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
    """The sequence rows of batch ``rows`` when each of the ``batch`` rows holds ``frames`` frames (Neo 2.26
    folds ``(B, C, T, H, W)`` into ``B * T`` sequences, batch-major)."""
    if rows is None or frames == 1:
        return rows
    chosen = range(*rows.indices(batch)) if isinstance(rows, slice) else [int(row) for row in rows]
    return [row * frames + t for row in chosen for t in range(frames)]


def image_start(ids: torch.Tensor, after: int, grid: tuple[int, int]) -> int | None:
    """The first token from ``after`` on where ``h * w`` ids ``(0, row, col)`` follow row-major, the same in
    every batch row (all three axes checked: a reference's ``(i + 1, row, col)`` never matches); else None."""
    h_len, w_len = grid
    n_image = h_len * w_len
    if ids.dim() != 3 or ids.shape[-1] < 3 or ids.shape[1] < after + n_image:
        return None
    index = torch.arange(n_image, device=ids.device)
    expected = torch.stack([torch.zeros_like(index), index // w_len, index % w_len], dim=-1).to(ids.dtype)
    origins = (ids[:, after:, :3].abs() < 0.5).all(-1).all(0).nonzero().flatten() + after  # ids (0, 0, 0)
    for start in origins.tolist():  # one per image-like run: the text is before ``after``
        if start + n_image <= ids.shape[1] and ((ids[:, start : start + n_image, :3] - expected).abs() < 0.5).all():
            return start
    return None


class _Call(CallFacts):
    """What one model call tells :meth:`Krea2Family.locate`: latent grid, text length, position ids."""

    def reset(self) -> None:
        super().reset()
        self.latent: tuple[int, int, int] | None = None  # (C, H, W)
        self.frames = 1
        self.n_txt: int | None = None

    def read(self, x: Any, call: dict[str, Any]) -> None:
        if torch.is_tensor(x) and x.dim() in (4, 5):
            self.latent = (int(x.shape[1]), *map(int, x.shape[-2:]))
            self.frames = int(x.shape[2]) if x.dim() == 5 else 1

    def on_text(self, _fusion: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        self.n_txt = int(x.shape[1]) if torch.is_tensor(x) and x.dim() == 4 else None

    def _locate(self) -> tuple[tuple[int, int], int] | str:
        found = self.latent_patch(model_patch, "4D or 5D")
        if isinstance(found, str):
            return found
        if self.n_txt is None:
            return "no (B, L, layers, width) text sequence reached the text fusion"
        grid = patch_grid(*found, pad=True)
        start = None if self.ids is None else image_start(self.ids, self.n_txt, grid)
        if start is None:
            return (
                f"the model's position ids hold no {grid[0]}x{grid[1]} image, ids (0, row, column) row-major, "
                f"after its {self.n_txt} text tokens"
            )
        return grid, start


class Krea2Family(AttentionCallFamily):
    """Krea 2: ``blocks`` of single-stream joint attention; the letter is ``s`` (``SingleStreamBlock``)."""

    name, title = "krea2", "Krea 2"
    attributes: ClassVar[dict[str, str]] = {"single": "blocks"}
    attention: ClassVar[dict[str, str]] = {"single": "attn"}
    # Krea-2-Raw ``transformer/config.json`` ``num_layers`` 28 (Neo ``backend/huggingface/krea/Krea-2-Raw``); Neo's
    # detection counts ``blocks.N`` (``huggingface_guess/detection.py``).
    released: ClassVar[dict[str, dict[str, int]]] = {"krea-2": {"single": 28}}
    default_source = (
        "no published Krea 2 SEG, PAG or skip-layer choice: the middle block, s14 of Krea 2's 28 "
        "(Krea-2-Raw transformer/config.json)"
    )
    facts, ids_from = _Call, "pe_embedder"

    def matches(self, model: Any) -> bool:
        if not has_blocks(model, "blocks") or not has_blocks(
            getattr(model, "txtfusion", None), "layerwise_blocks", "refiner_blocks"
        ):
            return False
        return isinstance(getattr(model, "pe_embedder", None), nn.Module) and all(
            isinstance(getattr(getattr(block, "attn", None), "qknorm", None), nn.Module) for block in model.blocks
        )

    def record(self, model: nn.Module, call: _Call, handles: list[RemovableHandle]) -> None:
        handles.append(model.txtfusion.register_forward_pre_hook(call.on_text, with_kwargs=True))

    def locate(self, record: _Call, layer: DitLayer, call: CallShape, rows: Rows) -> ImageTokens:
        grid, start = placed(record.where())
        if call.batch % record.frames:
            raise Skip(f"its {call.batch} sequences are not the {record.frames} frames of each latent row")
        return ImageTokens(start, grid, rows=frame_rows(rows, record.frames, call.batch // record.frames))


KREA2 = Krea2Family()
# The block counts as tests/dit/test_krea.py reads them (the facts are :attr:`Krea2Family.released`).
RELEASED = {model: blocks["single"] for model, blocks in KREA2.released.items()}
