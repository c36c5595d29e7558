"""Imitation of the Forge-family host contract the Forge adapter touches, written for tests.

Followed interfaces (read from the host sources; no host code copied):
* classic Forge 4a9c8f32 (``ldm_patched/modules/samplers.py`` ``calc_cond_uncond_batch`` :156-274 and
  ``sampling_function`` :278-305; ``ldm_patched/modules/model_patcher.py``
  ``set_model_sampler_post_cfg_function`` :70-73, ``set_model_patch_replace`` :93-103;
  ``modules_forge/unet_patcher.py`` ``UnetPatcher.clone`` :17-32, deepcopy of ``model_options``;
  ``ldm_patched/ldm/modules/attention.py`` ``optimized_attention(q, k, v, heads, mask=None)``).
* new Forge dfdcbab (``backend/sampling/sampling_function.py`` ``calc_cond_uncond_batch`` :154-289,
  ``sampling_function`` :325 / ``sampling_function_inner`` :292; ``backend/patcher/base.py``;
  ``backend/patcher/unet.py`` ``UnetPatcher.clone`` :26-35; ``backend/nn/unet.py`` binds
  ``attention_function`` from ``backend/attention.py`` at import; ``modules/processing.py`` passes
  ``uc=None`` when CFG is 1).
* reForge 3b56b26 (``ldm_patched/modules/samplers.py`` ``calc_cond_batch`` :206-355 returning a list,
  ``calc_cond_uncond_batch`` wrapper :357-359, ``cfg_function`` :372 with ``cond_scale`` in the post-CFG
  args and ``uncond=None`` when skipped, ``sampling_function`` :413; ``attention.py`` puts
  ``attn_precision`` and ``activations_shape`` in ``extra_options``; ``optimized_attention`` takes
  ``attn_precision``).
* Forge Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d, ``webui/``): the new-Forge names above unchanged
  (``backend/sampling/sampling_function.py`` ``calc_cond_uncond_batch`` :156-289 with
  ``model.memory_required(shape) < free_memory`` :211, ``sampling_function_inner`` :292-323;
  ``backend/patcher/base.py`` setters :273-303; ``backend/nn/unet.py`` attn1 replace :215-227), told
  apart by ``modules_forge/forge_version.py`` ``version = "neo"``; ``KModel.memory_required`` is
  ComfyUI v0.3.64's area formula (``backend/modules/k_model.py:60-68``, :class:`NeoKModel`).
* ComfyUI (hiddenswitch/pip-and-uv-installable-ComfyUI 87606c5f, upstream master merged 2026-02-03), kind
  ``"comfyui"``: reForge's contract, which is ComfyUI's (``comfy/samplers.py`` ``_calc_cond_batch`` :236-371 with
  ``memory_required(shape) * 1.5 < free_memory``, ``cfg_function`` :375 post-CFG args with ``cond_scale``,
  ``sampling_function`` :395 skipping the uncond at CFG 1 unless ``disable_cfg1_optimization``;
  ``comfy/ldm/modules/attention.py`` ``BasicTransformerBlock.forward`` :893-950 puts ``n_heads``, ``dim_head``,
  ``attn_precision`` and every transformer option (``activations_shape`` included) in ``extra_options``;
  ``comfy/model_patcher.py`` ``clone`` :377, setters :491-522, ``get_model_object`` :582;
  ``comfy/model_sampling.py`` ``percent_to_sigma`` :250-258 (log-linear between sigma_max and sigma_min)).
* all of them: ``modules/sd_samplers_cfg_denoiser.py`` ``CFGDenoiser`` (``step`` counted per call, reset
  by ``initialize``; ``total_steps`` set by ``launch_sampling``) re-reads ``forge_objects.unet`` per call.

Per-pass ``transformer_options`` are a shallow copy of ``model_options["transformer_options"]`` plus
``cond_or_uncond`` and ``sigmas`` (classic/new: ``cond_mark``, ``cond_indices``, ``uncond_indices``;
reForge: ``uuids``, ``attn_precision``).  The tiny UNet (tests/support/unet.py) always reports
``activations_shape`` as reForge does; the classic/new imitation hides it from attn1 patches because
their ``BasicTransformerBlock`` does not pass it.  Cond entries are ``{"model_conds": {"c_crossattn",
"y"?}, "strength"}`` (one per AND sub-prompt), combined as the hosts do: ``sum(out * strength) /
(1e-37 + sum(strength))``; an uncond that is not run stays zero.
"""

from __future__ import annotations

import copy
import math
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch

from .unet import UNetModel, attention

KINDS = ("forge", "neo", "reforge", "forge-classic")
BACKEND = ("forge", "neo")  # the hosts with the ``backend/`` layout
COMFYUI = "comfyui"
CALC_COND_BATCH = ("reforge", COMFYUI)  # ``calc_cond_batch(model, [cond, uncond], ...)`` hosts
MEMORY_MODULE = {
    COMFYUI: "comfy.model_management",
    "forge": "backend.memory_management",
    "neo": "backend.memory_management",
    "reforge": "ldm_patched.modules.model_management",
    "forge-classic": "ldm_patched.modules.model_management",
}


def get_free_memory(dev=None, torch_free_too=False):
    """``get_free_memory``: bytes free on ``dev``; tests set ``get_free_memory.free`` to force splits."""
    return get_free_memory.free


get_free_memory.free = 2**40


@dataclass(frozen=True)
class ModelSampling:
    """ComfyUI's ``model_sampling`` object, as far as guidance nodes use it: ``percent_to_sigma``."""

    sigma_max: float = 14.6
    sigma_min: float = 0.03

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        log_min = math.log(self.sigma_min)
        return math.exp((math.log(self.sigma_max) - log_min) * (1.0 - percent) + log_min)


class BaseModel:
    """``model_base.BaseModel`` / ``backend.modules.k_model.KModel``: x0 from an eps UNet."""

    model_sampling = ModelSampling()

    def __init__(self, unet: UNetModel, attn_precision: torch.dtype | None = None, activations_shape: bool = True):
        self.diffusion_model = unet
        self.attn_precision = attn_precision
        self.activations_shape = activations_shape  # reForge's blocks report it, classic/new Forge's do not
        self.calls: list[dict] = []
        self.rows: list[int] = []

    def apply_model(self, x, t, c_crossattn=None, y=None, control=None, transformer_options=None, **_):
        self.calls.append(transformer_options)
        self.rows.append(x.shape[0])
        if not self.activations_shape:
            transformer_options = _without_activations_shape(transformer_options)
        elif transformer_options and "block_modifiers" in transformer_options:  # reForge's UNet never calls them
            transformer_options = {k: v for k, v in transformer_options.items() if k != "block_modifiers"}
        sigma = t[:, None, None, None]
        eps = self.diffusion_model(
            x / (sigma**2 + 1.0) ** 0.5,
            t.log() * 100.0,
            c_crossattn,
            y,
            control=control,
            transformer_options=transformer_options,
        )
        return x - eps * sigma

    def memory_required(self, input_shape):
        """Bytes for a call of ``input_shape`` (the hosts scale an area estimate; here 1 MiB per row)."""
        return input_shape[0] * 2**20


class DitModel(BaseModel):
    """``KModel`` (Forge 2.x ``backend/modules/k_model.py:45``) / reForge ``model_base.BaseModel._apply_model``
    (``model_base.py:191``) running a DiT: every conditioning by keyword, ``context=`` for the text;
    flow matching (``t`` is sigma, x0 = x - sigma * v)."""

    def apply_model(self, x, t, c_crossattn=None, y=None, control=None, transformer_options=None, **extra):
        self.calls.append(transformer_options)
        self.rows.append(x.shape[0])
        v = self.diffusion_model(
            x, t, context=c_crossattn, y=y, control=control, transformer_options=transformer_options, **extra
        )
        return x - v * t[:, None, None, None]


class NeoKModel(BaseModel):
    """Neo's ``KModel`` over a UNet with one of its predictors (de2193d ``backend/modules/k_model.py:37-68``,
    ``backend/modules/k_prediction.py`` ``AbstractPrediction`` :58-99): ``xc = calculate_input(sigma, x)``,
    the UNet's output turned into x0 by ``calculate_denoised``.  ``prediction``: ``"epsilon"`` (SD1/SDXL),
    ``"v_prediction"`` (v-pred SDXL; zero-terminal-SNR models are v-pred with other sigmas), ``"const"``
    (rectified flow: input unscaled, ``x0 = x - sigma * v``).  ``memory_required`` is Neo's, ComfyUI
    v0.3.64's area formula, in bytes."""

    def __init__(self, unet, prediction="epsilon", memory_usage_factor=1.0, dtype_size=2, flash=True, **kwargs):
        super().__init__(unet, **kwargs)
        self.prediction, self.sigma_data = prediction, 1.0
        self.memory_usage_factor, self.dtype_size, self.flash = memory_usage_factor, dtype_size, flash

    def calculate_input(self, sigma, x):
        if self.prediction == "const":
            return x
        return x / (sigma[:, None, None, None] ** 2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, output, x):
        sigma = sigma[:, None, None, None]
        if self.prediction == "v_prediction":
            total = sigma**2 + self.sigma_data**2
            return x * self.sigma_data**2 / total - output * sigma * self.sigma_data / total**0.5
        return x - output * sigma

    def apply_model(self, x, t, c_crossattn=None, y=None, control=None, transformer_options=None, **_):
        self.calls.append(transformer_options)
        self.rows.append(x.shape[0])
        timestep = t * 1000.0 if self.prediction == "const" else t.log() * 100.0
        xc = self.calculate_input(t, x)
        options = transformer_options
        out = self.diffusion_model(xc, timestep, c_crossattn, y, control=control, transformer_options=options)
        return self.calculate_denoised(t, out, x)

    def memory_required(self, input_shape):
        area = input_shape[0] * math.prod(input_shape[2:])
        per_area = self.dtype_size * 0.01 if self.flash else 0.15
        return area * per_area * self.memory_usage_factor * 1024 * 1024


class UnetPatcher:
    def __init__(self, model: BaseModel):
        self.model = model
        self.model_options: dict[str, Any] = {"transformer_options": {}}

    def clone(self) -> UnetPatcher:
        clone = UnetPatcher(self.model)
        clone.model_options = copy.deepcopy(self.model_options)
        return clone

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        functions = self.model_options.get("sampler_post_cfg_function", [])
        self.model_options["sampler_post_cfg_function"] = [*functions, post_cfg_function]  # a new list, as hosts do
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def get_model_object(self, name: str) -> Any:
        return getattr(self.model, name)

    def set_model_patch(self, patch, name):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = [*patches.get(name, []), patch]  # a new list, as hosts do

    def set_model_input_block_patch(self, patch):
        self.set_model_patch(patch, "input_block_patch")

    def set_model_output_block_patch(self, patch):
        self.set_model_patch(patch, "output_block_patch")

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        options = self.model_options["transformer_options"]
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        options.setdefault("patches_replace", {}).setdefault("attn1", {})[key] = patch


def _hide_activations_shape(patch):
    def hidden(q, k, v, extra_options):
        return patch(q, k, v, {k_: v_ for k_, v_ in extra_options.items() if k_ != "activations_shape"})

    return hidden


def _pass_options(kind: str, model: BaseModel, model_options: dict, cond_or_uncond: list[int], sigma) -> dict:
    options = model_options.get("transformer_options", {}).copy()
    options["cond_or_uncond"] = cond_or_uncond[:]
    options["sigmas"] = sigma
    if kind in CALC_COND_BATCH:
        options["uuids"] = [f"uuid-{i}" for i in cond_or_uncond]
        options["attn_precision"] = model.attn_precision
        return options
    options["cond_mark"] = torch.tensor(cond_or_uncond, dtype=torch.float32)
    options["cond_indices"] = [i for i, c in enumerate(cond_or_uncond) if c == 0]
    options["uncond_indices"] = [i for i, c in enumerate(cond_or_uncond) if c == 1]
    return options


def _without_activations_shape(options: dict | None) -> dict | None:
    """Classic/new Forge blocks do not pass ``activations_shape``: hide it from every attn1 patch of
    the call, however the call's options were built (host batching or a model-function wrapper)."""
    replaces = (options or {}).get("patches_replace", {})
    if "attn1" not in replaces:
        return options
    attn1 = {key: _hide_activations_shape(patch) for key, patch in replaces["attn1"].items()}
    return {**options, "patches_replace": {**replaces, "attn1": attn1}}


def _area_and_mult(entry: dict, x_in: torch.Tensor):
    """``get_area_and_mult``: the entry's crop of x (``area`` = (h, w, y, x) in latent pixels) and its
    weight ``strength`` (edge feathering of partial areas is left out)."""
    height, width, top, left = entry.get("area", (x_in.shape[2], x_in.shape[3], 0, 0))
    crop = (slice(None), slice(None), slice(top, top + height), slice(left, left + width))
    x = x_in[crop]
    return x, crop, torch.ones_like(x) * entry.get("strength", 1.0)


def _calc(kind: str, model: BaseModel, conds: list, x_in, timestep, model_options) -> list[torch.Tensor]:
    """The hosts' batching loop: entries of equal crop size share a call, taken in reverse order, as
    many as ``model.memory_required(shape) (* 1.5 on reForge) < get_free_memory(device)`` allows;
    ``model_function_wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})`` when set."""
    outs = [torch.zeros_like(x_in) for _ in conds]
    counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = [(index, entry) for index, entries in enumerate(conds) if entries is not None for entry in entries]
    while to_run:
        first_shape = _area_and_mult(to_run[0][1], x_in)[0].shape
        same = [i for i, (_, entry) in enumerate(to_run) if _area_and_mult(entry, x_in)[0].shape == first_shape]
        same.reverse()
        chosen = same[:1]
        free = sys.modules[MEMORY_MODULE[kind]].get_free_memory(x_in.device)
        for i in range(1, len(same) + 1):
            amount = same[: len(same) // i]
            required = model.memory_required([len(amount) * first_shape[0], *first_shape[1:]])
            if required * (1.5 if kind in CALC_COND_BATCH else 1.0) < free:
                chosen = amount
                break
        batch = [to_run[i] for i in chosen]
        to_run = [item for i, item in enumerate(to_run) if i not in chosen]
        cond_or_uncond = [index for index, _ in batch]
        crops = [_area_and_mult(entry, x_in) for _, entry in batch]
        model_conds = [entry["model_conds"] for _, entry in batch]
        c = {"c_crossattn": torch.cat([m["c_crossattn"] for m in model_conds])}
        for key in ("y", "guidance"):  # guidance: Flux's distilled-guidance value, one per row
            if key in model_conds[0]:
                c[key] = torch.cat([m[key] for m in model_conds])
        c["transformer_options"] = _pass_options(kind, model, model_options, cond_or_uncond, timestep)
        x = torch.cat([crop[0] for crop in crops])
        t = torch.cat([timestep] * len(batch))
        control = batch[0][1].get("control")
        if control is not None:
            c["control"] = control.get_control(x, t, c, len(cond_or_uncond))
        wrapper = model_options.get("model_function_wrapper")
        if wrapper is not None:
            args = {"input": x, "timestep": t, "c": c, "cond_or_uncond": cond_or_uncond}
            output = wrapper(model.apply_model, args).chunk(len(batch))
        else:
            output = model.apply_model(x, t, **c).chunk(len(batch))
        for chunk, (index, _) in enumerate(batch):
            _, crop, mult = crops[chunk]
            outs[index][crop] += output[chunk] * mult
            counts[index][crop] += mult
    return [out / count for out, count in zip(outs, counts, strict=True)]


def make_calc_cond_uncond_batch(kind: str):
    def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
        calc_cond_uncond_batch.calls += 1
        return tuple(_calc(kind, model, [cond, uncond], x_in, timestep, model_options))

    calc_cond_uncond_batch.calls = 0
    return calc_cond_uncond_batch


def make_calc_cond_batch(kind: str):
    """reForge and ComfyUI: one output tensor per entry of ``conds``."""

    def calc_cond_batch(model, conds, x_in, timestep, model_options):
        calc_cond_batch.calls += 1
        return _calc(kind, model, list(conds), x_in, timestep, model_options)

    calc_cond_batch.calls = 0
    return calc_cond_batch


calc_cond_batch = make_calc_cond_batch("reforge")


def _post_cfg(model_options, args):
    denoised = args["denoised"]
    for function in model_options.get("sampler_post_cfg_function", []):
        denoised = function({**args, "denoised": denoised})
    return denoised


def make_sampling_function(kind: str, samplers: types.ModuleType):
    def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options):
        skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        uncond_ = None if skip else uncond
        if kind in CALC_COND_BATCH:
            cond_pred, uncond_pred = samplers.calc_cond_batch(model, [cond, uncond_], x, timestep, model_options)
        else:
            cond_pred, uncond_pred = samplers.calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
        args = {
            "denoised": uncond_pred + (cond_pred - uncond_pred) * cond_scale,
            "cond": cond,
            "uncond": uncond_ if kind in CALC_COND_BATCH else uncond,
            "model": model,
            "uncond_denoised": uncond_pred,
            "cond_denoised": cond_pred,
            "sigma": timestep,
            "model_options": model_options,
            "input": x,
        }
        if kind in CALC_COND_BATCH:
            args["cond_scale"] = cond_scale
        return _post_cfg(model_options, args)

    return sampling_function


def classic_optimized_attention(q, k, v, heads, mask=None):
    """Classic Forge: no ``attn_precision`` keyword (passing one is a TypeError there)."""
    return attention(q, k, v, heads)


def reforge_optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    reforge_optimized_attention.precisions.append(attn_precision)
    return attention(q, k, v, heads)


reforge_optimized_attention.precisions = []


def forge_attention_function(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    return attention(q, k, v, heads)


def _modules(*ready: types.ModuleType, **modules: dict[str, Any]) -> dict[str, types.ModuleType]:
    """``sys.modules`` entries: the ``ready`` modules, the named ones with their attributes, and (empty) every
    parent package of them, as importing a submodule makes its parents."""
    made = {module.__name__: module for module in ready}
    for name, attributes in modules.items():
        module = made[name] = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
    for name in list(made):
        parts = name.split(".")
        for end in range(1, len(parts)):
            parent = ".".join(parts[:end])
            made.setdefault(parent, types.ModuleType(parent))
    return made


def comfyui_optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, **_kwargs):
    comfyui_optimized_attention.precisions.append(attn_precision)
    return attention(q, k, v, heads)


comfyui_optimized_attention.precisions = []


def _sampling_module(name: str, kind: str, **batching: Any) -> types.ModuleType:
    """The host's sampling module ``name``: its ``batching`` functions and the ``sampling_function`` that calls them."""
    module = types.ModuleType(name)
    for attribute, function in batching.items():
        setattr(module, attribute, function)
    module.sampling_function = make_sampling_function(kind, module)
    return module


def host_modules(kind: str) -> dict[str, types.ModuleType]:
    """``sys.modules`` entries a host of ``kind`` has, with the functions the adapter resolves."""
    if kind == COMFYUI:
        return _modules(
            _sampling_module("comfy.samplers", kind, calc_cond_batch=make_calc_cond_batch(kind)),
            **{
                "comfy.ldm.modules.attention": {"optimized_attention": comfyui_optimized_attention},
                "comfy.model_management": {"get_free_memory": get_free_memory},
            },
        )
    batching = make_calc_cond_uncond_batch(kind)
    if kind in BACKEND:
        return _modules(
            _sampling_module("backend.sampling.sampling_function", kind, calc_cond_uncond_batch=batching),
            **{
                "backend.nn.unet": {"attention_function": forge_attention_function},
                "backend.attention": {"attention_function": forge_attention_function},
                "backend.patcher.unet": {"UnetPatcher": UnetPatcher},
                "backend.memory_management": {"get_free_memory": get_free_memory},
                "modules_forge.forge_version": {"version": "neo" if kind == "neo" else "f2.0.1v1.10.1"},
            },
        )
    samplers = _sampling_module("ldm_patched.modules.samplers", kind, calc_cond_uncond_batch=batching)
    attention_module = {
        "optimized_attention": reforge_optimized_attention if kind == "reforge" else classic_optimized_attention
    }
    modules = {
        "ldm_patched.ldm.modules.attention": attention_module,
        "modules_forge.unet_patcher": {"UnetPatcher": UnetPatcher},
        "ldm_patched.modules.model_management": {"get_free_memory": get_free_memory},
    }
    if kind == "reforge":
        calc_cond_batch.calls = 0
        samplers.calc_cond_batch = calc_cond_batch
        modules["ldm_patched.modules.patcher_extension"] = {}
    return _modules(samplers, **modules)


def install(monkeypatch, kind: str) -> dict[str, types.ModuleType]:
    """Put a host's modules in ``sys.modules`` for one test (``monkeypatch`` undoes it)."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("backend", "ldm_patched", "modules_forge", "comfy"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(get_free_memory, "free", 2**40)
    modules = host_modules(kind)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


class Control:
    """A ControlNet as the hosts' batching uses it: ``get_control(x, t, c, n_chunks)`` returns
    residuals per UNet part for every row of the call (here: middle block, one value per row and
    channel, depending on that row's latent and sigma)."""

    def __init__(self, channels: int, seed: int = 5):
        self.weight = torch.randn(channels, generator=torch.Generator().manual_seed(seed))
        self.calls: list[int] = []

    def get_control(self, x, t, c, n_chunks):
        self.calls.append(x.shape[0])
        per_row = x.flatten(1).mean(1) + t.log()
        residual = (per_row[:, None] * self.weight.to(x)).reshape(x.shape[0], -1, 1, 1)
        return {"input": [], "middle": [residual], "output": []}


@dataclass
class ForgeObjects:
    unet: UnetPatcher

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet)


class CFGDenoiser:
    """``CFGDenoiser.forward``'s Forge part: re-read the unet patcher, sample, count the call."""

    def __init__(self, kind: str, p: Any):
        self.kind, self.p = kind, p
        self.step, self.total_steps = 0, None

    def __call__(self, x, sigma, cond, uncond, cond_scale):
        unet = self.p.sd_model.forge_objects.unet
        if self.kind in BACKEND and cond_scale == 1.0:
            uncond = None  # new Forge's and Neo's processing drop uc at CFG 1
        samplers = sys.modules[
            "backend.sampling.sampling_function" if self.kind in BACKEND else "ldm_patched.modules.samplers"
        ]
        denoised = samplers.sampling_function(unet.model, x, sigma, uncond, cond, cond_scale, unet.model_options)
        self.step += 1
        return denoised


@dataclass
class Sampler:
    model_wrap_cfg: CFGDenoiser

    def sample(self, x, sigmas, cond, uncond, cond_scale) -> list[torch.Tensor]:
        """Denoiser outputs at each step's sigma (x kept fixed, so steps are comparable one by one)."""
        self.model_wrap_cfg.step = 0  # initialize()
        self.model_wrap_cfg.total_steps = len(sigmas) - 1  # launch_sampling(), first-order sampler
        return [self.model_wrap_cfg(x, sigma.expand(x.shape[0]), cond, uncond, cond_scale) for sigma in sigmas[:-1]]


@dataclass
class Processing:
    """``p`` as ``process_before_every_sampling`` sees it."""

    sd_model: Any
    sampler: Sampler | None = None
    is_hr_pass: bool = False
    forge_objects_original: ForgeObjects | None = field(default=None)

    def reset_forge_objects(self) -> None:
        """``p.sd_model.forge_objects = forge_objects_original.shallow_copy()`` (per batch / hires)."""
        self.sd_model.forge_objects = self.forge_objects_original.shallow_copy()


def make_processing(kind: str, unet: torch.nn.Module, attn_precision=None, model: BaseModel | None = None):
    """``p`` with a patcher over ``unet``: a UNet, or a DiT (tests/support/dit_models.py) run as KModel runs it;
    ``model``: a ready model object instead (e.g. :class:`NeoKModel` with a predictor)."""
    model_class = BaseModel if hasattr(unet, "input_blocks") else DitModel
    patcher = UnetPatcher(model or model_class(unet, attn_precision, activations_shape=kind == "reforge"))
    objects = ForgeObjects(patcher)
    p = Processing(types.SimpleNamespace(forge_objects=objects.shallow_copy()), forge_objects_original=objects)
    p.sampler = Sampler(CFGDenoiser(kind, p))
    return p


def make_inputs(config, images=2, height=13, width=9, tokens=5, entries=1, strengths=(1.0,), seed=0):
    """A step's ``(x, cond, uncond)`` as the hosts' sampler gets them, float64: ``entries`` cond entries (an AND
    prompt's parts, or area conds) with strengths cycling through ``strengths``, one uncond entry; each entry's
    ``model_conds`` hold ``c_crossattn`` (``tokens`` tokens) and, where the UNet takes one, the pooled ``y``."""
    g = torch.Generator().manual_seed(seed)

    def entry(strength: float) -> dict:
        conds = {"c_crossattn": torch.randn(images, tokens, config.context_dim, generator=g, dtype=torch.float64)}
        if config.adm_in_channels:
            conds["y"] = torch.randn(images, config.adm_in_channels, generator=g, dtype=torch.float64)
        return {"model_conds": conds, "strength": strength}

    x = torch.randn(images, 4, height, width, generator=g, dtype=torch.float64)
    return x, [entry(strengths[i % len(strengths)]) for i in range(entries)], [entry(1.0)]


def small_card(monkeypatch, max_rows: int = 4) -> None:
    """``BaseModel.apply_model`` on a card that holds ``max_rows`` rows: a larger call records its rows and raises
    CUDA's out-of-memory error (the host's estimate said it fits, the card disagreed)."""
    apply_model = BaseModel.apply_model

    def apply(self, x, *args, **kwargs):
        if x.shape[0] > max_rows:
            self.rows.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return apply_model(self, x, *args, **kwargs)

    monkeypatch.setattr(BaseModel, "apply_model", apply)


def deep_shrink(patcher: UnetPatcher, block_number: int, factor: float) -> UnetPatcher:
    """Kohya HRFix / Deep Shrink as the Forge family's built-in applies it (new Forge dfdcbab
    ``extensions-builtin/sd_forge_kohya_hrfix/scripts/kohya_hrfix.py``: a clone with an
    ``input_block_patch`` that resizes input block ``block_number``'s output to
    ``round(side / factor)`` per axis, and an ``output_block_patch`` that resizes ``h`` back to the
    skip's size when they differ).  Always on here (the built-in has a sigma window), bicubic both
    ways (its default methods)."""

    def input_block_patch(h, transformer_options):
        if transformer_options["block"][1] == block_number:
            size = (round(h.shape[-2] / factor), round(h.shape[-1] / factor))
            h = torch.nn.functional.interpolate(h, size=size, mode="bicubic", align_corners=False)
        return h

    def output_block_patch(h, hsp, transformer_options):
        if h.shape[-2:] != hsp.shape[-2:]:
            h = torch.nn.functional.interpolate(h, size=hsp.shape[-2:], mode="bicubic", align_corners=False)
        return h, hsp

    clone = patcher.clone()
    clone.set_model_input_block_patch(input_block_patch)
    clone.set_model_output_block_patch(output_block_patch)
    return clone
