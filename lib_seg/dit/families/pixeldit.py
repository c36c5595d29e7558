"""PixelDiT / PiD (NVIDIA): a pixel-space DiT, MMDiT ``patch_blocks`` then pixel ``pixel_blocks``, RoPE in both.

Read at Neo ``webui/backend/nn/pixeldit/`` (de2193d; ComfyUI's ``comfy/ldm/pixeldit`` v0.24.1), interfaces only,
no code taken.  ``PixDiT_T2I`` (``model.py``) works on RGB pixels: ``pad_to_patch_size`` then 16x16 patches
(``F.unfold``, row-major) give ``Hs x Ws`` patch tokens, ``Hs = ceil(H / 16)``.  Neo loads it as ``PidNet``
(``pid.py``, the PiD super-resolution decoder: LQ-latent features gated into the patch stream).

* ``patch_blocks`` (14, kind ``j``): two-stream joint attention (``MMDiTJointAttention``, ``model.py`` 23-80),
  ``q_joint = cat(text, image)``; the image stream's ``attn.q_norm_x`` is called as a module on its queries
  ``(B, heads, N, D)``, then ``apply_rope(q, k, pos_img[None, None])``.
* ``pixel_blocks`` (2, kind ``b``): each patch's pixels are compressed into one token and ``attn``
  (``RotaryAttention``, ``modules.py`` 43-65) is a self-attention over the ``Hs x Ws`` patch tokens alone:
  ``attn.q_norm`` called as a module, then RoPE with ``pos`` (the block computes it and passes it to ``attn``).
  Its tokens are image tokens on the same grid, so SEG blurs them too.
* What is blurred: the image queries after the q-norm and after RoPE (the hook writes ``R^-1 blur(R q)``,
  :func:`lib_seg.dit.queries.blur_before_rope`, with the rotations recorded by a pre-hook on ``attn``).
  Text queries, all keys and values are untouched.
* Geometry: the patch is the model's ``patch_size``; the grid is ``ceil(H / p) x ceil(W / p)`` of the call's
  ``x`` (also of each context window Neo's PiD hands the model); the query count must be ``Hs * Ws`` and the
  rotations must say so: ``precompute_freqs_cis_2d`` interleaves a column axis and a row axis, so one half of
  the channel pairs must be constant down each column and the other along each row (else: skipped, warned).
* Batched SEG rows on PiD: the LQ features come from ``dynamic_args.lq_latent`` (one row per image), and the
  host's gate concatenates them with the call's rows, so a call with the SEG rows appended would fail in the
  host.  While armed, a forward hook on ``lq_proj`` tiles its features to the call's rows (each chunk of rows
  - cond, uncond, SEG - holds the images in the same order).  Prefix reuse is off for this family (see
  :meth:`PixelDiTFamily.blocks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core import blocks as dit_layers
from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.queries import Rows, blur_before_rope

from .base import CallFacts, QNormFamily, SkipCallback, has_blocks, skipped

NORMS = {"joint": "attn.q_norm_x", "block": "attn.q_norm"}
ROTATIONS = {"joint": "pos_img", "block": "pos"}  # the ``attn`` argument holding the image tokens' rotations


def rotations_fit_grid(pe: torch.Tensor, grid: tuple[int, int]) -> bool:
    """Whether 2D RoPE rotations ``(1 or B, 1, h * w, P, 2, 2)`` lay the tokens row-major on ``grid``: the even
    channel pairs depend on one grid axis only and the odd pairs on the other (``precompute_freqs_cis_2d``)."""
    h_len, w_len = grid
    if pe.dim() != 6 or pe.shape[2] != h_len * w_len or pe.shape[3] % 2:
        return False
    maps = pe[0, 0].reshape(h_len, w_len, pe.shape[3], 4)
    even, odd = maps[:, :, 0::2], maps[:, :, 1::2]
    constant = lambda t, dim: bool((t == t.narrow(dim, 0, 1)).all())  # noqa: E731
    return (constant(even, 0) and constant(odd, 1)) or (constant(even, 1) and constant(odd, 0))


class _Call(CallFacts):
    """What one model call tells the hooks: the pixel size and batch, and each chosen layer's rotations."""

    def reset(self) -> None:
        super().reset()
        self.size: tuple[int, int] | None = None
        self.batch = 0

    def read(self, x: Any, call: dict[str, Any]) -> None:
        if torch.is_tensor(x) and x.dim() == 4:
            self.size, self.batch = tuple(map(int, x.shape[-2:])), int(x.shape[0])

    def read_block(self, layer: DitLayer, call: dict[str, Any]) -> Any:
        pe = call.get(ROTATIONS[layer.kind])
        return pe[None, None] if torch.is_tensor(pe) and pe.dim() == 4 else pe  # as ``apply_rope`` gets it

    def tile_lq(self, _lq_proj: nn.Module, _args: tuple, features: Any) -> Any:
        """PiD's LQ features, one row per image, tiled to a batched SEG call's rows."""
        if not isinstance(features, list | tuple) or not features or not torch.is_tensor(features[0]):
            return None
        rows = features[0].shape[0]
        if rows == 0 or self.batch <= rows or self.batch % rows:
            return None
        return type(features)(f.repeat(self.batch // rows, *([1] * (f.dim() - 1))) for f in features)

    def _locate(self) -> tuple[int, int] | str:
        patch = getattr(self.model, "patch_size", None)
        if self.size is None or not isinstance(patch, int) or patch < 1:
            return "the model call passed no 4D image, or the model has no patch size"
        return patch_grid(*self.size, patch, pad=True)


def _hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on the image q-norm: ``q -> R^-1 blur(R q)`` over the patch grid."""

    def hook(_norm: nn.Module, _args: tuple, q: torch.Tensor) -> Any:
        grid = call.where()
        if isinstance(grid, str):
            return skipped(on_skip, layer, q.shape[-2], None, grid)
        pe = call.seen.get(layer)
        if q.dim() != 4 or q.shape[2] != grid[0] * grid[1]:
            return skipped(on_skip, layer, q.shape[-2], grid)
        if not torch.is_tensor(pe) or not rotations_fit_grid(pe, grid):
            reason = f"the model's RoPE rotations do not lay its image tokens on the {grid[0]}x{grid[1]} grid"
            return skipped(on_skip, layer, q.shape[2], grid, reason)
        return blur_before_rope(q, pe, slice(0, q.shape[2]), grid, sigma, rows)

    return hook


class PixelDiTFamily(QNormFamily):
    """PixelDiT / PiD: ``patch_blocks`` (``j``, MMDiT joint) then ``pixel_blocks`` (``b``, image self-attention)."""

    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {kind: (name,) for kind, name in NORMS.items()}
    name, title = "pixeldit", "PixelDiT / PiD"
    attributes: ClassVar[dict[str, str]] = {"joint": "patch_blocks", "block": "pixel_blocks"}
    # Neo builds PiD as ``PidNet(**config)`` with only the LQ settings from ``huggingface_guess/detection.py``, so
    # ``PixDiT_T2I``'s defaults hold (``model.py`` 115-131): 14 patch blocks (hidden 1536, 24 heads), 2 pixel blocks
    # (attention 1152, 16 heads), patch 16, text 300 Gemma-2 tokens.
    released: ClassVar[dict[str, dict[str, int]]] = {"pid": {"joint": 14, "block": 2}}
    facts, arguments_of = _Call, "attn"  # ``attn``'s rotations (:data:`ROTATIONS`)
    hook = staticmethod(_hook)
    default_source = (
        "no published PixelDiT or PiD SEG, PAG or skip-layer choice: the middle patch block (j7 of 14); the two "
        "pixel blocks are the per-pixel decoder head, right before the output, and are not chosen by default"
    )

    def matches(self, model: Any) -> bool:
        if not has_blocks(model, "patch_blocks", "pixel_blocks") or not len(model.patch_blocks):
            return False
        own = all(isinstance(getattr(model, name, None), nn.Module) for name in ("s_embedder", "pixel_embedder"))
        blocks = [(model.patch_blocks[0], NORMS["joint"]), *((b, NORMS["block"]) for b in model.pixel_blocks[:1])]
        return own and all(name in dict(block.named_modules()) for block, name in blocks)

    # No prefix reuse (:mod:`lib_seg.dit.prefix`): the host mixes the rows between blocks with tensors no block
    # gets (PiD's LQ gate before every other patch block, ``t_emb`` between the streams), and the pixel blocks see
    # ``B * Hs * Ws`` rows, so slimmed SEG rows would not fit there.
    prefix_reuse = False

    def default_for(self, layers: Iterable[DitLayer]) -> str:
        layers = tuple(layers)
        patch = sum(layer.kind == "joint" for layer in layers)
        return f"j{patch // 2}" if patch else dit_layers.default_layers(layers)

    def record(self, model: nn.Module, call: _Call, handles: list[RemovableHandle]) -> None:
        if isinstance(getattr(model, "lq_proj", None), nn.Module):
            handles.append(model.lq_proj.register_forward_hook(call.tile_lq))


PIXELDIT = PixelDiTFamily()
# The block counts as tests/dit/test_pixeldit.py reads them (the facts are :attr:`PixelDiTFamily.released`).
RELEASED = {model: (blocks["joint"], blocks["block"]) for model, blocks in PIXELDIT.released.items()}
