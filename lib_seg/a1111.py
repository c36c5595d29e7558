"""AUTOMATIC1111 (1.9-1.10) adapter: translates the host's objects into core calls.

How SEG runs on A1111 (interfaces read from v1.10.1 ``modules/sd_samplers_cfg_denoiser.py``):

* ``process_before_every_sampling`` attaches a :class:`SegRun` to the sampler's ``CFGDenoiser``
  (``p.sampler.model_wrap_cfg``) and wraps that *instance's* ``combine_denoised``.  txt2img makes a
  new denoiser per batch and for the hires pass, img2img reuses one, so attaching is idempotent.
* The ``cfg_denoiser`` callback hands us the rows the main pass uses: cond rows first (one per AND
  sub-prompt), with their x, sigma, image-cond and text cond.  We keep the cond rows.
* Inside ``combine_denoised`` (before the inpaint mask blend, so masked areas stay protected) we run
  one extra ``inner_model`` call on those cond rows with the queries of the chosen attn1 layers
  blurred, and add ``seg_scale * sum_w w (cond - cond_seg)`` per image.  Being a separate call, it
  does not care how the main pass was batched (batch_cond_uncond, prompt lengths, skipped uncond).
* Errors (bad settings, layers the model lacks) are raised from inside sampling: A1111 only logs
  exceptions from script hooks, but one from the denoiser fails the request with the message.
No host module is imported at module level; the script passes host objects in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import guidance, layers, query_hooks, schedule
from .params import SegParams

log = logging.getLogger("sd_webui_seg")

RUN_ATTR = "_seg_run"
WRAPPED_ATTR = "_seg_wrapped_combine"


def diffusion_model(sd_model: Any) -> torch.nn.Module | None:
    """The UNet of an ldm/sgm model (``sd_model.model.diffusion_model``), or None for other kinds."""
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    return unet if isinstance(unet, torch.nn.Module) and hasattr(unet, "input_blocks") else None


def available_layers(unet: torch.nn.Module) -> tuple[layers.LayerKey, ...]:
    return layers.layers_from_module_names(name for name, _ in unet.named_modules())


def unsupported_reason(sd_model: Any, custom_unet: Any = None) -> str | None:
    """Why SEG cannot run on this model (None if it can).  Such models are left untouched."""
    if getattr(sd_model, "is_sd3", False):
        return "SD3 is a transformer (MMDiT) model without UNet self-attention"
    if getattr(sd_model, "cond_stage_key", None) == "edit":
        return "edit models (InstructPix2Pix) are not supported"
    if getattr(getattr(sd_model, "model", None), "conditioning_key", None) == "crossattn-adm":
        return "unCLIP models are not supported"
    if custom_unet is not None:
        return "a custom UNet (sd_unet setting, e.g. TensorRT) bypasses the attention layers"
    if diffusion_model(sd_model) is None:
        return "this model has no ldm/sgm UNet"
    return None


def condition_dict(text_cond: Any, image_cond: torch.Tensor) -> dict[str, Any]:
    """The cond dict ``CFGDenoiser`` builds for ``inner_model`` (SDXL: crossattn/vector dict)."""
    if isinstance(text_cond, Mapping):
        return {**text_cond, "c_concat": [image_cond]}
    return {"c_crossattn": [text_cond], "c_concat": [image_cond]}


def cond_rows(text_cond: Any) -> int:
    return int((text_cond["crossattn"] if isinstance(text_cond, Mapping) else text_cond).shape[0])


@dataclass
class SegRun:
    """SEG for one sampling pass: validated settings, or the error to raise inside sampling."""

    params: SegParams | None
    is_hr_pass: bool = False
    error: Exception | None = None
    captured: tuple | None = None
    skipped: set = field(default_factory=set)
    _resolved: dict = field(default_factory=dict)

    def capture(self, denoiser_params: Any) -> None:
        """``cfg_denoiser`` callback: keep the cond rows of the main pass (they come first)."""
        n = cond_rows(denoiser_params.text_cond)
        self.captured = (
            denoiser_params.x[:n],
            denoiser_params.sigma[:n],
            denoiser_params.image_cond[:n],
            denoiser_params.text_cond,
        )

    def layers_for(self, unet: torch.nn.Module) -> tuple[layers.LayerKey, ...]:
        """Resolve the spec against the UNet in use now (the refiner may swap it mid-run)."""
        key = id(unet)
        if key not in self._resolved:
            self._resolved[key] = layers.resolve_layers(self.params.layers, available_layers(unet))
        return self._resolved[key]

    def active(self, denoiser: Any) -> tuple[float, float] | None:
        if self.error is not None:
            raise self.error
        setting = self.params.for_pass(self.is_hr_pass) if self.params else None
        if setting is None:
            return None
        progress = schedule.progress(denoiser.step, denoiser.total_steps or 0)
        return setting if schedule.in_window(progress, self.params.start, self.params.end) else None

    def seg_prediction(self, denoiser: Any, sigma_blur: float) -> torch.Tensor:
        """One extra ``inner_model`` call on the cond rows with blurred queries."""
        if self.captured is None:
            raise RuntimeError("SEG: the cfg_denoiser callback did not run; is the script loaded?")
        x, sigma, image_cond, text_cond = self.captured
        unet = diffusion_model(denoiser.p.sd_model)
        with query_hooks.blurred_queries(unet, self.layers_for(unet), sigma_blur, on_skip=self._warn_skip):
            return denoiser.inner_model(x, sigma, cond=condition_dict(text_cond, image_cond))

    def _warn_skip(self, key: layers.LayerKey, n_tokens: int, grid: tuple[int, int] | None) -> None:
        if key not in self.skipped:
            self.skipped.add(key)
            log.warning(
                "SEG: %s sees %d queries, not the %s token grid (HyperTile/ToMe/Deep Shrink?); left unblurred",
                layers.format_layers([key]),
                n_tokens,
                "x".join(map(str, grid or ())),
            )

    def combine(self, denoiser: Any, denoised: torch.Tensor, x_out: torch.Tensor, conds_list: Sequence) -> torch.Tensor:
        setting = self.active(denoiser)
        if setting is None:
            return denoised
        seg_scale, sigma_blur = setting
        cond_seg = self.seg_prediction(denoiser, sigma_blur)
        cond = x_out[: cond_seg.shape[0]]
        return guidance.apply_seg_composable(denoised, cond, cond_seg, conds_list, seg_scale)


def _seg_combine_denoised(denoiser: Any):
    wrapped = denoiser.combine_denoised

    def combine_denoised(x_out, conds_list, uncond, cond_scale):
        denoised = wrapped(x_out, conds_list, uncond, cond_scale)
        run = getattr(denoiser, RUN_ATTR, None)
        return denoised if run is None else run.combine(denoiser, denoised, x_out, conds_list)

    setattr(combine_denoised, WRAPPED_ATTR, wrapped)
    return combine_denoised


def attach(denoiser: Any, run: SegRun) -> None:
    """Give ``denoiser`` (a ``CFGDenoiser``) this run; wrap its ``combine_denoised`` once."""
    if not hasattr(denoiser.combine_denoised, WRAPPED_ATTR):
        denoiser.combine_denoised = _seg_combine_denoised(denoiser)
    setattr(denoiser, RUN_ATTR, run)


def detach(denoiser: Any) -> None:
    """Undo :func:`attach` (restores whatever ``combine_denoised`` was there before)."""
    if denoiser is None:
        return
    current = vars(denoiser).get("combine_denoised")
    if current is not None and hasattr(current, WRAPPED_ATTR):
        original = getattr(current, WRAPPED_ATTR)
        if getattr(original, "__self__", None) is denoiser and original.__func__ is type(denoiser).combine_denoised:
            del denoiser.combine_denoised
        else:
            denoiser.combine_denoised = original
    vars(denoiser).pop(RUN_ATTR, None)


def on_cfg_denoiser(denoiser_params: Any) -> None:
    """Global ``on_cfg_denoiser`` callback; only denoisers we attached to are looked at."""
    run = getattr(getattr(denoiser_params, "denoiser", None), RUN_ATTR, None)
    if run is not None:
        run.capture(denoiser_params)
