"""ComfyUI adapter: what the "Smoothed Energy Guidance" node does to a MODEL (a ``comfy.model_patcher.ModelPatcher``).

ComfyUI is the original of the Forge family's backend, so SEG runs there on the same pass
(:class:`lib_seg.forge.seg_pass.SegPass`) and the same step (:mod:`lib_seg.step`); this module only translates
(interfaces read at hiddenswitch/pip-and-uv-installable-ComfyUI 87606c5f, upstream master merged 2026-02-03):

* The node clones the patcher and registers one post-CFG function on the clone
  (``set_model_sampler_post_cfg_function``) and, when no other node set one, the ``model_function_wrapper`` that
  lets the SEG rows ride in the main model call (``comfy.samplers._calc_cond_batch`` calls it with ``input``,
  ``timestep``, ``c``, ``cond_or_uncond``).  The patcher's own dicts are never changed and nothing global is
  patched: a later prompt without the node samples exactly as if SEG never ran, and the cached model is untouched.
* The post-CFG function gets ``cond_denoised`` even at CFG 1, where ComfyUI skips the uncond pass, so SEG does not
  ask for ``disable_cfg1_optimization``: at CFG 1 a step costs the cond pass plus SEG's rows, never an uncond pass.
* ``start_percent`` / ``end_percent`` become a sigma range through the model's ``percent_to_sigma``, as ComfyUI's
  own guidance nodes (PAG's successors, SkipLayerGuidanceDiT) convert theirs: SEG runs while
  ``sigma_end <= sigma <= sigma_start``.
* UNets are blurred by attn1 replace patches (ComfyUI hands them ``activations_shape``, the exact token grid);
  diffusion transformers by the family hooks of :mod:`lib_seg.dit`.  A model SEG does not know is returned
  untouched with one warning naming its class.
* Settings are checked when the node runs: a bad value fails the node with a message naming the input.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from lib_seg import step, targets
from lib_seg.core.params import SegParams, parse_number
from lib_seg.forge import host as forge_host
from lib_seg.forge.adapter import seg_functions
from lib_seg.forge.patches import PatchedUnet
from lib_seg.forge.seg_pass import SegPass, SigmaClock

log = logging.getLogger("sd_webui_seg")
KIND = forge_host.COMFYUI


def diffusion_model(patcher: Any) -> Any:
    return getattr(getattr(patcher, "model", None), "diffusion_model", None)


def query_target(patcher: Any) -> targets.QueryTarget | None:
    """The UNet (attn1 patches) or DiT of a family SEG knows that the patcher's model runs, else None."""
    return targets.query_target(diffusion_model(patcher), partial(PatchedUnet, kind=KIND))


def settings(
    scale: float, blur_sigma: float, infinite_blur: bool, layers: str, start_percent: float, end_percent: float
) -> SegParams:
    """The node's inputs as checked settings; a ``ValueError`` names the input and its allowed range."""
    start = parse_number("start_percent", start_percent, 0.0, 1.0)
    end = parse_number("end_percent", end_percent, 0.0, 1.0)
    if start > end:
        raise ValueError(f"SEG start_percent ({start:g}) must not be after end_percent ({end:g})")
    sigma = "inf" if infinite_blur else blur_sigma
    return SegParams(enabled=True, scale=scale, blur_sigma=sigma, layers=layers, start=start, end=end)


def sigma_window(patcher: Any, start: float, end: float) -> SigmaClock:
    """The noise levels between ``start`` and ``end`` percent of the model's schedule (ComfyUI's convention)."""
    sampling = patcher.get_model_object("model_sampling")
    return SigmaClock(float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end)))


def patch_model(patcher: Any, params: SegParams, batch_rows: bool = True, prefix_reuse: bool = True) -> Any:
    """A clone of ``patcher`` that samples with SEG, or ``patcher`` itself where SEG has nothing to do.

    Scale 0 returns the model as it is (bit-identical to no node).  Layers the model lacks raise ``ValueError``
    listing the blocks it has.  Used twice on one model (say on different layers), each node adds its own
    post-CFG function; only the first batches its rows into the main call, the second makes its own call.
    """
    setting = params.for_pass(False)
    if setting is None:
        return patcher
    target = query_target(patcher)
    if target is None:
        name = type(diffusion_model(patcher)).__name__
        log.warning("SEG: %s is a model SEG does not support yet; the model is left untouched", name)
        return patcher
    seg = step.prepare(target, params.layers, setting, batch_rows=batch_rows, prefix_reuse=prefix_reuse)
    clock = sigma_window(patcher, params.start, params.end)
    post_cfg, wrapper = seg_functions(SegPass(KIND, seg, clock))
    clone = patcher.clone()
    clone.set_model_sampler_post_cfg_function(post_cfg)
    if wrapper is not None and "model_function_wrapper" not in clone.model_options:
        clone.set_model_unet_function_wrapper(wrapper)
    return clone


def layer_text(patcher: Any, spec: str) -> str:
    """The canonical block list ``spec`` selects on this model (for the node's description of what ran)."""
    target = query_target(patcher)
    return spec if target is None else target.canonical(spec)
