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
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import model_patch_size, patch_grid, positions_fit_grid
from lib_seg.dit.queries import Rows

from .base import AttentionCallFamily, CallFacts, CallShape, ImageTokens, arguments, has_blocks, placed

# Main ``layers`` of the released models (each also has 2 noise_refiner + 2 context_refiner layers).
RELEASED: dict[str, int] = {
    "z-image-turbo": 30,  # Neo backend/huggingface/Tongyi-MAI/Z-Image-Turbo/transformer/config.json: n_layers 30
    "neta-lumina": 26,  # Neo backend/huggingface/neta-art/Neta-Lumina/transformer/config.json: num_layers 26
}  # Neo counts them from the checkpoint (detection.py:52), so other depths work the same

Where = tuple[tuple[int, int], int]  # (grid, caption tokens before the image, pad tokens included)


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


class _Call(CallFacts):
    """What one model call tells :meth:`NextDiTFamily.locate`: the latent, the caption length, position ids."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.latent: tuple[int, int, int] | None = None  # (C, H, W)
        self.n_context: int | None = None
        self.ids: torch.Tensor | None = None
        self._where: Where | str | None = None

    def on_model(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.reset()
        call = arguments(model, args, kwargs)
        x, context = call.get("x", args[0] if args else None), call.get("context")
        if torch.is_tensor(x) and x.dim() == 4:
            self.latent = tuple(x.shape[1:])
        if torch.is_tensor(context) and context.dim() == 3:
            self.n_context = int(context.shape[1])

    def _locate(self) -> Where | str:
        if self.latent is None:
            return "the model call passed no 4D latent"
        channels, height, width = self.latent
        patch = _patch(self.model, channels)
        if patch is None:
            return "the model's patch size could not be read"
        grid = patch_grid(height, width, patch, pad=True)
        if self.n_context is None:
            return "the model call passed no caption sequence (context)"
        multiple = getattr(self.model, "pad_tokens_multiple", None)
        n_cap = self.n_context + ((-self.n_context) % multiple if isinstance(multiple, int) and multiple > 0 else 0)
        if self.ids is not None:
            stop = n_cap + grid[0] * grid[1]
            if self.ids.shape[1] < stop or not positions_fit_grid(self.ids[:, n_cap:stop, 1:3], grid):
                return f"the model's position ids do not lay its image tokens on the {grid[0]}x{grid[1]} grid"
        return grid, n_cap


class NextDiTFamily(AttentionCallFamily):
    """Lumina Image 2 / Neta Lumina: ``layers`` (``l``) after ``noise_refiner`` and ``context_refiner``."""

    name, title = "lumina2", "Lumina Image 2 / Neta Lumina"
    kinds = ("layer",)
    attributes: ClassVar[dict[str, str]] = {"layer": "layers"}
    attention: ClassVar[dict[str, str]] = {"layer": "attention"}
    default = None
    default_source = (
        "no published SEG, PAG or skip-layer choice for NextDiT: the middle layer, l13 of Neta Lumina's 26 "
        "(Neo neta-art/Neta-Lumina/transformer/config.json)"
    )

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

    def record(self, model: nn.Module, handles: list[RemovableHandle]) -> _Call:
        call = _Call(model)
        handles.append(model.register_forward_pre_hook(call.on_model, with_kwargs=True))
        embedder = getattr(model, "rope_embedder", None)
        if isinstance(embedder, nn.Module):
            handles.append(embedder.register_forward_pre_hook(call.on_ids, with_kwargs=True))
        return call

    def locate(self, record: _Call, layer: DitLayer, call: CallShape, rows: Rows) -> ImageTokens:
        grid, n_cap = placed(record.where())
        return ImageTokens(n_cap, grid, rows=rows)


class ZImageFamily(NextDiTFamily):
    """Z-Image (Turbo): NextDiT with ``z_image_modulation`` (:func:`_z_image_modulation`), width 3840."""

    name, title = "zimage", "Z-Image"
    default_source = (
        "no published SEG, PAG or skip-layer choice for Z-Image: the middle layer, l15 of Z-Image-Turbo's 30 "
        "(Neo Tongyi-MAI/Z-Image-Turbo/transformer/config.json)"
    )

    def matches(self, model: Any) -> bool:
        return _is_nextdit(model) and _z_image_modulation(model)


LUMINA2, ZIMAGE = NextDiTFamily(), ZImageFamily()
