"""Anima (Cosmos-Predict2 structure): self-attention ``blocks`` over the latent's token grid, then a
cross-attention to the text (the LLM adapter's output; Neo runs the adapter in the text encoder).

Read at Neo ``webui/backend/nn/anima.py`` (de2193d; interfaces and math only, no code taken).  The
structure is the UNet case: the self-attention sees image tokens only, so its queries are blurred and
the cross-attention is left alone.

* Hook point: ``blocks[i].self_attn.q_norm``, an ``nn.RMSNorm`` over the head width called as a
  module on ``(B, L, heads, D)`` (``anima.py:122-137``); RoPE follows in ``comfy_kitchen``'s
  ``apply_rope_split_half`` (pairs ``(k, k + D/2)``, one 2x2 rotation per pair and token), which no
  extension can reach.  The hook writes ``R^-1 blur(R q)`` (:func:`lib_seg.dit.families.wan.
  blur_frames_before_rope` with ``pairing="split_half"``), so the host's rotation yields the blurred
  post-RoPE queries.  ``cross_attn.q_norm`` (the queries of the text attention) is not hooked.
* Geometry, from the call: each block gets its tokens as ``x_B_T_H_W_D`` (``anima.py:281-331``: the
  block itself flattens ``t h w``), so its shape is the grid; the rotations are the block's
  ``rope_emb_L_1_1_D``, ``(1, L, 1, D/2, 2, 2)`` from ``pos_embedder``.  Images are one latent frame
  (Neo's Wan-VAE latents are ``(B, C, 1, H, W)``); Neo pads every side to the patch
  (``anima.py:468``), so the image is the first ``ceil(T / patch_temporal)`` frames of the call's
  latent.  Reference latents (Neo's Anima "Reference"/edit, ``dynamic_args.ref_latents``) are
  appended as further frames (``anima.py:462-466``) and are not blurred.  Each frame is blurred over
  its own ``h x w`` grid, as on Wan (:mod:`lib_seg.dit.families.wan`).
* A query count that is not the block's grid skips the block with a warning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.dit.geometry import patched_side
from lib_seg.dit.layers import DitLayer
from lib_seg.dit.queries import Rows

from .base import DitFamily, SkipCallback, arguments, has_blocks, skipped, submodules
from .wan import blur_frames_before_rope

# Neo's detection builds every Anima checkpoint with 28 blocks, width 2048, 16 heads
# (``huggingface_guess/detection.py:201-221``, de2193d).
RELEASED = {"anima": 28}


def _temporal_patch(model: nn.Module) -> int | None:
    size = getattr(model, "patch_temporal", getattr(getattr(model, "x_embedder", None), "temporal_patch_size", None))
    return size if isinstance(size, int) and size >= 1 else None


class _Call:
    """The call's latent frames, and each chosen block's token grid and rotations."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.latent_frames: int | None = None
        self.blocks: dict[DitLayer, tuple[Any, Any]] = {}  # layer -> (x_B_T_H_W_D shape, rope_emb)

    def on_model(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.blocks.clear()
        x = arguments(model, args, kwargs).get("x", args[0] if args else None)
        self.latent_frames = int(x.shape[2]) if torch.is_tensor(x) and x.dim() == 5 else None

    def recorder(self, layer: DitLayer):
        def pre_hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            call = arguments(block, args, kwargs)
            x = call.get("x_B_T_H_W_D", args[0] if args else None)
            shape = tuple(x.shape[1:4]) if torch.is_tensor(x) and x.dim() == 5 else None
            self.blocks[layer] = (shape, call.get("rope_emb_L_1_1_D"))

        return pre_hook

    def where(self, layer: DitLayer) -> tuple[int, tuple[int, int], int, torch.Tensor] | str:
        """(image frames, (h, w), frames in the sequence, rotations) of ``layer``'s call, or why not."""
        shape, rope = self.blocks.get(layer, (None, None))
        patch = _temporal_patch(self.model)
        if self.latent_frames is None:
            return "the model call passed no 5-D (B, C, T, H, W) latent"
        if shape is None or patch is None:
            return "the block's (T, H, W) token grid or the model's temporal patch could not be read"
        frames = patched_side(self.latent_frames, patch, pad=True)
        if frames > shape[0]:
            return f"{frames} latent frames do not fit the {shape[0]} frames of the block's tokens"
        if not torch.is_tensor(rope) or rope.dim() != 6:
            return "no RoPE rotations reached the block"
        return frames, (shape[1], shape[2]), shape[0], rope


def _hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on ``self_attn.q_norm``: ``(B, L, heads, D) -> R^-1 blur(R q)`` on the image frames."""

    def hook(_norm: nn.Module, _args: tuple, q: torch.Tensor) -> Any:
        where = call.where(layer)
        if isinstance(where, str):
            return skipped(on_skip, layer, q.shape[1], None, where)
        frames, grid, total, rope = where
        if q.dim() != 4 or q.shape[1] != total * grid[0] * grid[1] or rope.shape[1] != q.shape[1]:
            return skipped(on_skip, layer, q.shape[1], grid)
        if 2 * rope.shape[-3] != q.shape[-1]:
            return skipped(on_skip, layer, q.shape[1], grid, "the RoPE rotations do not fit the head width")
        return blur_frames_before_rope(q, rope, frames, grid, sigma, rows, pairing="split_half")

    return hook


class AnimaFamily(DitFamily):
    """Anima: ``blocks`` with ``self_attn.q_norm`` / ``cross_attn``, an ``x_embedder`` and a ``pos_embedder``."""

    name, title = "anima", "Anima"
    kinds = ("block",)
    attributes: ClassVar[dict[str, str]] = {"block": "blocks"}
    default = None
    default_source = "no published Anima or Cosmos-Predict2 SEG/PAG block choice: the middle block (b14 of 28)"

    def matches(self, model: Any) -> bool:
        if not has_blocks(model, "blocks") or not len(model.blocks):
            return False
        own = all(isinstance(getattr(model, name, None), nn.Module) for name in ("x_embedder", "pos_embedder"))
        modules = dict(model.blocks[0].named_modules())
        return own and all(name in modules for name in ("self_attn.q_norm", "cross_attn.q_norm"))

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
        for layer in layers:
            block = self.block(model, layer)
            handles.append(block.register_forward_pre_hook(call.recorder(layer), with_kwargs=True))
            hook = _hook(layer, call, sigma, rows, on_skip)
            handles.extend(norm.register_forward_hook(hook) for norm in submodules(block, layer, ["self_attn.q_norm"]))


ANIMA = AnimaFamily()
