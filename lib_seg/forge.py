"""Forge-family adapter: classic Forge (ldm_patched), new Forge (backend/) and reForge.

How SEG runs there (interfaces read from classic Forge 4a9c8f32, new Forge dfdcbab and reForge 3b56b26;
the files are cited in ``tests/support/forge_host.py``; host modules are resolved via :mod:`.forge_host`):

* ``process_before_every_sampling`` calls :func:`patch_unet`.  It clones
  ``p.sd_model.forge_objects.unet`` (a UnetPatcher), registers one post-CFG function on the clone
  and assigns the clone back, as the hosts' built-in PAG does.  Forge resets ``forge_objects`` per
  batch and between the two hires hook calls; we also drop any SEG function already on the patcher,
  so a host that does not reset still ends up with exactly one.
* The post-CFG function runs one extra cond-only pass through the host's own batching function with
  a per-call ``model_options`` copy whose ``patches_replace["attn1"]`` blurs the queries of the chosen
  layers, and returns ``denoised + seg_scale * (cond_denoised - cond_seg)``.  It only needs the cond
  prediction, so it works when CFG 1 skipped the uncond pass.  The patcher's dict is never mutated.
* Errors (bad settings, layers the model lacks) are raised from inside the post-CFG function: the
  hosts only log exceptions from script hooks, but one raised during sampling fails the request.

Window progress: the hosts' webui path calls post-CFG functions from ``CFGDenoiser.forward`` and
sets no ``sample_sigmas`` (only reForge's ComfyUI ``CFGGuider`` does, which the webui does not use).
So progress is the host's own denoiser counter ``p.sampler.model_wrap_cfg.step / total_steps``
(reset in ``initialize``, ``total_steps`` set in ``launch_sampling``, incremented after each call in
all three hosts): the same counter the A1111 adapter and the hosts' skip-early-CFG and refiner switch
use, so a window means the same on every host.  ``transformer_options["sample_sigmas"]`` is the
fallback when no counter is available.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import blur, forge_host, geometry, guidance, layers, query_hooks, schedule
from .params import SegParams

log = logging.getLogger("sd_webui_seg")

SEG_MARK = "_sd_webui_seg_post_cfg"
Patch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]
SkipCallback = query_hooks.SkipCallback


def host_kind() -> str | None:
    """``"forge"`` (new backend/), ``"reforge"``, ``"forge-classic"``, or None outside these hosts."""
    return forge_host.host_kind()


def unet_patcher(p: Any) -> Any | None:
    return getattr(getattr(getattr(p, "sd_model", None), "forge_objects", None), "unet", None)


diffusion_model = query_hooks.ldm_unet
available_layers = layers.unet_layers


def with_attn1_replaces(model_options: Mapping, patches: Mapping[tuple, Patch]) -> dict:
    """A copy of ``model_options`` with ``patches`` added to ``patches_replace["attn1"]``.

    Copy-on-write along the path only (outer dict, transformer_options, patches_replace, attn1):
    the patcher's own dicts, shared by every later step and pass, stay untouched.
    """
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options") or {})
    replaces = dict(transformer_options.get("patches_replace") or {})
    replaces["attn1"] = {**(replaces.get("attn1") or {}), **patches}
    transformer_options["patches_replace"] = replaces
    options["transformer_options"] = transformer_options
    return options


def token_grid(n_tokens: int, extra_options: Mapping) -> tuple[int, int] | None:
    """(h, w) of the tokens an attn1 patch sees, or None when no grid fits ``n_tokens``.

    reForge passes the exact ``activations_shape`` entering the SpatialTransformer; classic and new
    Forge only the latent's ``original_shape``, from which the UNet's ceil-halving chain is walked.
    Token merging or Deep Shrink change the count, and then nothing matches.
    """
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) >= 2:
        height, width = int(shape[-2]), int(shape[-1])
        return (height, width) if height * width == n_tokens else None
    original = extra_options.get("original_shape")
    if original is None or len(original) < 2:
        return None
    return geometry.token_grid(n_tokens, int(original[-2]), int(original[-1]))


def blur_for_layer(
    q: torch.Tensor, sigma: float, extra_options: Mapping, key: layers.LayerKey, on_skip: SkipCallback
) -> torch.Tensor:
    """Blurred queries; infinite blur is the token mean and needs no grid, a finite one does."""
    n_tokens = q.shape[1]
    grid = token_grid(n_tokens, extra_options)
    if grid is None and blur.is_infinite_sigma(sigma):
        grid = (1, n_tokens)
    if grid is None:
        on_skip(key, n_tokens)
        return q
    return blur.blur_queries(q, grid[0], grid[1], sigma)


def attn1_patch(kind: str, key: layers.LayerKey, sigma: float, on_skip: SkipCallback, inner: Patch | None = None):
    """``patches_replace["attn1"]`` entry: blur q, then the attention (``inner`` patch or the host's)."""

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        q = blur_for_layer(q, sigma, extra_options, key, on_skip)
        if inner is not None:
            return inner(q, k, v, extra_options)
        return forge_host.run_attention(kind, q, k, v, extra_options)

    return patch


def sampling_progress(denoiser: Any, transformer_options: Mapping, sigma: torch.Tensor) -> float | None:
    """Progress of this denoiser call (see the module docstring), or None if the host tells nothing."""
    step, total = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return schedule.progress(step, total)
    sample_sigmas = transformer_options.get("sample_sigmas")
    if sample_sigmas is not None:
        return schedule.progress_from_sigma(float(sigma.flatten()[0]), sample_sigmas)
    return None


skip_warner = query_hooks.skip_warner


def _mark(function: Callable) -> Callable:
    setattr(function, SEG_MARK, True)
    return function


def seg_post_cfg(
    kind: str,
    keys: tuple[layers.LayerKey, ...],
    seg_scale: float,
    sigma: float,
    window: tuple[float, float],
    denoiser: Any,
) -> Callable[[dict], torch.Tensor]:
    """The post-CFG function: validated settings in a closure, attn1 patches built once here.

    An attn1 replace already registered for a key (StyleAlign, Reference-only, SAG) is called with
    the blurred queries instead of the host attention, so the SEG pass keeps that extension's effect
    and the guidance holds only the blur.
    """
    on_skip = skip_warner()
    patches = {tuple(key): attn1_patch(kind, key, sigma, on_skip) for key in keys}
    start, end = window
    whole_run = start <= 0.0 and end >= 1.0

    def post_cfg(args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        options = args["model_options"]
        if not whole_run:
            fraction = sampling_progress(denoiser, options.get("transformer_options") or {}, args["sigma"])
            if fraction is None:
                raise RuntimeError("SEG: this host does not tell the sampling progress; set start 0 and end 1")
            if not schedule.in_window(fraction, start, end):
                return denoised
        existing = ((options.get("transformer_options") or {}).get("patches_replace") or {}).get("attn1") or {}
        step_patches = {}
        for key, patch in patches.items():
            inner = existing.get(key) or existing.get(key[:2])
            step_patches[key] = patch if inner is None else attn1_patch(kind, key, sigma, on_skip, inner)
        seg_options = with_attn1_replaces(options, step_patches)
        cond_seg = forge_host.cond_only_pass(
            kind, args["model"], args["cond"], args["input"], args["sigma"], seg_options
        )
        return guidance.apply_seg(denoised, args["cond_denoised"], cond_seg, seg_scale)

    return _mark(post_cfg)


def raising_post_cfg(error: Exception) -> Callable[[dict], torch.Tensor]:
    """A post-CFG function that fails sampling with ``error`` (hook exceptions are only logged)."""

    def post_cfg(args: dict) -> torch.Tensor:
        raise error

    return _mark(post_cfg)


def has_seg(patcher: Any) -> bool:
    return any(getattr(f, SEG_MARK, False) for f in patcher.model_options.get("sampler_post_cfg_function", ()))


def _install(p: Any, patcher: Any, post_cfg: Callable | None) -> None:
    """Clone, drop earlier SEG functions, add ``post_cfg`` (if any), assign the clone back."""
    clone = patcher.clone()
    functions = clone.model_options.get("sampler_post_cfg_function", [])
    clone.model_options["sampler_post_cfg_function"] = [f for f in functions if not getattr(f, SEG_MARK, False)]
    if post_cfg is not None:
        clone.set_model_sampler_post_cfg_function(post_cfg)
    p.sd_model.forge_objects.unet = clone


def _switch_off(p: Any, patcher: Any) -> None:
    """Leave the patcher alone unless an earlier call (without a host reset) left SEG on it."""
    if patcher is not None and has_seg(patcher):
        _install(p, patcher, None)


def patch_unet(p: Any, params: SegParams | None, error: Exception | None = None) -> str | None:
    """Install SEG for the coming sampling pass of ``p``; return the canonical layer text, or None.

    ``error``: install a post-CFG function that raises it, so the request fails with its message.
    SEG off for this pass (disabled, scale 0, hires mode off): nothing is installed.  A model
    without a UNet (Flux, Chroma, SD3) is left untouched with a warning.  Layers the UNet lacks are
    raised during sampling, with the list of layers it has.  Calling this again for the same pass
    replaces, never stacks, the SEG function.
    """
    patcher = unet_patcher(p)
    if error is not None:
        if patcher is None:
            raise error
        _install(p, patcher, raising_post_cfg(error))
        return None
    setting = params.for_pass(bool(getattr(p, "is_hr_pass", False))) if params is not None else None
    if setting is None:
        _switch_off(p, patcher)
        return None
    kind = host_kind()
    if patcher is None or kind is None:
        log.warning("SEG: no Forge, reForge or classic Forge UnetPatcher found; SEG is off")
        return None
    model = diffusion_model(patcher)
    if model is None:
        name = type(getattr(getattr(patcher, "model", None), "diffusion_model", None)).__name__
        log.warning("SEG: the loaded model (%s) is not a UNet with self-attention blocks; SEG is off for it", name)
        _switch_off(p, patcher)
        return None
    available = available_layers(model)
    try:
        keys = layers.resolve_layers(params.layers, available)
        text = layers.canonical_spec(params.layers, available)
    except ValueError as exc:
        _install(p, patcher, raising_post_cfg(exc))
        return None
    seg_scale, sigma = setting
    denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    _install(p, patcher, seg_post_cfg(kind, keys, seg_scale, sigma, (params.start, params.end), denoiser))
    return text
