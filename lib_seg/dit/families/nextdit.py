"""Z-Image (Turbo) and Lumina Image 2 (Neta Lumina): NextDiT, single-stream ``layers`` after two refiners.

Read at Neo ``backend/nn/lumina.py`` (de2193d; interfaces only, no code taken), the class ``NextDiT``
that ``backend/loader.py:394-406`` builds for both from ``huggingface_guess/detection.py:43-79`` (width
3840 = Z-Image: 30 heads, RoPE axes 32/48/48, theta 256, ``z_image_modulation``, pad tokens to a multiple
of 32 where the checkpoint has ``cap_pad_token``; width 2304 = Lumina 2: 24 heads over 8 k/v heads, axes
32/32/32, theta 10000, no pad tokens):

* What is blurred: the image queries of the main ``layers[i]`` (``l0`` ...), whose attention runs over
  the joint ``[caption | caption pad | image | image pad]`` sequence with no mask (``lumina.py:382,
  413-414``).  Caption, pad tokens, all keys and values stay as they are.  The ``context_refiner``
  (caption only) and ``noise_refiner`` (image only, before any text is seen) layers are not blocks here.
* Hook point: the main layer's ``attention`` call of ``attention_function(q, k, v, heads, mask,
  skip_reshape=True, transformer_options=...)``, a module-global of ``lumina.py`` looked up at call time, with
  q ``(B, heads, L, D)`` normalised and rotated already (:mod:`lib_seg.dit.attention_call`).  The same seam
  serves Neo 2.26 (``q_norm`` module, then comfy-kitchen's ``apply_rope``, ``lumina.py:86-95``) and Neo
  2.27+, where q-norm and RoPE are one fused kernel (``ck.rms_rope`` / ``rms_rope1`` for grouped k/v heads;
  youlijie/sd-webui-forge-classic fdb9c164 ``backend/nn/lumina.py``) and no q-norm module is called; on
  2.27+ ``wrap_attn`` also honours SEG's ``optimized_attention_override``.  No RoPE is undone, so the
  blur is exact in every dtype.  An attention that reaches neither seam (a kernel that attends by itself)
  is reported, never silently skipped.
* Geometry, from the model and the call: the patch side is the model's ``patch_size`` (or
  ``x_embedder``'s width); odd sides are padded (``pad_to_patch_size``), grid ``ceil(H / p) x ceil(W / p)``;
  the image starts after the caption, ``context.shape[1]`` rounded up to the model's
  ``pad_tokens_multiple`` (``lumina.py:351-353``); the image pad tokens follow the image.  Check: the
  position ids the model gives ``rope_embedder`` must put those tokens row-major on that grid (axes 1, 2
  = row, column, ``lumina.py:362-365``), else every block is skipped with a warning.
* ComfyUI's own ``NextDiT`` (``comfy/ldm/lumina/model.py``, read at hiddenswitch/pip-and-uv-installable-ComfyUI
  87606c5f) has the same modules and calls its module-global ``optimized_attention_masked`` (line 169) the
  same way, but gives ``rope_embedder`` each segment's ids apart (caption, then the image, batch 1; Z-Image
  Omni also reference images, SigLIP features and leftover captions), so the image is found by its own
  segment's ids and placed at the end of the joint sequence (:meth:`_Call._image_segment`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import model_patch_size, patch_grid, positions_fit_grid
from lib_seg.dit.queries import Rows

from .base import AttentionCallFamily, CallFacts, CallShape, ImageTokens, Skip, has_blocks, placed

# (grid, caption tokens before the image, pad tokens included; None: the image ends the sequence, ComfyUI)
Where = tuple[tuple[int, int], int | None]


def _patch(model: nn.Module, channels: int) -> int | None:
    size = model_patch_size(model, channels)
    features = getattr(getattr(model, "x_embedder", None), "in_features", None)
    if size is None and isinstance(features, int) and channels > 0 and features % channels == 0:
        side = math.isqrt(features // channels)
        size = side if side * side * channels == features else None
    return size


def _is_nextdit(model: Any) -> bool:
    """Main ``layers`` with an ``attention`` each, after ``noise_refiner`` and ``context_refiner``,
    fed by ``x_embedder`` (patches) and ``cap_embedder`` (caption)."""
    return (
        has_blocks(model, "layers", "noise_refiner", "context_refiner")
        and isinstance(getattr(model, "cap_embedder", None), nn.Module)
        and isinstance(getattr(model, "x_embedder", None), nn.Module)
        and all(isinstance(getattr(block, "attention", None), nn.Module) for block in model.layers)
    )


def _z_image_modulation(model: nn.Module) -> bool:
    """Neo's ``z_image_modulation`` (set for width 3840): each layer's ``adaLN_modulation`` is a bare
    ``Linear``, where Lumina 2's starts with a SiLU (``lumina.py:139-147``)."""
    modulation = getattr(model.layers[0], "adaLN_modulation", None) if len(model.layers) else None
    return isinstance(modulation, nn.Sequential) and len(modulation) > 0 and isinstance(modulation[0], nn.Linear)


def padded(n_tokens: int, model: nn.Module) -> int:
    """``n_tokens`` rounded up to the model's ``pad_tokens_multiple`` (Z-Image's 32; none on Lumina 2)."""
    multiple = getattr(model, "pad_tokens_multiple", None)
    return n_tokens + ((-n_tokens) % multiple if isinstance(multiple, int) and multiple > 0 else 0)


class _Call(CallFacts):
    """What one model call tells :meth:`NextDiTFamily.locate`: the latent's (C, H, W), the caption length
    (:meth:`CallFacts.read`), the position ids of every ``rope_embedder`` call (:attr:`segments`)."""

    def reset(self) -> None:
        super().reset()
        self.segments: list[torch.Tensor] = []  # the ids of each rope_embedder call, in call order

    def on_ids(self, embedder: nn.Module, args: tuple, kwargs: dict) -> None:
        super().on_ids(embedder, args, kwargs)
        if self.ids is not None:
            self.segments.append(self.ids)

    def _locate(self) -> Where | str:
        found = self.latent_patch(_patch)
        if isinstance(found, str):
            return found
        grid = patch_grid(*found, pad=True)
        if len(self.segments) > 1:  # ComfyUI: one rope_embedder call per segment, the image's its own
            return self._image_segment(grid)
        if self.n_context is None:
            return "the model call passed no caption sequence (context)"
        n_cap = padded(self.n_context, self.model)
        return self.ids_misplace(n_cap, grid) or (grid, n_cap)

    def _image_segment(self, grid: tuple[int, int]) -> Where | str:
        """ComfyUI's ``NextDiT`` embeds each segment apart (``comfy/ldm/lumina/model.py``: the caption's ids in
        ``embed_cap`` 662-665, the image's in ``embed_all`` 709-711, batch 1, its pad tokens' ids after its
        ``h * w``; Z-Image Omni: reference images and SigLIP features before it, leftover captions after,
        727-764) and joins them with the main image last (``padded_full_embed`` 804), so the image's tokens are
        the sequence's last ``h * w`` and its pad (:meth:`NextDiTFamily.locate`; None marks that start).  The last
        segment of the image's padded length whose ids lay its first ``h * w`` tokens row-major on the grid
        is the main image's (it is embedded after every reference)."""
        n_image = grid[0] * grid[1]
        for ids in reversed(self.segments):
            if ids.shape[1] == padded(n_image, self.model) and positions_fit_grid(ids[:, :n_image, 1:3], grid):
                return grid, None
        return f"the model's position ids do not lay its image tokens on the {grid[0]}x{grid[1]} grid"


class NextDiTFamily(AttentionCallFamily):
    """Lumina Image 2 / Neta Lumina: ``layers`` (``l``) after ``noise_refiner`` and ``context_refiner``."""

    name, title = "lumina2", "Lumina Image 2 / Neta Lumina"
    attributes: ClassVar[dict[str, str]] = {"layer": "layers"}
    attention: ClassVar[dict[str, str]] = {"layer": "attention"}
    # Main ``layers`` (each model also has 2 noise_refiner + 2 context_refiner layers): Neo
    # backend/huggingface/neta-art/Neta-Lumina/transformer/config.json num_layers 26; Neo counts them from the
    # checkpoint (detection.py:52), so other depths work the same.
    released: ClassVar[dict[str, dict[str, int]]] = {"neta-lumina": {"layer": 26}}
    default_source = (
        "no published SEG, PAG or skip-layer choice for NextDiT: the middle layer, l13 of Neta Lumina's 26 "
        "(Neo neta-art/Neta-Lumina/transformer/config.json)"
    )
    facts, ids_from = _Call, "rope_embedder"

    def matches(self, model: Any) -> bool:
        return _is_nextdit(model) and not _z_image_modulation(model)

    def prefix(self, model: nn.Module, layers: Iterable[DitLayer]) -> tuple[list[nn.Module], list[nn.Module]]:
        """The refiners run before every main layer on rows that equal their cond rows, so the SEG rows skip
        them too: ``context_refiner`` (caption), then ``noise_refiner`` (image), each slimmed.  Their slim
        outputs are joined into a slim sequence that the main layers before the first chosen one take as
        it is; the rows come back after the last of those, or, with ``l0`` chosen, after each refiner stream
        (the host joins the two streams, which must then both be whole)."""
        before, widen = super().prefix(model, layers)
        streams = [stream for stream in (model.context_refiner, model.noise_refiner) if len(stream)]
        refiners = [block for stream in streams for block in stream]
        return [*refiners, *before], widen if before else [stream[-1] for stream in streams]

    def locate(self, record: _Call, layer: DitLayer, call: CallShape, rows: Rows) -> ImageTokens:
        grid, n_cap = placed(record.where())
        if n_cap is None:  # ComfyUI: the main image and its pad tokens end the joint sequence
            n_cap = call.queries - padded(grid[0] * grid[1], record.model)
            if n_cap < 0 or call.keys != call.queries:
                raise Skip(f"its {call.queries} queries do not end with the {grid[0]}x{grid[1]} image")
        return ImageTokens(n_cap, grid, rows=rows)


class ZImageFamily(NextDiTFamily):
    """Z-Image (Turbo): NextDiT with ``z_image_modulation`` (:func:`_z_image_modulation`), width 3840."""

    name, title = "zimage", "Z-Image"
    # Neo backend/huggingface/Tongyi-MAI/Z-Image-Turbo/transformer/config.json: n_layers 30 (main layers, as Lumina 2's)
    released: ClassVar[dict[str, dict[str, int]]] = {"z-image-turbo": {"layer": 30}}
    default_source = (
        "no published SEG, PAG or skip-layer choice for Z-Image: the middle layer, l15 of Z-Image-Turbo's 30 "
        "(Neo Tongyi-MAI/Z-Image-Turbo/transformer/config.json)"
    )

    def matches(self, model: Any) -> bool:
        return _is_nextdit(model) and _z_image_modulation(model)


LUMINA2, ZIMAGE = NextDiTFamily(), ZImageFamily()
