"""Flux.1 (dev, schnell, Krea, Kontext), Chroma and Flux.2 (Klein): double-, then single-stream blocks.

Read at Neo ``backend/nn/flux.py`` / ``chroma.py`` (de2193d), Forge 2.x ``backend/nn/flux.py`` /
``chroma.py`` (dfdcbab) and reForge ``ldm_patched/ldm/flux`` / ``chroma`` (3b56b26); all share this
structure (interfaces only, no code taken):

* Hook point: ``double_blocks[i].img_attn.norm`` (image stream) and ``single_blocks[i].norm`` (the
  joint sequence) are QK-norm modules called as ``norm(q, k, v) -> (q, k)``; RoPE follows inside the
  host's ``attention()`` function, which no extension can reach.  The forward hook writes
  ``R^-1 blur(R q)`` (:func:`lib_seg.dit.queries.blur_before_rope`), so the host's own rotation gives
  exactly the blurred post-RoPE queries.  ``pe`` is one 2x2 rotation per channel pair and token,
  ``(B, 1, L, D/2, 2, 2)``, whatever the number of RoPE axes (Flux.1: 3 axes 16/56/56, Flux.2: 4 axes
  of 32, ``EmbedND`` concatenates them), so the identity holds for both.
* Geometry, from the model and the call, never from Flux.1's constants: the patch side is the
  model's (:func:`lib_seg.dit.geometry.model_patch_size`: 2 on Flux.1/Chroma, 1 on Flux.2); every host
  pads odd sides to the patch (``pad_to_patch_size``), so the grid is ``ceil(H / p) x ceil(W / p)``;
  the text length is the first double block's ``txt`` (the call's ``context`` without double blocks);
  the joint sequence is ``[txt | image | reference images]`` (Kontext and Flux.2 edit references
  follow the image, Neo ``forward``), and only the image tokens are blurred.
* Check: the model's own position ids (recorded at ``pe_embedder(ids)``) must put the image tokens
  row-major on that grid (``img_ids[..., 1:3]`` = row, column on every variant, Neo ``process_img``).
  A grid that fails this, or a query count that does not hold it, leaves the block unblurred with a
  warning: never a partial blur on a wrong grid (what Flux.2's patch 1 read as patch 2 gave).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import model_patch_size, patch_grid
from lib_seg.dit.queries import Rows, blur_before_rope

from .base import CallFacts, QNormFamily, SkipCallback, arguments, has_blocks, skipped

Where = tuple[tuple[int, int], int]  # (grid, text tokens before the image in the joint sequence)


class _Call(CallFacts):
    """What one model call tells the hooks: latent, text length, position ids, each block's rotations."""

    def reset(self) -> None:
        super().reset()  # and :meth:`read`: the latent's (C, H, W) and the context's length
        self.n_txt: int | None = None

    def on_text(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        txt = arguments(block, args, kwargs).get("txt")
        self.n_txt = int(txt.shape[1]) if torch.is_tensor(txt) and txt.dim() == 3 else None

    def read_block(self, layer: DitLayer, call: dict[str, Any]) -> Any:
        return call.get("pe")

    def _locate(self) -> Where | str:
        found = self.latent_patch(model_patch_size)
        if isinstance(found, str):
            return found
        grid = patch_grid(*found, pad=True)
        n_txt = self.n_txt if self.n_txt is not None else self.n_context
        if n_txt is None:
            return "the model call passed no text sequence"
        return self.ids_misplace(n_txt, grid) or (grid, n_txt)


# A model's input embedders that no Flux has: ComfyUI's Hunyuan3D (``comfy/ldm/hunyuan3d/model.py:33``) embeds a
# shape latent ``(B, L, C)`` with ``latent_in`` and no ``img_in``, on Flux's own double and single blocks.
FOREIGN_INPUTS = ("latent_in",)


def foreign_inputs(model: Any) -> str | None:
    """Why ``model``, which has Flux's ``double_blocks`` and ``single_blocks``, is not a Flux (None: nothing says
    so).  Every Flux, Chroma and Flux.2 (Neo, Forge 2.x, reForge, ComfyUI ``comfy/ldm/flux/model.py:59, 72``,
    ``chroma/model.py:57, 74``) patchifies a 4D latent by an int ``patch_size`` (where it keeps one) and embeds the
    patches with ``img_in``, a Linear module (a quantized one need not be a ``nn.Linear``: Forge's GGUF layers).
    ComfyUI builds other models from the same blocks, which SEG leaves alone: HunyuanVideo and HunyuanImage 2.1
    (``hunyuan_video/model.py:197, 213``: a list ``patch_size``, a convolution ``img_in``), JoyImage (a list
    ``patch_size``, a Conv3d ``img_in``), Hunyuan3D (:data:`FOREIGN_INPUTS`), Chroma Radiance (``img_in`` a method
    over a pixel convolution, ``chroma_radiance/model.py:70-71``)."""
    patch = getattr(model, "patch_size", None)
    if patch is not None and (not isinstance(patch, int) or isinstance(patch, bool)):
        return f"its patch_size {patch!r} is not one int"
    embedder = getattr(model, "img_in", None)
    if embedder is not None and (not isinstance(embedder, nn.Module) or isinstance(embedder, nn.modules.conv._ConvNd)):
        return f"its img_in is a {type(embedder).__name__}, not a linear patch embedding"
    found = [name for name in FOREIGN_INPUTS if isinstance(getattr(model, name, None), nn.Module)]
    return f"it embeds its input with {found[0]}" if found else None


def _hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on a QK-norm: ``(q, k) -> (R^-1 blur(R q), k)`` on the image queries."""

    def hook(_norm: nn.Module, _args: tuple, output: Any) -> Any:
        q, k = output
        where = call.where()
        if isinstance(where, str):
            return skipped(on_skip, layer, q.shape[-2], None, where)
        grid, n_txt = where
        pe = call.seen.get(layer)
        if pe is None or q.dim() != 4 or not torch.is_tensor(pe) or pe.dim() != 6:
            return skipped(on_skip, layer, q.shape[-2], grid, "no RoPE rotations reached the block")
        if layer.kind == "double":  # image-stream q ``[image | references]``: the last q.shape[2] rotations
            pe, start = pe[:, :, pe.shape[2] - q.shape[2] :], 0
        else:
            start = n_txt
        image = slice(start, start + grid[0] * grid[1])
        if image.stop > q.shape[2] or pe.shape[2] != q.shape[2]:
            return skipped(on_skip, layer, q.shape[2], grid)
        return blur_before_rope(q, pe, image, grid, sigma, rows), k

    return hook


class FluxFamily(QNormFamily):
    """Flux.1 and Chroma: ``double_blocks`` then ``single_blocks``, RoPE inside ``attention()``."""

    name, title = "flux", "Flux.1 / Chroma"
    kinds = ("double", "single")
    released: ClassVar[dict[str, dict[str, int]]] = {
        "flux": {"double": 19, "single": 38},
        "chroma": {"double": 19, "single": 38},
    }
    # ComfyUI's ``SkipLayerGuidanceDiT`` default (double "7, 8, 9", single "7, 8, 9",
    # ``comfy_extras/nodes_slg.py:24-28``); no published Flux SEG or PAG default exists.
    default = "d7-9,s7-9"
    default_source = (
        "ComfyUI's SkipLayerGuidanceDiT defaults (double 7, 8, 9; single 7, 8, 9; comfy_extras/nodes_slg.py); "
        "no published Flux SEG or PAG choice exists"
    )
    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {"double": ("img_attn.norm",), "single": ("norm",)}
    facts, ids_from, arguments_of = _Call, "pe_embedder", ""  # each chosen block's ``pe``
    hook = staticmethod(_hook)

    def matches(self, model: Any) -> bool:
        return has_blocks(model, "double_blocks", "single_blocks") and not foreign_inputs(model)

    def record(self, model: nn.Module, call: _Call, handles: list[RemovableHandle]) -> None:
        if len(model.double_blocks):  # the text length: the first double block's ``txt``
            handles.append(model.double_blocks[0].register_forward_pre_hook(call.on_text, with_kwargs=True))


class Flux2Family(FluxFamily):
    """Flux.2 (Klein 4B/9B): the Flux structure with one modulation shared by all blocks, patch 1 and
    4 RoPE axes (Neo builds it from the same class with the ``flux2`` config: ``global_modulation``)."""

    name, title = "flux2", "Flux.2"
    released: ClassVar[dict[str, dict[str, int]]] = {  # Neo huggingface_guess: depth from the checkpoint; BFL's
        "flux2-klein-4b": {"double": 5, "single": 20},  # Klein configs
        "flux2-klein-9b": {"double": 8, "single": 24},
    }
    default = None
    default_source = (
        "no published Flux.2 layer choice (ComfyUI's 7-9 are Flux.1 indices, beyond Klein's 5 or 8 double blocks): "
        "the middle block of each stream, Klein 4B d2,s10, Klein 9B d4,s12"
    )

    def matches(self, model: Any) -> bool:
        shared = getattr(model, "global_modulation", False) is True or isinstance(
            getattr(model, "double_stream_modulation_img", None), nn.Module
        )
        return shared and super().matches(model)


FLUX1, FLUX2 = FluxFamily(), Flux2Family()
