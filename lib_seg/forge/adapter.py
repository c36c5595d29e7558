"""Forge-family adapter: classic Forge and Forge Classic (ldm_patched), new Forge and Forge Neo (backend/), reForge.

How SEG runs there (interfaces read from classic Forge 4a9c8f32, new Forge dfdcbab, Neo de2193d and reForge 3b56b26;
the files are cited in ``tests/support/forge_host.py``; host modules are resolved via :mod:`lib_seg.forge.host`):

* ``process_before_every_sampling`` calls :func:`patch_unet`.  It clones
  ``p.sd_model.forge_objects.unet`` (a UnetPatcher), registers one post-CFG function on the clone
  and assigns the clone back, as the hosts' built-in PAG does.  Forge resets ``forge_objects`` per
  batch and between the two hires hook calls; we also drop any SEG function already on the patcher,
  so a host that does not reset still ends up with exactly one.
* The post-CFG function needs ``cond_seg``, the conditional prediction with the queries of the chosen
  layers blurred.  Batched (the default, :mod:`lib_seg.forge.rows`): a ``model_function_wrapper`` appends
  the SEG rows to the first UNet call of the step when the host's memory estimate allows, and the
  post-CFG function replays those rows through the host's own batching.  Otherwise it runs one extra
  cond-only pass through the host's batching with a per-call ``model_options`` copy whose
  ``patches_replace["attn1"]`` blurs the queries.  Both give the same ``cond_seg``; the guided result
  is ``denoised + seg_scale * (cond_denoised - cond_seg)``.  Only the cond prediction is needed, so it
  works when CFG 1 skipped the uncond pass.  The patcher's dicts are never mutated.
* The token grid of each layer comes from the host where it tells it (reForge's
  ``activations_shape``); on classic and new Forge a block modifier records the map entering each
  block (:func:`lib_seg.forge.patches.record_block_grid`), so Deep Shrink's resized maps are blurred exactly.
* Flux, Chroma and SD3.5 (Forge 2.x; reForge's ``ldm_patched`` modules) take the same two paths with
  module hooks on the transformer's blocks instead of attn1 patches (:mod:`lib_seg.dit.hooks`; Forge
  2.x's Flux drops ``transformer_options``, so no patch could reach its blocks).
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
from functools import partial
from typing import Any

import torch

from lib_seg import step, targets
from lib_seg.core.params import SegParams
from lib_seg.forge import host as forge_host
from lib_seg.forge.patches import (
    PatchedUnet,
    attn1_patch,
    blur_for_layer,
    record_block_grid,
    sampling_progress,
    set_block_grid_recorder,
    token_grid,
    with_replaces,
)
from lib_seg.forge.seg_pass import SEG_MARK, DenoiserClock, SegPass
from lib_seg.unet import hooks as unet_hooks

__all__ = [
    "attn1_patch",
    "blur_for_layer",
    "patch_unet",
    "record_block_grid",
    "sampling_progress",
    "token_grid",
    "with_replaces",
]

log = logging.getLogger("sd_webui_seg")


def host_kind() -> str | None:
    """``"neo"``, ``"forge"`` (new backend/), ``"reforge"``, ``"forge-classic"``, or None outside these hosts."""
    return forge_host.host_kind()


def unet_patcher(p: Any) -> Any | None:
    return getattr(getattr(getattr(p, "sd_model", None), "forge_objects", None), "unet", None)


def query_target(patcher: Any, kind: str) -> targets.QueryTarget | None:
    """The UNet (blurred by attn1 patches) or the diffusion transformer of a known family the patcher's model
    runs (None: SEG cannot run)."""
    model = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    return targets.query_target(model, partial(PatchedUnet, kind=kind))


def available_layers(model: Any) -> tuple:
    """Every layer (UNet attn1) or block (DiT) SEG could blur in ``model``."""
    return targets.query_target(model).available


skip_warner = unet_hooks.skip_warner


def _mark(function: Callable) -> Callable:
    setattr(function, SEG_MARK, True)
    return function


def raising_post_cfg(error: Exception) -> Callable[[dict], torch.Tensor]:
    """A post-CFG function that fails sampling with ``error`` (hook exceptions are only logged)."""

    def post_cfg(args: dict) -> torch.Tensor:
        raise error

    return _mark(post_cfg)


def seg_functions(seg: SegPass) -> tuple[Callable, Callable | None]:
    """The post-CFG function and (when rows may be batched) the model-function wrapper of ``seg``."""

    def post_cfg(args: dict) -> torch.Tensor:
        return seg.post_cfg(args)

    def model_function_wrapper(apply_model: Callable, args: Mapping) -> torch.Tensor:
        return seg.model_wrapper(apply_model, args)

    return _mark(post_cfg), (_mark(model_function_wrapper) if seg.seg.batch_rows else None)


def has_seg(patcher: Any) -> bool:
    functions = patcher.model_options.get("sampler_post_cfg_function", ())
    wrapper = patcher.model_options.get("model_function_wrapper")
    return any(getattr(f, SEG_MARK, False) for f in (*functions, wrapper))


def _install(
    p: Any, patcher: Any, post_cfg: Callable | None, wrapper: Callable | None = None, record_grid: bool = False
) -> None:
    """Clone, drop earlier SEG functions, add ``post_cfg`` (if any), assign the clone back.

    ``wrapper`` becomes the patcher's ``model_function_wrapper`` only when no other extension set
    one (the hosts keep a single wrapper); without it every step makes the separate pass.
    ``record_grid``: add the block modifier that gives attn1 patches the exact token grid.
    """
    clone = patcher.clone()
    options = clone.model_options
    options["sampler_post_cfg_function"] = [
        f for f in options.get("sampler_post_cfg_function", []) if not getattr(f, SEG_MARK, False)
    ]
    if getattr(options.get("model_function_wrapper"), SEG_MARK, False):
        del options["model_function_wrapper"]
    set_block_grid_recorder(options.setdefault("transformer_options", {}), record_grid)
    if post_cfg is not None:
        clone.set_model_sampler_post_cfg_function(post_cfg)
    if wrapper is not None and "model_function_wrapper" not in options:
        clone.set_model_unet_function_wrapper(wrapper)
    p.sd_model.forge_objects.unet = clone


def _switch_off(p: Any, patcher: Any) -> None:
    """Leave the patcher alone unless an earlier call (without a host reset) left SEG on it."""
    if patcher is not None and has_seg(patcher):
        _install(p, patcher, None)


def patch_unet(
    p: Any, params: SegParams | None, error: Exception | None = None, batch_rows: bool = True, prefix_reuse: bool = True
) -> str | None:
    """Install SEG for the coming sampling pass of ``p``; return the canonical layer text, or None.

    ``error``: install a post-CFG function that raises it, so the request fails with its message.
    SEG off for this pass (disabled, scale 0, hires mode off): nothing is installed.  Flux, Chroma
    and SD3 get the DiT path (:class:`lib_seg.forge.seg_pass.SegPass` with ``dit``); any other model without a
    UNet is left untouched with a warning.  Layers the UNet lacks are
    raised during sampling, with the list of layers it has.  Calling this again for the same pass
    replaces, never stacks, the SEG function.  ``batch_rows``: let the SEG rows ride in the main UNet
    call when the host's memory estimate allows (the setting "Run the SEG rows inside the main UNet call");
    ``prefix_reuse``: compute the UNet blocks before the first blurred one once for those rows.
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
    target = query_target(patcher, kind)
    if target is None:
        name = type(getattr(getattr(patcher, "model", None), "diffusion_model", None)).__name__
        log.warning(
            "SEG: the loaded model (%s) is neither a UNet nor a diffusion transformer SEG knows; SEG is off for it",
            name,
        )
        _switch_off(p, patcher)
        return None
    try:
        seg = step.prepare(
            target, params.layers, setting, (params.start, params.end), batch_rows=batch_rows, prefix_reuse=prefix_reuse
        )
        text = target.canonical(params.layers)
    except ValueError as exc:
        _install(p, patcher, raising_post_cfg(exc))
        return None
    denoiser = getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)
    _install(
        p,
        patcher,
        *seg_functions(SegPass(kind, seg, DenoiserClock(denoiser))),
        record_grid=target.records_block_grid,
    )
    return text
