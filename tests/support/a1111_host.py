"""Imitation of the AUTOMATIC1111 v1.10.1 objects the A1111 adapter touches, written for tests.

Followed interfaces (v1.10.1, tag 82a973c):
* ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale,
  s_min_uncond, image_cond)``: cond rows first (``x[i]`` repeated per AND sub-prompt), uncond rows last;
  ``cfg_denoiser_callback(CFGDenoiserParams(x_in, image_cond_in, sigma_in, sampling_step,
  sampling_steps, text_cond, text_uncond, denoiser))`` before uncond skipping; with
  ``batch_cond_uncond`` one ``inner_model(x_in, sigma_in, cond=make_condition_dict(...))`` call,
  otherwise chunks of ``batch_size`` rows; different cond/uncond token lengths: cond chunks, then
  one uncond call; skipped uncond: the first sub-prompt row of each image is appended as fake uncond
  and ``combine_denoised(..., 1.0)``; the mask blend (k-diffusion) after combining; ``step += 1``.
* ``combine_denoised(x_out, conds_list, uncond, cond_scale)``: the last B rows are uncond.
* ``k_diffusion.external.CompVisDenoiser``: x0 = x - sigma * eps(x * c_in, t(sigma)).
* ``make_condition_dict``: ``{"c_crossattn": [c], "c_concat": [img]}``, SDXL ``{**c, "c_concat": [img]}``
  with ``c = {"crossattn", "vector"}``.
* SD3 (``modules/models/sd3/sd3_model.py``): ``SD3Inferencer`` with ``is_sd3``, ``model.diffusion_model``
  the MMDiT, ``create_denoiser()`` (used by ``sd_samplers_kdiffusion.py:56-59`` instead of
  CompVisDenoiser) and ``apply_model(x, t, cond)`` calling the MMDiT as ``(x, t, context=cond["crossattn"],
  y=cond["vector"])`` (``sd3_model.py:56-57``, ``sd3_impls.py:72-76``): flow matching, t = 1000 sigma,
  x0 = x - sigma * out.  Conds are ``DictWithShape`` like SDXL's.
Prompt scheduling is already resolved: ``cond`` is ``(conds_list, tensor)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from .unet import UNetModel


class DictWithShape(dict):
    """``modules/prompt_parser.py`` ``DictWithShape``: SDXL conds, a dict whose ``shape`` is crossattn's."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


class InterruptedException(BaseException):
    """A1111's ``sd_samplers_common.InterruptedException`` is a BaseException too."""


@dataclass
class CFGDenoiserParams:
    x: torch.Tensor
    image_cond: torch.Tensor
    sigma: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    text_cond: Any
    text_uncond: Any
    denoiser: Any = None


class FakeSDModel:
    """``shared.sd_model`` stand-in: ``model.diffusion_model`` and ``apply_model(x, t, cond)``."""

    def __init__(self, unet: UNetModel):
        self.model = SimpleNamespace(diffusion_model=unet, conditioning_key="crossattn")
        self.cond_stage_key = "txt"
        self.is_sdxl = bool(unet.config.adm_in_channels)
        self.is_sd3 = False

    def apply_model(self, x, t, cond):
        if self.is_sdxl:
            return self.model.diffusion_model(x, t, cond["crossattn"], cond["vector"])
        return self.model.diffusion_model(x, t, torch.cat(cond["c_crossattn"], 1))


class FakeSD3Model:
    """``SD3Inferencer`` stand-in over an MMDiT-layout module (tests/support/dit_models.py TinyMMDiT)."""

    def __init__(self, mmdit: torch.nn.Module):
        self.model = SimpleNamespace(diffusion_model=mmdit, conditioning_key="crossattn")
        self.cond_stage_key = "txt"
        self.is_sdxl, self.is_sd3 = False, True

    def create_denoiser(self):
        return SD3Denoiser(self)

    def apply_model(self, x, sigma, cond):
        out = self.model.diffusion_model(x, sigma * 1000.0, context=cond["crossattn"], y=cond["vector"])
        return x - out * sigma[:, None, None, None]


class SD3Denoiser(torch.nn.Module):
    def __init__(self, sd_model: FakeSD3Model):
        super().__init__()
        self.inner_model = sd_model

    def forward(self, x, sigma, cond):
        return self.inner_model.apply_model(x, sigma, cond)


class CompVisDenoiser(torch.nn.Module):
    def __init__(self, sd_model: FakeSDModel):
        super().__init__()
        self.inner_model = sd_model

    def forward(self, x, sigma, cond):
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        eps = self.inner_model.apply_model(x * c_in[:, None, None, None], sigma.log() * 100.0, cond)
        return x - eps * sigma[:, None, None, None]


def _cat(conds):
    if isinstance(conds[0], dict):
        return DictWithShape({k: torch.cat([c[k] for c in conds]) for k in conds[0]})
    return torch.cat(conds)


def _rows(cond, a, b):
    return DictWithShape({k: v[a:b] for k, v in cond.items()}) if isinstance(cond, dict) else cond[a:b]


def _tokens(cond):
    return cond.shape[1]  # as the host reads it: tensor.shape / DictWithShape.shape


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sd_model: FakeSDModel, p: Any = None, callbacks=(), batch_cond_uncond: bool = True):
        super().__init__()
        create = getattr(sd_model, "create_denoiser", None)
        self.inner_model = create() if create is not None else CompVisDenoiser(sd_model)
        self.p = p if p is not None else SimpleNamespace(sd_model=sd_model)
        self.callbacks = list(callbacks)
        self.batch_cond_uncond = batch_cond_uncond
        self.step, self.total_steps = 0, 1
        self.mask = self.nmask = self.init_latent = None

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-_rows_count(uncond) :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, image_cond, skip_uncond=False):
        conds_list, tensor = cond
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]

        def make_condition_dict(c_crossattn, c_concat):
            if isinstance(c_crossattn, dict):
                return {**c_crossattn, "c_concat": [c_concat]}
            return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        x_in = torch.cat([torch.stack([x[i]] * n) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i]] * n) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i]] * n) for i, n in enumerate(repeats)] + [image_cond])
        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, self.step, self.total_steps, tensor, uncond, self)
        for callback in self.callbacks:
            callback(params)
        x_in, image_cond_in, sigma_in, tensor, uncond = (
            params.x,
            params.image_cond,
            params.sigma,
            params.text_cond,
            params.text_uncond,
        )
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]

        n_cond = sum(repeats)
        if _tokens(tensor) == _tokens(uncond) or skip_uncond:
            cond_in = tensor if skip_uncond else _cat([tensor, uncond])
            if self.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(
                        x_in[a:b], sigma_in[a:b], cond=make_condition_dict(_rows(cond_in, a, b), image_cond_in[a:b])
                    )
        else:
            x_out = torch.zeros_like(x_in)
            step = batch_size * 2 if self.batch_cond_uncond else batch_size
            for a in range(0, n_cond, step):
                b = min(a + step, n_cond)
                x_out[a:b] = self.inner_model(
                    x_in[a:b], sigma_in[a:b], cond=make_condition_dict(_rows(tensor, a, b), image_cond_in[a:b])
                )
            x_out[-batch_size:] = self.inner_model(
                x_in[-batch_size:],
                sigma_in[-batch_size:],
                cond=make_condition_dict(uncond, image_cond_in[-batch_size:]),
            )
        if skip_uncond:
            first_rows = [c[0][0] for c in conds_list]
            x_out = torch.cat([x_out, x_out[first_rows]])
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.step += 1
        return denoised


def _rows_count(uncond):
    return uncond.shape[0]
