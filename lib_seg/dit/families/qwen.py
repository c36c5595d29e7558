"""Qwen-Image and Qwen-Image-Edit: dual-stream ``transformer_blocks`` with one joint attention and MSRoPE.

Read at Neo ``backend/nn/qwen.py`` (de2193d: ``Attention`` 169-243, ``QwenImageTransformerBlock``
246-318, ``QwenImageTransformer2DModel`` 335-483), its Nunchaku variant ``backend/nn/svdq.py`` (320-753)
and ``modules_forge/packages/huggingface_guess/detection.py`` (234-240); interfaces only, no code taken.

What is blurred: in each chosen block, the image-token queries of the joint attention over
``[txt | image | Edit references]``, on the image's patch grid, as they enter the softmax (after
``norm_q`` and after RoPE).  Text queries, the reference images' queries, all keys and values stay.

* Hook point: ``transformer_blocks[i].attn.norm_q``, the image stream's per-head RMSNorm, called as a module on
  ``(B, L_img + L_refs, heads, D)`` (ComfyUI's own class: on ``(B, heads, L_img + L_refs, D)``, with its rotations
  ``(B, 1, L, D/2, 2, 2)``; :func:`layout` tells the two apart).  The host then joins ``[txt | img]`` and rotates in
  the plain function ``apply_rotary_emb`` (qwen.py 148-154, 227), which no extension can reach, so the forward hook
  returns ``R^-1 blur(R q)`` (:func:`lib_seg.dit.queries.blur_before_rope`) and the host's own rotation yields
  exactly the blurred post-RoPE queries.  Keys have their own module (``norm_k``) and text queries theirs
  (``norm_added_q``): the hook never sees them.
* RoPE: Neo's MSRoPE is Flux's ``EmbedND`` over 3 axes (16/56/56 at release), one 2x2 rotation per
  channel pair and token, reshaped to ``(B, L, 1, D/2, 2, 2)`` for the ``(B, L, heads, D)`` layout
  (qwen.py 429); not diffusers' complex ``freqs_cis``.  ``blur_before_rope`` takes it in that ``blhd``
  layout.  Each chosen block's rotations are recorded from ``attn``'s
  ``image_rotary_emb`` argument; the image stream's are the last ``L_img + L_refs`` of them.
* Geometry, from the model and the call: the patch is the model's ``patch_size`` (2; else the width of
  ``img_in``, 64 = 16 latent channels x 2 x 2, which detection reads from the checkpoint); the latent
  is the call's ``x``, 5D ``(B, 16, 1, H, W)`` in Neo (Wan VAE), odd sides padded circularly
  (``pad_to_patch_size``), so the grid is ``ceil(H / 2) x ceil(W / 2)``; the text length is
  ``attn``'s ``encoder_hidden_states``; the image tokens are the first ``h*w`` of the image stream,
  Qwen-Image-Edit's references follow them (qwen.py 399-424).  A 5D latent of ``T`` frames (ComfyUI's
  Qwen-Image-Layered, ``comfy/ldm/qwen_image/model.py:393-417``) is ``T`` such grids first, each blurred over
  its own grid as Wan's frames are.
* Check: the model's own position ids (at ``pe_embedder(ids)``) must put those tokens row-major on
  the grid (Neo centres them, ``row - h_len // 2``; a common offset passes).  A failed check, a query
  count that does not hold the grid or rotations that do not fit leave the block unblurred with a
  warning, as does a chosen block whose ``norm_q`` never ran in the call: Nunchaku's CPU offload
  (``svdq_cpu_offload``) runs two buffer copies of the blocks instead of ``transformer_blocks[i]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import model_patch_size, patch_grid
from lib_seg.dit.queries import Rows, blur_before_rope

from .base import CallFacts, QNormFamily, SkipCallback, has_structure, skipped

OFFLOADED = (
    "its attention's norm_q never ran in this call (Nunchaku's CPU offload runs copies of the blocks; "
    "turn svdq_cpu_offload off for SEG)"
)
# Other families' block lists: a model with any of them is not Qwen-Image (SD3, Flux, diffusers' Flux).
FOREIGN = ("joint_blocks", "double_blocks", "single_blocks", "single_transformer_blocks")


class _Call(CallFacts):
    """What one model call tells the hooks: the latent, the position ids, each chosen block's attention
    arguments (rotations, text length), and the image's grid for each text length."""

    def reset(self) -> None:
        super().reset()
        self.latent: tuple[int, int, int] | None = None  # (C, H, W)
        self.frames = 1  # a 5D latent's T: ComfyUI's Qwen-Image-Layered puts T frames of h * w tokens first
        self._grids: dict[int, tuple[int, int] | str] = {}

    def read(self, x: Any, call: dict[str, Any]) -> None:
        if torch.is_tensor(x) and x.dim() in (4, 5):
            self.latent = (int(x.shape[1]), int(x.shape[-2]), int(x.shape[-1]))
            self.frames = int(x.shape[2]) if x.dim() == 5 and x.shape[2] > 0 else 1

    def read_block(self, layer: DitLayer, call: dict[str, Any]) -> tuple[Any, int | None]:
        txt = call.get("encoder_hidden_states")
        return call.get("image_rotary_emb"), int(txt.shape[1]) if torch.is_tensor(txt) and txt.dim() == 3 else None

    def grid(self, n_txt: int) -> tuple[int, int] | str:
        """The image's patch grid in this call, or the reason it cannot be placed."""
        if n_txt not in self._grids:
            self._grids[n_txt] = self._place(n_txt)
        return self._grids[n_txt]

    def _place(self, n_txt: int) -> tuple[int, int] | str:
        found = self.latent_patch(model_patch_size, "4D or 5D")
        if isinstance(found, str):
            return found
        grid = patch_grid(*found, pad=True)
        n_frame = grid[0] * grid[1]
        misplaced = (self.ids_misplace(n_txt + frame * n_frame, grid) for frame in range(self.frames))
        return next((reason for reason in misplaced if reason), grid)


def layout(pe: Any, q: torch.Tensor, n_txt: int) -> str | None:
    """The layout in which ``pe`` holds the rotations of ``[txt | q]``, or None (they do not fit): ``"blhd"``
    for Neo's ``q`` (B, L_img, heads, D) with ``pe`` (B or 1, n_txt + L_img, 1, D/2, 2, 2) (qwen.py 210-218,
    429), ``"bhld"`` for ComfyUI's ``q`` (B, heads, L_img, D), which its ``norm_q`` gets and returns, with
    ``pe`` (B or 1, 1, n_txt + L_img, D/2, 2, 2) (``comfy/ldm/qwen_image/model.py:156, 164, 173, 492``)."""
    if not torch.is_tensor(pe) or pe.dim() != 6 or pe.shape[0] not in (1, q.shape[0]) or pe.shape[-2:] != (2, 2):
        return None
    if 2 * pe.shape[3] != q.shape[3]:
        return None
    if pe.shape[2] == 1 and pe.shape[1] == n_txt + q.shape[1]:
        return "blhd"
    if pe.shape[1] == 1 and pe.shape[2] == n_txt + q.shape[2]:
        return "bhld"
    return None


def _hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on ``attn.norm_q``: ``q -> R^-1 blur(R q)`` on the image tokens of the image stream."""

    def hook(_norm: nn.Module, _args: tuple, q: Any) -> Any:
        if not torch.is_tensor(q) or q.dim() != 4:
            return skipped(on_skip, layer, 0, None, "its norm_q returned no (B, L, heads, D) queries")
        pe, n_txt = call.seen.get(layer, (None, None))
        if n_txt is None:
            return skipped(on_skip, layer, q.shape[1], None, "its attention was called without a text sequence")
        grid = call.grid(n_txt)
        if isinstance(grid, str):
            return skipped(on_skip, layer, q.shape[1], None, grid)
        order = layout(pe, q, n_txt)
        if order is None:
            return skipped(on_skip, layer, q.shape[1], grid, "no RoPE rotations of its tokens reached the block")
        tokens = 2 if order == "bhld" else 1  # q's and pe's token axis
        n_image = call.frames * grid[0] * grid[1]
        if n_image > q.shape[tokens]:
            return skipped(on_skip, layer, q.shape[tokens], grid)
        image_pe = pe.narrow(tokens, n_txt, q.shape[tokens])  # the image stream's rotations
        return blur_before_rope(q, image_pe, slice(0, n_image), grid, sigma, rows, order, call.frames)

    return hook


class QwenImageFamily(QNormFamily):
    """Qwen-Image / Qwen-Image-Edit (and Neo's Nunchaku build of them): ``transformer_blocks`` whose
    blocks have per-stream modulation (``img_mod``/``txt_mod``) and one joint ``attn``."""

    name, title = "qwen", "Qwen-Image / Qwen-Image-Edit"
    attributes: ClassVar[dict[str, str]] = {"joint": "transformer_blocks"}
    # ``num_layers`` 60 in Neo's ``backend/huggingface/Qwen/Qwen-Image/transformer/config.json`` (24 heads x 128,
    # text width 3584, RoPE axes 16/56/56); Qwen-Image-Edit's transformer has the same config (diffusers
    # ``QwenImageTransformer2DModel``, num_layers 60).  Neo counts ``transformer_blocks.N`` in the checkpoint
    # (detection.py 239), so pruned variants work too.
    released: ClassVar[dict[str, dict[str, int]]] = {"qwen-image": {"joint": 60}, "qwen-image-edit": {"joint": 60}}
    default_source = (
        "no published Qwen-Image SEG, PAG or skip-layer choice (none in Neo's tree either): "
        "the middle block, j30 of Qwen-Image's 60"
    )
    signature = ("img_mod", "txt_mod", "attn.norm_q", "attn.norm_added_q")  # what a Qwen-Image block has
    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {"joint": ("attn.norm_q",)}
    never_ran = OFFLOADED
    facts, ids_from, arguments_of = _Call, "pe_embedder", "attn"  # ``attn``'s rotations and text
    hook = staticmethod(_hook)

    def matches(self, model: Any) -> bool:
        if any(isinstance(getattr(model, name, None), nn.ModuleList) for name in FOREIGN):
            return False
        return has_structure(model, "transformer_blocks", block_parts=self.signature)


QWEN_IMAGE = QwenImageFamily()
# The block counts as tests/dit/test_qwen.py reads them (the facts are :attr:`QwenImageFamily.released`).
RELEASED = {model: blocks["joint"] for model, blocks in QWEN_IMAGE.released.items()}
