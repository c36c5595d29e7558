"""Which Forge-family host runs us, and its functions, resolved at call time.

The hosts (classic Forge 4a9c8f32 and Haoming02's Forge Classic 1f95d71, new Forge dfdcbab, Forge Neo 2.26
de2193d, reForge 3b56b26) share the UnetPatcher contract but keep their sampling and attention functions
in different modules:

============== ===================================================== ==============================================
host           cond-only model pass                                  attention used by the UNet's attn1
============== ===================================================== ==============================================
``forge``      ``backend.sampling.sampling_function``                ``backend.nn.unet.attention_function`` (the
(new, 2.x),    ``.calc_cond_uncond_batch(model, cond, None, ...)``   UNet's import-time binding; ``backend.attention``
``neo``                                                              as fallback)
``reforge``    ``ldm_patched.modules.samplers.calc_cond_batch``      ``ldm_patched.ldm.modules.attention``
               ``(model, [cond], ...)`` (the 2-way function is a     ``.optimized_attention`` (takes ``attn_precision``)
               deprecated wrapper there)
``forge-       ``ldm_patched.modules.samplers.calc_cond_uncond_batch``  same module attribute, no ``attn_precision``
classic``
============== ===================================================== ==============================================

Forge Neo kept Forge 2.x's ``backend`` names for everything the adapter touches (read at de2193d:
``backend/sampling/sampling_function.py`` ``calc_cond_uncond_batch`` and the ``model_function_wrapper`` /
``sampler_post_cfg_function`` calls, ``backend/patcher/base.py`` ``clone`` and the ``set_model_*``
setters, ``backend/nn/unet.py`` attn1 replace with projected q/k/v and ``block_modifiers``,
``backend/memory_management.py`` ``get_free_memory``, ``backend/modules/k_model.py``
``KModel.memory_required``); it is told apart by ``modules_forge.forge_version.version == "neo"``, so
logs and the README can name it and a later difference has one place to go.  Haoming02's Forge Classic
is classic Forge's ``ldm_patched`` layout and is detected as ``forge-classic``.

Nothing is imported at module level and nothing is cached: every lookup goes through
``importlib.import_module`` (a ``sys.modules`` hit in a running host) and reads the module attribute
when it is needed, so another extension that swaps the attention function later is honoured, and
tests can install imitation modules in ``sys.modules``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

FORGE, NEO, REFORGE, FORGE_CLASSIC, COMFYUI = "forge", "neo", "reforge", "forge-classic", "comfyui"
KINDS = (FORGE, NEO, REFORGE, FORGE_CLASSIC, COMFYUI)
BACKEND_KINDS = (FORGE, NEO)  # the ``backend/`` layout (no ldm_patched)
# ComfyUI itself: the original of all of them (``comfy.samplers.calc_cond_batch``, ``comfy.model_management``,
# ``comfy.ldm.modules.attention.optimized_attention``; read at hiddenswitch/pip-and-uv-installable-ComfyUI
# 87606c5f, upstream master merged 2026-02-03); the ComfyUI adapter names it, it is never detected.
SAMPLERS = {REFORGE: "ldm_patched.modules.samplers", COMFYUI: "comfy.samplers"}  # with calc_cond_batch
MEMORY = {FORGE: "backend.memory_management", NEO: "backend.memory_management", COMFYUI: "comfy.model_management"}


def _module(name: str) -> ModuleType | None:
    """The host module ``name``, or None when this process has no such module (or it fails to import)."""
    try:
        return importlib.import_module(name)
    except Exception:  # a missing or broken host module both mean "not this host"
        return None


def host_kind() -> str | None:
    """``"neo"`` / ``"forge"`` (backend/), ``"reforge"``, ``"forge-classic"`` (ldm_patched), or None.

    Capabilities are tested from the newest layout to the oldest: new Forge and Neo deleted ``ldm_patched`` (Neo names
    itself in ``modules_forge.forge_version``); reForge's ``ldm_patched`` is a recent ComfyUI sync with
    ``calc_cond_batch``; classic Forge has only the two-way ``calc_cond_uncond_batch`` plus
    ``modules_forge.unet_patcher``.
    """
    if _module("backend.sampling.sampling_function") is not None:
        version = getattr(_module("modules_forge.forge_version"), "version", None)
        return NEO if version == "neo" else FORGE
    samplers = _module("ldm_patched.modules.samplers")
    if samplers is None:
        return None
    if hasattr(samplers, "calc_cond_batch") or _module("ldm_patched.modules.patcher_extension") is not None:
        return REFORGE
    if hasattr(samplers, "calc_cond_uncond_batch") and _module("modules_forge.unet_patcher") is not None:
        return FORGE_CLASSIC
    return None


def _require(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"SEG: unknown Forge host kind {kind!r}; known: {', '.join(KINDS)}")


def _attribute(module_names: tuple[str, ...], attribute: str) -> Any:
    for name in module_names:
        value = getattr(_module(name), attribute, None)
        if value is not None:
            return value
    raise RuntimeError(f"SEG: the host has no {attribute} in {' or '.join(module_names)}")


def attention_function(kind: str) -> Callable[..., torch.Tensor]:
    """The attention the host's UNet itself uses for attn1, looked up now (not at import)."""
    _require(kind)
    if kind in BACKEND_KINDS:
        return _attribute(("backend.nn.unet", "backend.attention"), "attention_function")
    if kind == COMFYUI:
        return _attribute(("comfy.ldm.modules.attention",), "optimized_attention")
    return _attribute(("ldm_patched.ldm.modules.attention",), "optimized_attention")


def run_attention(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """Host attention on projected (B, N, heads*dim_head) q/k/v, as the host's CrossAttention calls it.

    Only reForge and ComfyUI put ``attn_precision`` in ``extra_options`` (fp32 upcast for SD2.x); classic
    Forge's ``optimized_attention`` raises TypeError on that keyword, so it is passed only when present.
    """
    kwargs = {"attn_precision": extra_options["attn_precision"]} if "attn_precision" in extra_options else {}
    return attention_function(kind)(q, k, v, extra_options["n_heads"], **kwargs)


def cond_only_pass(
    kind: str, model: Any, cond: Any, x: torch.Tensor, sigma: torch.Tensor, model_options: dict
) -> torch.Tensor:
    """The conditional prediction for ``cond`` with ``model_options``, through the host's batching.

    Going through the host's own function keeps area/mask conds, AND-prompt strengths, ControlNet and
    ``model_function_wrapper`` exactly as in the main cond pass, so only our attn1 patches differ.
    """
    _require(kind)
    if kind in SAMPLERS:
        calc = _attribute((SAMPLERS[kind],), "calc_cond_batch")
        return calc(model, [cond], x, sigma, model_options)[0]
    module = "backend.sampling.sampling_function" if kind in BACKEND_KINDS else "ldm_patched.modules.samplers"
    calc = _attribute((module,), "calc_cond_uncond_batch")
    return calc(model, cond, None, x, sigma, model_options)[0]


def fits_in_memory(kind: str, model: Any, shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether a UNet call of ``shape`` fits by the host's own estimate, with reForge's 1.5x margin.

    ``model.memory_required(shape)`` (BaseModel / KModel) against the host's free-memory probe
    (``backend.memory_management`` in new Forge and Neo, ``ldm_patched.modules.model_management``
    otherwise), which counts what ``--lowvram``/``--medvram`` and the GPU-weights slider left free.
    Neo's estimate is ComfyUI v0.3.64's (``area * dtype_size * 0.01 * memory_usage_factor`` MiB with
    flash/xformers attention, ``area * 0.15 * factor`` otherwise); Neo batches its own chunks with no
    margin, we keep ComfyUI's 1.5x on every host because the SEG rows are an addition the host did not
    plan for.  Without either function the answer is no, and SEG makes its separate pass; an OOM in the
    batched call also falls back to it (:mod:`lib_seg.forge.seg_pass`).  Neo 2.29 doubled its estimate
    (``area * s * 0.02 * factor`` MiB, ``s`` 8 for basic attention, else the compute dtype's size;
    ``backend/modules/k_model.py:60-66``): asking the host's own function follows it, whatever the version.

    One exception: while Neo's "Never OOM Integrated" streams the UNet's weights for every call
    (:func:`streams_weights`), the answer is yes without an estimate: a separate SEG call would stream all
    the weights once more, which costs far more than the extra rows, and an OOM still falls back.
    """
    _require(kind)
    if streams_weights(kind):
        return True
    name = MEMORY.get(kind, "ldm_patched.modules.model_management")
    free_memory = getattr(_module(name), "get_free_memory", None)
    required = getattr(model, "memory_required", None)
    if free_memory is None or required is None:
        return False
    return required(list(shape)) * 1.5 < free_memory(device)


def streams_weights(kind: str) -> bool:
    """Whether Neo's "Never OOM Integrated" (2.27+, ``extensions-builtin/sd_forge_neveroom``) has the UNet
    always offloaded: it sets ``backend.memory_management.UNET_ALWAYS_OFFLOAD``, and every model call then
    streams the weights to the GPU again."""
    memory = _module("backend.memory_management") if kind == NEO else None
    return getattr(memory, "UNET_ALWAYS_OFFLOAD", False) is True


def extra_rows_allowed(kind: str) -> bool:
    """Whether SEG may append its rows to the host's main model call.

    Not on Neo while its global extra latents are set (``backend.args.dynamic_args.concat_latent``: Wan's
    image-to-video latent; ``ref_latents``: reference images): some of Neo's models size them for the
    host's own batch only (de2193d ``backend/nn/wan.py:392-397`` and ``anima.py:462-466`` repeat a one-row
    latent only ``if x.shape[0] == 2``), so a call with extra rows fails in the host.  Nor while Neo's "Batch
    Cond/Uncond" option (2.29, ``modules.shared.batch_cond_uncond``) is off: the user asked the host to run
    one condition per call (its ``can_concat_cond`` then says no, ``sampling_function.py:95-97``), and SEG
    keeps to it.  SEG then makes its separate call (same result, one more model call per step).
    """
    _require(kind)
    if kind != NEO:
        return True
    if getattr(_module("modules.shared"), "batch_cond_uncond", True) is False:
        return False
    dynamic = getattr(_module("backend.args"), "dynamic_args", None)
    return getattr(dynamic, "concat_latent", None) is None and not getattr(dynamic, "ref_latents", None)
