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

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core import blocks as dit_layers
from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import model_patch_size, patch_grid, positions_fit_grid
from lib_seg.dit.queries import Rows, blur_before_rope

from .base import CallFacts, DitFamily, SkipCallback, arguments, has_blocks, skipped, submodules

Where = tuple[tuple[int, int], int]  # (grid, text tokens before the image in the joint sequence)


class _Call(CallFacts):
    """What one model call tells the hooks: latent, text length, position ids, each block's rotations."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.latent: tuple[int, int, int] | None = None  # (C, H, W)
        self.n_context: int | None = None
        self.n_txt: int | None = None
        self.ids: torch.Tensor | None = None
        self.pe: dict[DitLayer, torch.Tensor] = {}
        self._where: Where | str | None = None

    def on_model(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.reset()
        call = arguments(model, args, kwargs)
        x = call.get("x", args[0] if args else None)
        context = call.get("context")
        if torch.is_tensor(x) and x.dim() == 4:
            self.latent = tuple(x.shape[1:])
        if torch.is_tensor(context) and context.dim() == 3:
            self.n_context = int(context.shape[1])

    def on_text(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        txt = arguments(block, args, kwargs).get("txt")
        self.n_txt = int(txt.shape[1]) if torch.is_tensor(txt) and txt.dim() == 3 else None

    def pe_recorder(self, layer: DitLayer):
        def pre_hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            self.pe[layer] = arguments(block, args, kwargs).get("pe")

        return pre_hook

    def _locate(self) -> Where | str:
        if self.latent is None:
            return "the model call passed no 4D latent"
        channels, height, width = self.latent
        patch = model_patch_size(self.model, channels)
        if patch is None:
            return "the model's patch size could not be read"
        grid = patch_grid(height, width, patch, pad=True)
        n_txt = self.n_txt if self.n_txt is not None else self.n_context
        if n_txt is None:
            return "the model call passed no text sequence"
        if self.ids is not None:
            stop = n_txt + grid[0] * grid[1]
            if self.ids.shape[1] < stop or not positions_fit_grid(self.ids[:, n_txt:stop, 1:3], grid):
                return f"the model's position ids do not lay its image tokens on the {grid[0]}x{grid[1]} grid"
        return grid, n_txt


def _hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on a QK-norm: ``(q, k) -> (R^-1 blur(R q), k)`` on the image queries."""

    def hook(_norm: nn.Module, _args: tuple, output: Any) -> Any:
        q, k = output
        where = call.where()
        if isinstance(where, str):
            return skipped(on_skip, layer, q.shape[-2], None, where)
        grid, n_txt = where
        pe = call.pe.get(layer)
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


class FluxFamily(DitFamily):
    """Flux.1 and Chroma: ``double_blocks`` then ``single_blocks``, RoPE inside ``attention()``."""

    name, title = "flux", "Flux.1 / Chroma"
    kinds = ("double", "single")
    default = dit_layers.FLUX1_DEFAULT
    default_source = (
        "ComfyUI's SkipLayerGuidanceDiT defaults (double 7, 8, 9; single 7, 8, 9; comfy_extras/nodes_slg.py); "
        "no published Flux SEG or PAG choice exists"
    )
    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {"double": ("img_attn.norm",), "single": ("norm",)}

    def matches(self, model: Any) -> bool:
        return has_blocks(model, "double_blocks", "single_blocks")

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
        embedder = getattr(model, "pe_embedder", None)
        if isinstance(embedder, nn.Module):
            handles.append(embedder.register_forward_pre_hook(call.on_ids, with_kwargs=True))
        if len(model.double_blocks):
            handles.append(model.double_blocks[0].register_forward_pre_hook(call.on_text, with_kwargs=True))
        for layer in layers:
            block = self.block(model, layer)
            handles.append(block.register_forward_pre_hook(call.pe_recorder(layer), with_kwargs=True))
            hook = _hook(layer, call, sigma, rows, on_skip)
            norms = submodules(block, layer, self.query_modules[layer.kind])
            handles.extend(norm.register_forward_hook(hook) for norm in norms)


class Flux2Family(FluxFamily):
    """Flux.2 (Klein 4B/9B): the Flux structure with one modulation shared by all blocks, patch 1 and
    4 RoPE axes (Neo builds it from the same class with the ``flux2`` config: ``global_modulation``)."""

    name, title = "flux2", "Flux.2"
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
