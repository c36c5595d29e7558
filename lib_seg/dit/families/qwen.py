"""Qwen-Image and Qwen-Image-Edit: dual-stream ``transformer_blocks`` with one joint attention and MSRoPE.

Read at Neo ``backend/nn/qwen.py`` (de2193d: ``Attention`` 169-243, ``QwenImageTransformerBlock``
246-318, ``QwenImageTransformer2DModel`` 335-483), its Nunchaku variant ``backend/nn/svdq.py`` (320-753)
and ``modules_forge/packages/huggingface_guess/detection.py`` (234-240); interfaces only, no code taken.

What is blurred: in each chosen block, the image-token queries of the joint attention over
``[txt | image | Edit references]``, on the image's patch grid, as they enter the softmax (after
``norm_q`` and after RoPE).  Text queries, the reference images' queries, all keys and values stay.

* Hook point: ``transformer_blocks[i].attn.norm_q``, the image stream's per-head RMSNorm, called as a
  module on ``(B, L_img + L_refs, heads, D)``.  The host then joins ``[txt | img]`` and rotates in the
  plain function ``apply_rotary_emb`` (qwen.py 148-154, 227), which no extension can reach, so the
  forward hook returns ``R^-1 blur(R q)`` (:func:`lib_seg.dit.queries.blur_before_rope`) and the
  host's own rotation yields exactly the blurred post-RoPE queries.  Keys have their own module
  (``norm_k``) and text queries theirs (``norm_added_q``): the hook never sees them.
* RoPE: Neo's MSRoPE is Flux's ``EmbedND`` over 3 axes (16/56/56 at release), one 2x2 rotation per
  channel pair and token, reshaped to ``(B, L, 1, D/2, 2, 2)`` for the ``(B, L, heads, D)`` layout
  (qwen.py 429); not diffusers' complex ``freqs_cis``.  ``blur_before_rope`` takes it with the token
  and head axes swapped.  Each chosen block's rotations are recorded from ``attn``'s
  ``image_rotary_emb`` argument; the image stream's are the last ``L_img + L_refs`` of them.
* Geometry, from the model and the call: the patch is the model's ``patch_size`` (2; else the width of
  ``img_in``, 64 = 16 latent channels x 2 x 2, which detection reads from the checkpoint); the latent
  is the call's ``x``, 5D ``(B, 16, 1, H, W)`` in Neo (Wan VAE), odd sides padded circularly
  (``pad_to_patch_size``), so the grid is ``ceil(H / 2) x ceil(W / 2)``; the text length is
  ``attn``'s ``encoder_hidden_states``; the image tokens are the first ``h*w`` of the image stream,
  Qwen-Image-Edit's references follow them (qwen.py 399-424).
* Check: the model's own position ids (at ``pe_embedder(ids)``) must put those tokens row-major on
  the grid (Neo centres them, ``row - h_len // 2``; a common offset passes).  A failed check, a query
  count that does not hold the grid or rotations that do not fit leave the block unblurred with a
  warning, as does a chosen block whose ``norm_q`` never ran in the call: Nunchaku's CPU offload
  (``svdq_cpu_offload``) runs two buffer copies of the blocks instead of ``transformer_blocks[i]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import model_patch_size, patch_grid, positions_fit_grid
from lib_seg.dit.queries import Rows, blur_before_rope

from .base import DitFamily, SkipCallback, arguments, has_blocks, skipped, submodules

# Blocks of the released models: ``num_layers`` 60 in Neo's ``backend/huggingface/Qwen/Qwen-Image/
# transformer/config.json`` (24 heads x 128, text width 3584, RoPE axes 16/56/56); Qwen-Image-Edit's
# transformer has the same config (diffusers ``QwenImageTransformer2DModel``, num_layers 60).  Neo
# counts ``transformer_blocks.N`` in the checkpoint (detection.py 239), so pruned variants work too.
RELEASED: dict[str, int] = {"qwen-image": 60, "qwen-image-edit": 60}
OFFLOADED = (
    "its attention's norm_q never ran in this call (Nunchaku's CPU offload runs copies of the blocks; "
    "turn svdq_cpu_offload off for SEG)"
)
# Other families' block lists: a model with any of them is not Qwen-Image (SD3, Flux, diffusers' Flux).
FOREIGN = ("joint_blocks", "double_blocks", "single_blocks", "single_transformer_blocks")


class _Call:
    """What one model call tells the hooks: the latent, the position ids, each chosen block's attention
    arguments (rotations, text length), and which chosen blocks' ``norm_q`` ran."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.latent: tuple[int, int, int] | None = None  # (C, H, W)
        self.ids: torch.Tensor | None = None
        self.attention: dict[DitLayer, tuple[Any, int | None]] = {}
        self._grids: dict[int, tuple[int, int] | str] = {}

    def on_model(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.reset()
        x = arguments(model, args, kwargs).get("x", args[0] if args else None)
        if torch.is_tensor(x) and x.dim() in (4, 5):
            self.latent = (int(x.shape[1]), int(x.shape[-2]), int(x.shape[-1]))

    def on_ids(self, _embedder: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else next(iter(kwargs.values()), None)
        self.ids = ids if torch.is_tensor(ids) and ids.dim() == 3 and ids.shape[-1] >= 3 else None

    def attention_recorder(self, layer: DitLayer):
        def pre_hook(attn: nn.Module, args: tuple, kwargs: dict) -> None:
            call = arguments(attn, args, kwargs)
            txt = call.get("encoder_hidden_states")
            n_txt = int(txt.shape[1]) if torch.is_tensor(txt) and txt.dim() == 3 else None
            self.attention[layer] = (call.get("image_rotary_emb"), n_txt)

        return pre_hook

    def grid(self, n_txt: int) -> tuple[int, int] | str:
        """The image's patch grid in this call, or the reason it cannot be placed."""
        if n_txt not in self._grids:
            self._grids[n_txt] = self._locate(n_txt)
        return self._grids[n_txt]

    def _locate(self, n_txt: int) -> tuple[int, int] | str:
        if self.latent is None:
            return "the model call passed no 4D or 5D latent"
        channels, height, width = self.latent
        patch = model_patch_size(self.model, channels)
        if patch is None:
            return "the model's patch size could not be read"
        grid = patch_grid(height, width, patch, pad=True)
        if self.ids is not None:
            stop = n_txt + grid[0] * grid[1]
            if self.ids.shape[1] < stop or not positions_fit_grid(self.ids[:, n_txt:stop, 1:3], grid):
                return f"the model's position ids do not lay its image tokens on the {grid[0]}x{grid[1]} grid"
        return grid


def _fits(pe: Any, q: torch.Tensor, n_txt: int) -> bool:
    """Whether ``pe`` holds ``(B or 1, n_txt + L_img, 1, D/2, 2, 2)`` rotations for ``q`` (B, L_img, heads, D)."""
    return (
        torch.is_tensor(pe)
        and pe.dim() == 6
        and pe.shape[0] in (1, q.shape[0])
        and pe.shape[1] == n_txt + q.shape[1]
        and pe.shape[2] == 1
        and 2 * pe.shape[3] == q.shape[3]
        and pe.shape[-2:] == (2, 2)
    )


def _hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on ``attn.norm_q``: ``q -> R^-1 blur(R q)`` on the image tokens of the image stream."""

    def hook(_norm: nn.Module, _args: tuple, q: Any) -> Any:
        if not torch.is_tensor(q) or q.dim() != 4:
            return skipped(on_skip, layer, 0, None, "its norm_q returned no (B, L, heads, D) queries")
        pe, n_txt = call.attention.get(layer, (None, None))
        if n_txt is None:
            return skipped(on_skip, layer, q.shape[1], None, "its attention was called without a text sequence")
        grid = call.grid(n_txt)
        if isinstance(grid, str):
            return skipped(on_skip, layer, q.shape[1], None, grid)
        if not _fits(pe, q, n_txt):
            return skipped(on_skip, layer, q.shape[1], grid, "no RoPE rotations of its tokens reached the block")
        n_image = grid[0] * grid[1]
        if n_image > q.shape[1]:
            return skipped(on_skip, layer, q.shape[1], grid)
        image_pe = pe[:, n_txt:].transpose(1, 2)  # (B or 1, 1, L_img, D/2, 2, 2), as q.transpose(1, 2)
        blurred = blur_before_rope(q.transpose(1, 2), image_pe, slice(0, n_image), grid, sigma, rows)
        return blurred.transpose(1, 2).contiguous()

    return hook


class QwenImageFamily(DitFamily):
    """Qwen-Image / Qwen-Image-Edit (and Neo's Nunchaku build of them): ``transformer_blocks`` whose
    blocks have per-stream modulation (``img_mod``/``txt_mod``) and one joint ``attn``."""

    name, title = "qwen", "Qwen-Image / Qwen-Image-Edit"
    kinds = ("joint",)
    attributes: ClassVar[dict[str, str]] = {"joint": "transformer_blocks"}
    default = None
    default_source = (
        "no published Qwen-Image SEG, PAG or skip-layer choice (none in Neo's tree either): "
        "the middle block, j30 of Qwen-Image's 60"
    )
    signature = ("img_mod", "txt_mod", "attn.norm_q", "attn.norm_added_q")  # what a Qwen-Image block has
    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {"joint": ("attn.norm_q",)}
    never_ran = OFFLOADED

    def matches(self, model: Any) -> bool:
        if not has_blocks(model, "transformer_blocks") or not len(model.transformer_blocks):
            return False
        if any(isinstance(getattr(model, name, None), nn.ModuleList) for name in FOREIGN):
            return False
        modules = dict(model.transformer_blocks[0].named_modules())
        return all(name in modules for name in self.signature)

    def arm(
        self,
        model: nn.Module,
        layers: Iterable[DitLayer],
        sigma: float,
        rows: Rows,
        on_skip: SkipCallback | None,
        handles: list[RemovableHandle],
    ) -> None:
        layers = list(layers)
        call = _Call(model)
        handles.append(model.register_forward_pre_hook(call.on_model, with_kwargs=True))
        embedder = getattr(model, "pe_embedder", None)
        if isinstance(embedder, nn.Module):
            handles.append(embedder.register_forward_pre_hook(call.on_ids, with_kwargs=True))
        for layer in layers:
            block = self.block(model, layer)
            attn, norm = submodules(block, layer, ["attn"])[0], submodules(block, layer, ["attn.norm_q"])[0]
            handles.append(attn.register_forward_pre_hook(call.attention_recorder(layer), with_kwargs=True))
            handles.append(norm.register_forward_hook(_hook(layer, call, sigma, rows, on_skip)))


QWEN_IMAGE = QwenImageFamily()
