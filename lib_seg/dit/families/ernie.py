"""Ernie-Image (Baidu ERNIE-Image, -Turbo): one stream of ``layers`` over ``[image | text]``.

Read at Neo ``webui/backend/nn/ernie.py`` (de2193d; ComfyUI's ``comfy/ldm/ernie/model.py``), interfaces only,
no code taken.  ``ErnieImageModel``: 36 ``layers`` (``ErnieImageSharedAdaLNBlock``, one adaLN modulation
shared by all), full self-attention over ``cat(image, text)`` (image first, lines 244, 270), patch 1 on the
128-channel Flux.2 latent.

* What is blurred: in each chosen layer, the image-token queries as they enter attention, after ``norm_q``
  and after RoPE.  Text queries, all keys and values are untouched.
* Why not the q-norm hook with ``R^-1 blur(R q)`` (as Flux): Ernie's RoPE is no rotation.
  ``ErnieImageEmbedND3`` (lines 28-47) builds, for the split-half channel pair ``(i, i + D/2)``, the map
  ``[[cos a, -sin a], [sin b, cos b]]`` with two different angles ``a`` (angle ``i // 2``) and ``b`` (angle
  ``D/4 + i // 2``); ``comfy_kitchen.apply_rope_split_half`` applies it as given.  Its determinant is
  ``cos(a - b)``: at the released axes (32, 48, 48), theta 256, a 64x64 grid has pairs down to 5e-5, so the
  inverse multiplies bf16 rounding by 10^4 there.  The hook is therefore after RoPE, exact in any dtype.
* Hook point: ``ErnieImageAttention.forward`` (lines 114-135) calls ``attention_function(q, k, v, heads,
  mask=...)`` by its module-global name, looked up at call time, with q ``(B, L, heads * D)`` after RoPE; no
  module sits between RoPE and that call.  That is the attention-call seam every family uses
  (:mod:`lib_seg.dit.attention_call`): the chosen layers' ``self_attention`` calls are blurred, every other
  call passes, and a chosen layer whose call never reached the seam is reported.
* Geometry: the patch is the model's ``patch_size`` (else ``x_embedder``'s); the patch embedding is a
  stride-``p`` convolution without pad, so the grid is ``(H // p) x (W // p)``; the image is the first
  ``N`` tokens, the text the call's ``context`` length after it; the model's own position ids
  (``pos_embed(ids)``, image ``(T, row, col)`` first) must lay the image tokens row-major on the grid (any
  per-axis scale and shift allowed, as the host's ``rope_options`` give), and ``N + text`` must be the
  sequence.  Anything else skips the layer with a warning.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.queries import Rows

from .base import AttentionCallFamily, CallFacts, CallShape, ImageTokens, Skip, has_structure, placed


def model_patch(model: nn.Module) -> int | None:
    """The patch side: the model's ``patch_size``, else its ``x_embedder``'s (or that one's kernel)."""
    embedder = getattr(model, "x_embedder", None)
    kernel = getattr(getattr(embedder, "proj", None), "kernel_size", None)
    for size in (getattr(model, "patch_size", None), getattr(embedder, "patch_size", None), kernel):
        size = size[-1] if isinstance(size, tuple) and len(set(size)) == 1 else size
        if isinstance(size, int) and size >= 1:
            return size
    return None


def ids_on_grid(positions: torch.Tensor, grid: tuple[int, int]) -> bool:
    """Whether (row, column) position ids ``(B, h * w, 2)`` lie row-major on ``grid``: rows constant along a
    row and increasing down, columns constant down and increasing along (any scale and shift per axis)."""
    h_len, w_len = grid
    if positions.dim() != 3 or positions.shape[1] != h_len * w_len or positions.shape[2] != 2:
        return False
    rows, cols = positions[..., 0].unflatten(1, grid), positions[..., 1].unflatten(1, grid)
    flat = bool((rows == rows[:, :, :1]).all() and (cols == cols[:, :1, :]).all())
    return flat and bool((rows.diff(dim=1) > 0).all() and (cols.diff(dim=2) > 0).all())


class _Call(CallFacts):
    """What one model call tells the layers: the latent's (C, H, W), the text length (:meth:`CallFacts.read`),
    position ids."""

    def _locate(self) -> tuple[tuple[int, int], int] | str:
        patch, n_txt = model_patch(self.model), self.n_context
        if self.latent is None or patch is None or n_txt is None:
            return "the model call passed no 4D latent and text, or the patch size could not be read"
        try:
            grid = patch_grid(*self.latent[1:], patch, pad=False)
        except ValueError as error:
            return str(error)
        n_image = grid[0] * grid[1]
        if self.ids is None or self.ids.shape[1] != n_image + n_txt:
            return f"the model's position ids do not hold {grid[0]}x{grid[1]} image and {n_txt} text tokens"
        if not ids_on_grid(self.ids[:, :n_image, 1:3], grid):
            return f"the model's position ids do not lay its image tokens on the {grid[0]}x{grid[1]} grid"
        return grid, n_txt


class ErnieImageFamily(AttentionCallFamily):
    """Ernie-Image: ``layers`` of single-stream self-attention over ``[image | text]``; the letter is ``l``."""

    name, title = "ernie", "Ernie-Image"
    attributes: ClassVar[dict[str, str]] = {"layer": "layers"}
    attention: ClassVar[dict[str, str]] = {"layer": "self_attention"}
    # baidu/ERNIE-Image (and -Turbo) ``transformer/config.json`` ``num_layers`` 36 (Neo
    # ``backend/huggingface/baidu/ERNIE-Image``, ``ErnieImageModel`` defaults); hidden 4096, 32 heads.
    released: ClassVar[dict[str, dict[str, int]]] = {"ernie-image": {"layer": 36}, "ernie-image-turbo": {"layer": 36}}
    default_source = (
        "no published Ernie-Image SEG, PAG or skip-layer choice: the middle layer, l18 of the released 36 "
        "(baidu/ERNIE-Image transformer/config.json)"
    )
    facts, ids_from = _Call, "pos_embed"

    def matches(self, model: Any) -> bool:
        parts = ("adaLN_sa_ln", "self_attention.norm_q", "mlp")
        return has_structure(model, "layers", ("x_embedder", "pos_embed"), parts)

    def locate(self, record: _Call, layer: DitLayer, call: CallShape, rows: Rows) -> ImageTokens:
        grid, n_txt = placed(record.where())
        if call.queries != grid[0] * grid[1] + n_txt:
            raise Skip(f"{call.queries} queries are not {grid[0]}x{grid[1]} image and {n_txt} text tokens")
        return ImageTokens(0, grid, rows=rows)


ERNIE = ErnieImageFamily()
# The block counts as tests/dit/test_ernie.py reads them (the facts are :attr:`ErnieImageFamily.released`).
RELEASED = {model: blocks["layer"] for model, blocks in ERNIE.released.items()}
