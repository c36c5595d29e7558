"""What A1111's objects look like to SEG: the network behind ``sd_model``, the conds ``CFGDenoiser`` builds, and the
models SEG leaves alone (interfaces read from v1.10.1 ``modules/sd_samplers_cfg_denoiser.py``, ``modules/sd_unet.py``,
``modules/models/sd3``).  No host module is imported at module level."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from lib_seg import targets


def diffusion_model(sd_model: Any) -> Any:
    """``sd_model.model.diffusion_model``: the ldm/sgm UNet, or SD3's MMDiT (``modules/models/sd3``)."""
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


def query_target(sd_model: Any) -> targets.QueryTarget | None:
    return targets.query_target(diffusion_model(sd_model))


def layer_text(sd_model: Any, spec: str) -> str:
    """The canonical spec infotext records for this model; raises when the model lacks the layers."""
    return query_target(sd_model).canonical(spec)


def custom_unet() -> Any:
    """The ``sd_unet`` setting's replacement UNet (TensorRT and the like), or None (A1111 ``modules/sd_unet.py``)."""
    try:
        from modules import sd_unet
    except ImportError:
        return None
    return getattr(sd_unet, "current_unet", None)


def unsupported_reason(sd_model: Any, custom_unet: Any = None) -> str | None:
    """Why SEG cannot run on this model (None if it can).  Such models are left untouched."""
    if getattr(sd_model, "cond_stage_key", None) == "edit":
        return "edit models (InstructPix2Pix) are not supported"
    if getattr(getattr(sd_model, "model", None), "conditioning_key", None) == "crossattn-adm":
        return "unCLIP models are not supported"
    if custom_unet is not None:
        return "a custom UNet (sd_unet setting, e.g. TensorRT) bypasses the attention layers"
    if query_target(sd_model) is None:
        return "this model is neither an ldm/sgm UNet nor an SD3 transformer (MMDiT)"
    return None


def condition_dict(text_cond: Any, image_cond: torch.Tensor) -> dict[str, Any]:
    """The cond dict ``CFGDenoiser`` builds for ``inner_model`` (SDXL: crossattn/vector dict)."""
    if isinstance(text_cond, Mapping):
        return {**text_cond, "c_concat": [image_cond]}
    return {"c_crossattn": [text_cond], "c_concat": [image_cond]}


def crossattn(text_cond: Any) -> torch.Tensor:
    return text_cond["crossattn"] if isinstance(text_cond, Mapping) else text_cond


def cond_rows(text_cond: Any) -> int:
    return int(crossattn(text_cond).shape[0])


def doubled(text_cond: Any) -> Any:
    """The cond rows twice.  SDXL conds are A1111's ``DictWithShape`` (a dict with a ``shape``
    property the host reads), so the copy keeps the class."""
    if isinstance(text_cond, Mapping):
        doubled = copy.copy(text_cond)
        for key, value in text_cond.items():
            doubled[key] = torch.cat([value, value])
        return doubled
    return torch.cat([text_cond, text_cond])
