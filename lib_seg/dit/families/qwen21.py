"""Qwen-Image 2.1: one stream of ``transformer_blocks`` over ``[text | ref 0 | text | ref 1 | ... | image]``,
attended segment by segment under a block-causal mask.

Read at Forge Neo 2.29.1 ``backend/nn/qwen21.py`` (youlijie/sd-webui-forge-classic b3b8a1e5; Neo's port of
ComfyUI's ``comfy/ldm/qwen_image21/model.py``) and its detection in
``modules_forge/packages/huggingface_guess/detection.py`` (the same commit); interfaces only, no code taken.
``QwenImage21Transformer2DModel`` is not Qwen-Image with new weights: its blocks have no per-stream
modulation (``img_mod``/``txt_mod``) and no text queries of their own (``norm_added_q``), one modulation is
shared by the whole model, and the latent is not patchified (``img_in`` takes the 64 latent channels of each
position), so :mod:`lib_seg.dit.families.qwen` does not claim it and this family does not claim Qwen-Image.

* What is blurred: in each chosen block ``transformer_blocks[i]`` (``s``: single-stream), the queries of the
  target image (the image being denoised) as they enter the softmax, after the fused q-norm and RoPE
  (``ck.rms_rope``), on the latent's ``H x W`` grid.  Text and reference-image queries, all keys and values
  stay as they are; the block-causal masks are the host's own.
* Hook point: the attention call.  ``attn`` (``Attention.forward(x, pe, attn_fn, prefix_len, ...)``) hands
  its ``(B, N, heads, D)`` q, k, v to ``attn_fn``, the closure ``block_causal_attention(segments, ...)``
  builds for each block, which calls the module-global ``attention_function(q[:, start:end].flatten(2),
  k[:, :end].flatten(2), v[:, :end].flatten(2), heads, mask=..., transformer_options=...)`` once per segment
  of the sequence: the text segments with a causal boolean mask, each image with none.  Either seam of
  :mod:`lib_seg.dit.attention_call` (the module global, wrapped while armed, or
  ``transformer_options["optimized_attention_override"]``) catches them; :meth:`Qwen21Family.locate` lets
  every call pass until the target's: the one whose keys are the whole sequence (the target is the last
  segment, so only its call sees every token) and whose queries are its ``H * W`` tokens.  A reference image
  of the target's size has as many queries but fewer keys: it is never blurred.  A call over the whole
  sequence with any other query count is reported, as is a chosen ``attn`` that returns without having
  reached either seam (a kernel that attends by itself).
* Geometry, from the call: the latent ``x`` ``(B, 64, H, W)`` (patch 1); the position ids the model gives
  ``pe_embedder`` (Flux's ``EmbedND``, axes 16/56/56), ``(1, L, 3)`` for the whole sequence: text token
  ``(p, p, p)``, image ``(p, row - centre, column - centre)``, ``p`` advancing past each piece.  Check: the
  last ``H * W`` ids must share one axis-0 value that the token before them does not have, and lie
  row-major on the ``H x W`` grid (axes 1-2, any offset: Neo centres them); else every chosen block is
  left unblurred with the reason.
* References and image slots come from Neo's ``backend.args.dynamic_args``, not from the call; SEG needs
  neither (the target is found by its ids and its call).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import positions_fit_grid
from lib_seg.dit.queries import Rows

from .base import AttentionCallFamily, CallFacts, CallShape, ImageTokens, Skip, has_structure, placed
from .qwen import FOREIGN

SIGNATURE = ("img_norm1", "attn.norm_q", "attn.norm_k", "img_mlp")  # what a Qwen-Image 2.1 block has
QWEN_IMAGE_ONLY = ("img_mod", "txt_mod", "attn.norm_added_q")  # what a Qwen-Image (1) block has and 2.1's lacks
MODEL_PARTS = ("pe_embedder", "img_in", "txt_in", "modulation")  # ``modulation``: one for every block

Where = tuple[tuple[int, int], int]  # (the target's grid, the tokens of the whole sequence)


class _Call(CallFacts):
    """What one model call tells :meth:`Qwen21Family.locate`: the latent's size and the position ids."""

    def reset(self) -> None:
        super().reset()
        self.latent: tuple[int, int] | None = None  # (H, W)

    def read(self, x: Any, call: dict[str, Any]) -> None:
        if torch.is_tensor(x) and x.dim() == 4:
            self.latent = (int(x.shape[-2]), int(x.shape[-1]))

    def _locate(self) -> Where | str:
        if self.latent is None:
            return "the model call passed no 4D latent (B, C, H, W)"
        if self.ids is None:
            return "no position ids of the sequence reached the model's pe_embedder"
        grid = self.latent
        n_image, total = grid[0] * grid[1], int(self.ids.shape[1])
        if total < n_image:
            return f"the model's {total} position ids cannot hold the {grid[0]}x{grid[1]} image's {n_image} tokens"
        target = self.ids[:, total - n_image :]
        index = target[:, :1, 0]
        if not bool((target[..., 0] == index).all()):
            return f"the model's last {n_image} position ids are not one image (axis 0 varies): the image is not last"
        if total > n_image and bool((self.ids[:, total - n_image - 1, 0:1] == index).any()):
            return f"the model's image ids run on before its last {n_image} tokens: no {grid[0]}x{grid[1]} image"
        if not positions_fit_grid(target[..., 1:3], grid):
            return f"the model's position ids do not lay its last {n_image} tokens on the {grid[0]}x{grid[1]} grid"
        return grid, total


class Qwen21Family(AttentionCallFamily):
    """Qwen-Image 2.1: ``transformer_blocks`` (``s``) with a shared ``modulation``, block-causal segments."""

    name, title = "qwen21", "Qwen-Image 2.1"
    attributes: ClassVar[dict[str, str]] = {"single": "transformer_blocks"}
    attention: ClassVar[dict[str, str]] = {"single": "attn"}
    # ``num_layers=32``, the default of ``QwenImage21Transformer2DModel`` in Neo's ``backend/nn/qwen21.py``
    # (b3b8a1e5) and in ComfyUI's ``comfy/ldm/qwen_image21/model.py``; Neo's tree ships no ``transformer/config.json``
    # for 2.1 (``backend/huggingface/Qwen/Qwen-Image-2.1`` has the VAE, scheduler and text encoder only), and its
    # detection counts ``transformer_blocks.N`` in the checkpoint, so other depths work the same.
    released: ClassVar[dict[str, dict[str, int]]] = {"qwen-image-2.1": {"single": 32}}
    default_source = (
        "no published Qwen-Image 2.1 SEG, PAG or skip-layer choice: the middle block, s16 of the released 32 "
        "(num_layers in Neo's backend/nn/qwen21.py; Neo counts them from the checkpoint)"
    )
    facts, ids_from = _Call, "pe_embedder"

    def matches(self, model: Any) -> bool:
        if any(isinstance(getattr(model, name, None), nn.ModuleList) for name in FOREIGN):
            return False
        if not has_structure(model, "transformer_blocks", MODEL_PARTS, SIGNATURE):
            return False
        modules = dict(model.transformer_blocks[0].named_modules())
        return not any(name in modules for name in QWEN_IMAGE_ONLY)

    def locate(self, record: _Call, layer: DitLayer, call: CallShape, rows: Rows) -> ImageTokens | None:
        grid, total = placed(record.where())
        if call.keys < total:  # a text or reference segment's call (they see only the tokens up to their end)
            return None
        n_image = grid[0] * grid[1]
        if call.keys > total or call.queries != n_image:
            raise Skip(
                f"its attention call over {call.keys} keys has {call.queries} queries, not the {grid[0]}x{grid[1]} "
                f"image's {n_image} over the sequence's {total} tokens"
            )
        return ImageTokens(0, grid, rows=rows)


QWEN21 = Qwen21Family()
# The block counts as tests/dit/test_qwen21.py reads them (the facts are :attr:`Qwen21Family.released`).
RELEASED = {model: blocks["single"] for model, blocks in QWEN21.released.items()}
