"""Anima (Cosmos-Predict2 structure): self-attention ``blocks`` over the latent's token grid, then a
cross-attention to the text (the LLM adapter's output; Neo runs the adapter in the text encoder).

Read at Neo 2.26 ``webui/backend/nn/anima.py`` (exo101/sd-webui-forge-neo-v3 de2193d) and Neo 2.29
``backend/nn/anima.py`` (youlijie/sd-webui-forge-classic b3b8a1e5); interfaces and math only, no code taken.
The structure is the UNet case: the self-attention sees image tokens only, so its queries are blurred and
the cross-attention is left alone.

* Hook point: the attention call of ``blocks[i].self_attn`` (:mod:`lib_seg.dit.attention_call`).  Its
  ``torch_attention_op`` calls the module-global ``attention_function(q_B_H_S_D, k_B_H_S_D, v_B_H_S_D,
  heads, skip_reshape=True, transformer_options=...)`` with q ``(B, heads, L, D)`` normalised and rotated
  already (2.26 line 146, 2.29 line 166).  2.26 computes q with the ``q_norm`` module and then
  ``comfy_kitchen.apply_rope_split_half`` (lines 131-135); 2.29 fuses both into ``ck.rms_rope_split_half(q,
  k, rope_emb, q_scale, k_scale, eps)`` (lines 146-150), so no q-norm module runs there and a q-norm hook
  would be a silent no-op.  The attention call is the same in both, and on 2.29 ``wrap_attn`` also honours
  SEG's ``optimized_attention_override``.  ``cross_attn`` (the text attention, which calls the same
  function) is never armed.  A self-attention whose call reaches neither seam is reported.
* Geometry, from the call: each block gets its tokens as ``x_B_T_H_W_D`` and flattens ``t h w`` itself
  (2.26 lines 281-331, 2.29 lines 293-343), so that shape is the grid.  Images are one latent frame (Neo's
  Wan-VAE latents are ``(B, C, 1, H, W)``); Neo pads every side to the patch (``pad_to_patch_size``), so the
  image is the first ``ceil(T / patch_temporal)`` frames of the call's latent.  Reference latents (Neo's
  Anima "Reference"/edit, ``dynamic_args.ref_latents``) are appended as further frames before the padding
  (2.26 lines 462-468, 2.29 lines 474-479) and are not blurred.  Each image frame is blurred over its own
  ``h x w`` grid, as on Wan.
* A query count that is not the block's grid (a tiling extension's sub-grid) skips the block with a warning.
* ComfyUI's Anima (``comfy/ldm/anima/model.py:193``, a ``MiniTrainDIT`` of ``comfy/ldm/cosmos/predict2.py`` with an
  ``llm_adapter``) has the same blocks; its ``torch_attention_op`` calls the module-global ``optimized_attention``
  of ``predict2.py`` (line 77, q ``(B, heads, L, D)``, ``skip_reshape=True``, ``transformer_options``), and each
  block gets ``x_B_T_H_W_D`` first, positionally (lines 882-887).  It has no reference latents.  ComfyUI's plain
  Cosmos-Predict2 (the same class without the adapter) is not claimed (:func:`plain_cosmos`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import patched_side
from lib_seg.dit.queries import Rows

from .base import AttentionCallFamily, CallFacts, CallShape, ImageTokens, Skip, has_structure, placed

Where = tuple[int, tuple[int, int], int]  # (image frames, (h, w), frames in the block's tokens)


def _temporal_patch(model: nn.Module) -> int | None:
    size = getattr(model, "patch_temporal", getattr(getattr(model, "x_embedder", None), "temporal_patch_size", None))
    return size if isinstance(size, int) and size >= 1 else None


class _Call(CallFacts):
    """What one model call tells :meth:`AnimaFamily.locate`: the latent's frames and each block's token grid."""

    def reset(self) -> None:
        super().reset()
        self.latent_frames: int | None = None
        self.grids: dict[int, tuple[int, int, int]] = {}  # block index -> (T, H, W) of its x_B_T_H_W_D

    def read(self, x: Any, call: dict[str, Any]) -> None:
        self.latent_frames = int(x.shape[2]) if torch.is_tensor(x) and x.dim() == 5 else None

    def grid_recorder(self, index: int):
        def pre_hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("x_B_T_H_W_D")  # Neo passes it first, positionally
            if torch.is_tensor(x) and x.dim() == 5:
                self.grids[index] = tuple(map(int, x.shape[1:4]))
            else:
                self.grids.pop(index, None)

        return pre_hook

    def place(self, layer: DitLayer) -> Where | str:
        """(image frames, (h, w), frames in the sequence) of ``layer``'s call, or why they cannot be placed."""
        grid, patch = self.grids.get(layer.index), _temporal_patch(self.model)
        if self.latent_frames is None:
            return "the model call passed no 5-D (B, C, T, H, W) latent"
        if grid is None or patch is None:
            return "the block's (T, H, W) token grid or the model's temporal patch could not be read"
        frames = patched_side(self.latent_frames, patch, pad=True)
        if frames > grid[0]:
            return f"{frames} latent frames do not fit the {grid[0]} frames of the block's tokens"
        return frames, (grid[1], grid[2]), grid[0]


def plain_cosmos(model: Any) -> bool:
    """Whether ``model`` is ComfyUI's plain Cosmos-Predict2 DiT rather than Anima.  ComfyUI builds both from one
    class, ``MiniTrainDIT`` (``comfy/ldm/cosmos/predict2.py:573``, which keeps its positional-embedding
    configuration, ``pos_emb_cls``, line 660); Anima is that class with the LLM adapter added
    (``comfy/ldm/anima/model.py:193-196``, ``llm_adapter``).  Neo's Anima is a class of its own, with neither
    (its text encoder runs the adapter).  Cosmos-Predict2 2B/14B images and videos would take the same per-frame
    blur, but no released Cosmos-Predict2 model is among the families' facts and none was checked, so SEG
    leaves it alone."""
    return hasattr(model, "pos_emb_cls") and not isinstance(getattr(model, "llm_adapter", None), nn.Module)


class AnimaFamily(AttentionCallFamily):
    """Anima: ``blocks`` with ``self_attn`` / ``cross_attn`` (each with a ``q_norm``), an ``x_embedder`` and a
    ``pos_embedder``."""

    name, title = "anima", "Anima"
    attributes: ClassVar[dict[str, str]] = {"block": "blocks"}
    attention: ClassVar[dict[str, str]] = {"block": "self_attn"}  # never cross_attn: its keys are the text
    # Neo counts an Anima checkpoint's blocks (``huggingface_guess/detection.py``: 2.26 de2193d hard-codes 28;
    # 2.29 b3b8a1e5 ``count_blocks(... "blocks.")``, width 2048 and 16 heads asserted), and 2.29's ``anima.py``
    # maps LoRAs between depths 28, 40 and 52 (``BLOCK_MAPPINGS``): Anima 2B, 2.9B and 3.8B.
    released: ClassVar[dict[str, dict[str, int]]] = {
        "anima": {"block": 28},
        "anima-2.9b": {"block": 40},
        "anima-3.8b": {"block": 52},
    }
    default_source = "no published Anima or Cosmos-Predict2 SEG/PAG block choice: the middle block (b14 of 28)"
    facts = _Call

    def matches(self, model: Any) -> bool:
        parts = ("self_attn.q_norm", "cross_attn.q_norm")
        return has_structure(model, "blocks", ("x_embedder", "pos_embedder"), parts) and not plain_cosmos(model)

    def record(self, model: nn.Module, call: _Call, handles: list[RemovableHandle]) -> None:
        for index, block in enumerate(model.blocks):  # a shape read per block call, whichever are chosen
            handles.append(block.register_forward_pre_hook(call.grid_recorder(index), with_kwargs=True))

    def locate(self, record: _Call, layer: DitLayer, call: CallShape, rows: Rows) -> ImageTokens:
        frames, (h, w), total = placed(record.place(layer))
        if call.queries != total * h * w or call.keys != call.queries:
            raise Skip(f"its {call.queries} queries are not the block's {total}x{h}x{w} token grid")
        return ImageTokens(0, (h, w), frames, rows)


ANIMA = AnimaFamily()
