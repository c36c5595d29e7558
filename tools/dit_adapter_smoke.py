"""Smoke check of lib_seg.forge.adapter on the DiT families through a REAL Forge 2.x, reForge or Forge Neo sampler
(not a test: it needs a host tree and its venv; ``--host imitation`` is its self-check without one, run by CI).

Families: Flux, Chroma and SD3 on Forge 2.x / reForge; on Neo, every case of ``tools/_neo_cases.py`` whose
conditioning is the context tensor alone: Flux, Chroma, Flux.2-Klein (9x13, 8x8), Z-Image, Lumina 2,
Qwen-Image, Wan (one frame, three frames), Anima (one frame, three frames), Krea 2 and Ernie-Image.  The
cases that need Neo's globals or extra conds (Flux Kontext, Klein / Qwen-Image-Edit / Anima / Krea 2
references, Wan's ``time_dim_concat`` and 2.1 i2v, PixelDiT and PiD's LQ latent) are covered by
``dit_backend_smoke --host neo`` only.  The family, its blocks and the two settings checked (a finite blur on
the middle block(s), the mean on all) come from lib_seg's registry (``lib_seg.dit.families.family_of``).
On the Neo 2.29 hybrid tree (``--host neo229``: 2.29's model files over 2.26's ``sampling_function``,
``KModel`` and ``UnetPatcher``, see ``tools/_neo229_cases.py`` for the files and commits), the cases of
``dit_backend_smoke --host neo229`` run through the same Neo calls: Flux, Chroma, Flux.2-Klein (9x13, 8x8),
Z-Image, Lumina 2, Anima (one, two frames), Krea 2, Qwen-Image 2.1 (no, one and two references, held in
``dynamic_args`` for the case), Qwen-Image and Wan (one, three frames).

The host's own tiny float64 transformers of ``tools/dit_backend_smoke.py`` are wrapped as the hosts wrap them:
Forge 2.x ``UnetPatcher.from_model`` (``KModel`` with the engine's predictor: ``PredictionFlux`` for Flux and
Chroma, ``PredictionDiscreteFlow(shift=3)`` for SD3), reForge ``supported_models.X(config).get_model({})``
(``model_base.Flux`` / ``Chroma`` / ``SD3``) in ``modules_forge.unet_patcher.UnetPatcher``.  One denoiser step
runs as the hosts' ``CFGDenoiser`` runs it: Forge 2.x's ``backend.sampling.sampling_function.sampling_function``
(which reads ``forge_objects.unet`` from the denoiser, compiles the webui conds and calls
``sampling_function_inner``), reForge's ``ldm_patched.modules.samplers.sampling_function`` with the model and
``model_options`` read from ``forge_objects.unet`` as ``modules/sd_samplers_cfg_denoiser.py`` does.

``lib_seg.forge.adapter.patch_unet`` is called on a minimal ``p`` (``sd_model.forge_objects.unet``, the
denoiser counters ``step`` / ``total_steps`` in ``sampler.model_wrap_cfg``), at CFG 1 and 4, batch 2, with the
SEG rows batched into the main call and in a separate call, on a 9x13 latent (Forge 2.x's MMDiTX: 10x14, it
fails on odd sides by itself; Neo's 5-D latents: 1 or 3 frames of 9x13).  Its output must equal an
expectation that runs no lib_seg code::

    plain denoised + 3 * (cond_plain - cond_ref)

where the plain denoised comes from the same host step without SEG, and ``cond_plain`` / ``cond_ref`` from the
host's cond-only batching (``calc_cond_uncond_batch`` / ``calc_cond_batch``), ``cond_ref`` with the host's
attention function swapped for the reference of ``dit_backend_smoke`` (blurred image logit rows in the chosen
blocks).  Also checked: the number and size of the transformer's calls (batched: one call with the SEG rows
appended; separate: the main call, then one cond-only call), no hooks left on the transformer, the plain
patcher's ``model_options`` untouched, SEG off (disabled, scale 0) bit-identical to no extension, and a layer
spec the model lacks fails sampling with a ValueError that names the model's blocks.

ComfyUI (``--host comfyui``, ``tools/_comfy_adapter.py``): ``lib_seg.comfy.adapter.patch_model`` (the SEG node's
path) on the ComfyUI cases of ``dit_backend_smoke`` whose conds a prompt gives, in the ``model_base`` class ComfyUI
loads them into, through its own ``ModelPatcher``, ``process_conds``, ``sampling_function`` and ``calc_cond_batch``:
    HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 /work/hosts/comfyui/venv/bin/python -m tools.dit_adapter_smoke \
        --host comfyui

Run from the repo root with the host's venv (the tree is FORGE_DIR / REFORGE_DIR / NEO_DIR / NEO229_DIR as in
dit_backend_smoke):
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/venv-forge2/bin/python -m tools.dit_adapter_smoke --host forge2
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/venv-reforge/bin/python -m tools.dit_adapter_smoke --host reforge
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/forge-neo/venv/bin/python -m tools.dit_adapter_smoke --host neo
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/forge-neo/venv/bin/python -m tools.dit_adapter_smoke --host neo229

Self-check without a host tree (what CI runs, tests/tools): ``--host imitation`` takes the patcher
(``UnetPatcher``, ``DitModel`` as KModel runs a DiT), the sampling module (``sampling_function`` /
``calc_cond_uncond_batch``) and the CFG-1 uncond skip from tests/support/forge_host.py's Forge 2.x
imitation, and the DiTs and the reference from ``dit_backend_smoke --host imitation``.  Everything this
tool does after the host lookups (the expectation, the call counts, the hook and option checks, the
failing spec, the report) runs unchanged.  It checks this tool and lib_seg against the imitation only:
    python -m tools.dit_adapter_smoke --host imitation
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

from tools import dit_backend_smoke as smoke

SEG_SCALE, SIGMA_T, IMAGES = 3.0, 0.8, smoke.BATCH
# Bounds on max|seg - expected| / (3 * max|x - cond_plain|): the hosts' prediction is x - sigma * output, so
# max|x - cond_plain| is sigma times the transformer's output scale, the scale dit_backend_smoke's bounds are
# relative to.  The transformer runs as there (Flux/Chroma: float32 RoPE, ROPE_REL; MMDiT: FLOAT64_REL), but both
# hosts' apply_model cast its output to float32 (Forge 2.x ``KModel.apply_model`` / reForge
# ``BaseModel._apply_model``: ``.float()``), so every prediction in the two sums may round differently by one
# float32 ulp (2**-23 of the output scale): denoised (up to 1 + 2 * 4 terms at CFG 4, divided by the SEG scale 3)
# and the two cond terms of each sum give at most 7 ulps; 2**4 float32 epsilons of room.
F32_OUTPUT_REL = 2.0**4 * 2.0**-23
# model_list.py (huggingface_guess): memory_usage_factor and sampling_settings' shift of the family's class
# (Flux, Flux2K4B, Lumina2, ZImage, QwenImage, WAN21_T2V (dim / 2000 in its __init__), Anima, Krea2,
# ErnieImage); PredictionFlux reads only the shift, which one step at a given sigma does not use.  Qwen-Image 2.1
# (2.29's model_list, not in the hybrid tree) gets the default (1.0, 1.0): only the memory estimate reads it.
NEO_CONFIGS = {
    "flux": (3.1, 1.15), "flux2": (14.6, 2.02), "lumina2": (1.4, 6.0), "zimage": (2.8, 3.0),
    "qwen": (1.8, 1.15), "wan": (None, 8.0), "anima": (1.32, 3.0), "krea2": (2.2, 1.15), "ernie": (10.0, 3.0),
}  # fmt: skip


@dataclass
class Family:
    name: str  # the lib_seg.dit.families registry's name ("flux", "flux2", "mmdit", "zimage", "wan", ...)
    layers: tuple  # the model's blocks (DitLayers) in run order, as the registry lists them
    blocks: str  # the same in SEG's layer syntax (lib_seg.core.blocks.format_layers)

    @classmethod
    def of(cls, model) -> Family:
        from lib_seg.core.blocks import format_layers
        from lib_seg.dit.families import family_of

        family = family_of(model)
        assert family is not None, f"no SEG family knows {type(model).__name__}"
        layers = family.layers(model)
        return cls(family.name, layers, format_layers(layers))

    def settings(self) -> tuple[tuple[str, float], ...]:
        """(layers, blur sigma): a finite blur on the middle block (the two middle ones from 4 blocks on:
        Flux's ``d1,s0``; SD3's ``j0``), and the mean on all blocks."""
        from lib_seg.core.blocks import format_layers

        n = len(self.layers)
        middle = {self.layers[(n - 1) // 2], self.layers[n // 2]} if n >= 4 else {self.layers[(n - 1) // 2]}
        return (format_layers(middle), 1.5), ("all", math.inf)


class Forge2:
    """Forge 2.x: ``UnetPatcher.from_model`` (KModel) and ``sampling_function(denoiser, params, scale, comp)``."""

    output_rel = F32_OUTPUT_REL  # KModel.apply_model casts the prediction to float32

    def rows_ride_along(self) -> bool:
        """Whether SEG's rows may join the main model call now (Neo: not while reference latents are set)."""
        return True

    def __init__(self):
        import torch
        from backend.sampling import condition
        from backend.sampling import sampling_function as sampling
        from modules.prompt_parser import DictWithShape

        self.torch, self.sampling, self.condition, self.dict_with_shape = torch, sampling, condition, DictWithShape

    def cases(self):
        return smoke.forge2_cases()

    def wrap(self, case):
        from backend.modules.k_prediction import PredictionDiscreteFlow, PredictionFlux
        from backend.patcher.unet import UnetPatcher

        model, cpu = case.model, self.torch.device("cpu")
        model.storage_dtype = model.computation_dtype = self.torch.float64  # as backend/loader.py sets them
        model.load_device = model.offload_device = model.initial_device = cpu
        mmdit = Family.of(model).name == "mmdit"  # diffusion_engine/sd35.py; flux.py (schnell) and chroma.py
        predictor = PredictionDiscreteFlow(shift=3.0) if mmdit else PredictionFlux(mu=1.0)
        return UnetPatcher.from_model(model=model, diffusers_scheduler=None, k_predictor=predictor, config=None)

    def text_conds(self, inputs: dict):
        """What the engines' get_learned_conditioning returns: Flux {crossattn, vector, guidance}, SD3
        {crossattn, vector}, Chroma the T5 tensor; DictWithShape as prompt_parser's reconstruct_*_batch gives."""
        if "y" not in inputs:
            return inputs["context"]
        cond = {"crossattn": inputs["context"], "vector": inputs["y"]}
        if "guidance" in inputs:
            cond["guidance"] = inputs["guidance"]
        return self.dict_with_shape(cond)

    def step(self, denoiser, x, sigma, cond, uncond, cfg: float):
        """One ``CFGDenoiser.forward`` (modules/sd_samplers_cfg_denoiser.py:199,222): the denoiser is ``self``."""
        params = SimpleNamespace(x=x, sigma=sigma, text_cond=cond, text_uncond=uncond, image_cond=None)
        composition = [[(i, 1.0)] for i in range(x.shape[0])]  # one prompt per image, weight 1
        denoised, _, _ = self.sampling.sampling_function(denoiser, params, cfg, composition)
        denoiser.step += 1
        return denoised

    def cond_pass(self, patcher, x, sigma, cond):
        composition = [[(i, 1.0)] for i in range(x.shape[0])]
        compiled = self.condition.compile_weighted_conditions(cond, composition)
        options = patcher.model_options
        return self.sampling.calc_cond_uncond_batch(patcher.model, compiled, None, x, sigma, options)[0]


class ReForge:
    """reForge: ``supported_models.X(config).get_model({})`` in ``UnetPatcher``, ``samplers.sampling_function``."""

    output_rel = F32_OUTPUT_REL  # BaseModel._apply_model casts the prediction to float32

    def rows_ride_along(self) -> bool:
        return True

    def __init__(self):
        import torch
        from ldm_patched.modules import conds, samplers

        self.torch, self.samplers, self.conds = torch, samplers, conds

    def cases(self):
        wanted = ("Flux", "Chroma", "MMDiT", "MMDiT+attn2")  # Kontext needs ref_latents conds: not here
        return [case for case in smoke.reforge_cases() if case.name in wanted]

    def wrap(self, case):
        from ldm_patched.modules import supported_models
        from modules_forge.unet_patcher import UnetPatcher

        model, cpu = case.model, self.torch.device("cpu")
        configs = {"Flux": supported_models.Flux, "Chroma": supported_models.Chroma}
        config = configs.get(type(model).__name__, supported_models.SD3)({"disable_unet_model_creation": True})
        config.set_inference_dtype(self.torch.float64, None)
        base = config.get_model({}, device=cpu)  # model_base.Flux / Chroma / SD3, its model_sampling included
        base.diffusion_model = model  # the float64 build of dit_backend_smoke instead of one from a state dict
        return UnetPatcher(base, load_device=cpu, offload_device=cpu)

    def text_conds(self, inputs: dict):
        entry = {"c_crossattn": self.conds.CONDCrossAttn(inputs["context"])}
        for key in ("y", "guidance"):
            if key in inputs:
                entry[key] = self.conds.CONDRegular(inputs[key])
        return [{"model_conds": entry}]

    def step(self, denoiser, x, sigma, cond, uncond, cfg: float):
        """``CFGDenoiser.forward``'s sampling (modules/sd_samplers_cfg_denoiser.py:208-245)."""
        unet = denoiser.inner_model.inner_model.forge_objects.unet
        denoised = self.samplers.sampling_function(unet.model, x, sigma, uncond, cond, cfg, unet.model_options, 0)
        denoiser.step += 1
        return denoised

    def cond_pass(self, patcher, x, sigma, cond):
        return self.samplers.calc_cond_batch(patcher.model, [cond], x, sigma, patcher.model_options)[0]


class Imitation:
    """tests/support/forge_host.py's Forge 2.x: its ``UnetPatcher`` over a ``DitModel``, its sampling module put
    in ``sys.modules`` (so that lib_seg's host lookups find it), called as its ``CFGDenoiser`` calls it."""

    output_rel = 0.0  # DitModel keeps the transformer's float64 output

    def rows_ride_along(self) -> bool:
        return True

    def __init__(self):
        from tests.support import forge_host

        self.kind, self.host = "forge", forge_host
        sys.modules.update(forge_host.host_modules(self.kind))  # this process is the host's: nothing to undo
        self.sampling = sys.modules["backend.sampling.sampling_function"]

    def cases(self):
        return [case for case in smoke.imitation_cases() if case.name != "Flux+Kontext"]  # no ref_latents conds

    def wrap(self, case):
        return self.host.UnetPatcher(self.host.DitModel(case.model))

    def text_conds(self, inputs: dict):
        """The imitation's cond entries: ``model_conds`` tensors by the names its batching concatenates."""
        conds = {"c_crossattn": inputs["context"]}
        conds.update({key: inputs[key] for key in ("y", "guidance") if key in inputs})
        return [{"model_conds": conds, "strength": 1.0}]

    def step(self, denoiser, x, sigma, cond, uncond, cfg: float):
        """``forge_host.CFGDenoiser.__call__``: the patcher re-read per call, no uncond at CFG 1."""
        unet = denoiser.inner_model.inner_model.forge_objects.unet
        uncond = None if cfg == 1.0 else uncond
        denoised = self.sampling.sampling_function(unet.model, x, sigma, uncond, cond, cfg, unet.model_options)
        denoiser.step += 1
        return denoised

    def cond_pass(self, patcher, x, sigma, cond):
        return self.sampling.calc_cond_uncond_batch(patcher.model, cond, None, x, sigma, patcher.model_options)[0]


class Neo(Forge2):
    """Forge Neo 2.26 (de2193d): Forge 2.x's names (``backend.sampling.sampling_function.sampling_function``,
    ``calc_cond_uncond_batch``, ``condition.compile_weighted_conditions``, ``UnetPatcher.from_model``), with
    ``k_predictor`` a keyword, a model config that ``KModel.memory_required`` reads (``memory_usage_factor``)
    and ``PredictionFlux`` reads (``sampling_settings``), as ``backend/diffusion_engine/flux.py`` / ``flux2.py``
    build them.  The transformers are dit_backend_smoke's Neo float32 builds (comfy_kitchen's RoPE has no
    float64); the reference-image cases are left to dit_backend_smoke (they need Neo's ``ref_latents``)."""

    output_rel = F32_OUTPUT_REL

    def rows_ride_along(self) -> bool:
        """Not while Neo's global extra latents are set (``dynamic_args.ref_latents`` / ``concat_latent``): Anima,
        Krea 2 and Wan repeat a one-row latent only for a batch of 2, so extra rows would fail in the host;
        SEG then makes its own call (lib_seg.forge.host.extra_rows_allowed)."""
        from backend.args import dynamic_args

        return getattr(dynamic_args, "concat_latent", None) is None and not getattr(dynamic_args, "ref_latents", None)

    # The cases whose only conditioning is the context tensor (``c_crossattn``); the others need Neo's globals
    # or extra conds (Kontext / Klein / Qwen-Edit / Anima / Krea references, Wan's time_dim_concat and i2v
    # CLIP features + concat latent, PixelDiT / PiD): dit_backend_smoke covers those.
    WANTED = ("Flux", "Chroma", "Flux.2-Klein", "Flux.2-Klein 8x8", "Z-Image", "Lumina 2", "Qwen-Image", "Wan")
    WANTED += ("Wan 3-frame", "Anima", "Anima 3-frame", "Krea 2", "Ernie-Image")

    def cases(self):
        return [case for case in smoke.neo_cases() if case.name in self.WANTED]

    def wrap(self, case):
        from backend.args import dynamic_args
        from backend.modules.k_prediction import PredictionFlux
        from backend.patcher.unet import UnetPatcher

        if dynamic_args.ops is None:  # set by backend/operations.py when the loader builds a model
            dynamic_args.ops = "Operations"

        model, cpu = case.model, self.torch.device("cpu")
        model.storage_dtype = model.computation_dtype = self.torch.float32
        model.load_device = model.offload_device = model.initial_device = cpu
        memory, shift = NEO_CONFIGS.get(Family.of(model).name, (1.0, 1.0))
        if memory is None:  # WAN21_T2V: unet_config["dim"] / 2000
            memory = model.dim / 2000
        config = SimpleNamespace(memory_usage_factor=memory, sampling_settings={"shift": shift})
        return UnetPatcher.from_model(
            model=model, diffusers_scheduler=None, config=config, k_predictor=PredictionFlux(config)
        )


class Neo229(Neo):
    """The Neo 2.29 hybrid tree (``tools/_neo229_cases.py``): 2.29's model files over 2.26's sampling function,
    ``KModel`` and ``UnetPatcher``, which the hybrid keeps, so the calls are ``Neo``'s.  The transformers are
    ``dit_backend_smoke --host neo229``'s builds.  Besides the context-only cases, Qwen-Image 2.1's
    references run here: they come from ``dynamic_args`` (held during the case, ``Case.context``) and the
    model expands them to any batch; while they are set SEG makes its own call even when asked to batch
    (``rows_ride_along``), which their "batched" checks count.  Anima's and Krea 2's references stay with
    dit_backend_smoke: the models double a one-row reference only for a batch of exactly 2 (Neo's cond +
    uncond of one image), so a CFG-4 batch of two images fails in the host itself, SEG or not."""

    WANTED = ("Flux", "Chroma", "Flux.2-Klein", "Flux.2-Klein 8x8", "Z-Image", "Lumina 2", "Anima", "Anima 2-frame")
    WANTED += ("Krea 2", "Qwen-Image 2.1", "Qwen-Image 2.1+ref", "Qwen-Image 2.1+2 refs", "Qwen-Image", "Wan")
    WANTED += ("Wan 3-frame",)

    def cases(self):
        return [case for case in smoke.neo229_cases() if case.name in self.WANTED]


def comfyui():
    """ComfyUI (``tools/_comfy_adapter.py``): ``lib_seg.comfy.adapter.patch_model`` through its own sampling."""
    from tools._comfy_adapter import ComfyUI

    return ComfyUI()


APIS = {"forge2": Forge2, "reforge": ReForge, "neo": Neo, "neo229": Neo229, smoke.IMITATION: Imitation}
APIS["comfyui"] = comfyui


def processing(patcher):
    """``p`` as process_before_every_sampling sees it; its denoiser is also the ``self`` of the host's sampling."""
    sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=patcher))
    denoiser = SimpleNamespace(step=0, total_steps=1, inner_model=SimpleNamespace(inner_model=sd_model))
    denoiser.p = SimpleNamespace(seeds=[0])
    return SimpleNamespace(sd_model=sd_model, is_hr_pass=False, sampler=SimpleNamespace(model_wrap_cfg=denoiser))


@contextmanager
def counted_calls(model) -> Iterator[list[int]]:
    """The batch size of every call of the transformer (a forward pre-hook, removed on exit)."""
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _module, args: rows.append(int(args[0].shape[0])))
    try:
        yield rows
    finally:
        handle.remove()


def raised(function: Callable) -> Exception | None:
    try:
        function()
    except Exception as error:  # the check looks at its type and message
        return error
    return None


def run_case(host: str, api, case, report) -> None:
    import torch

    from lib_seg.core.blocks import resolve_layers
    from lib_seg.core.params import SegParams
    from lib_seg.forge import adapter

    family = Family.of(case.model)
    patcher = api.wrap(case)
    options = copy.deepcopy(patcher.model_options)
    inputs = dict(case.inputs)
    x, generator = inputs["x"], torch.Generator().manual_seed(2)
    negative = {key: value for key, value in inputs.items() if key == "guidance"}
    negative.update(
        {key: torch.randn(inputs[key].shape, generator=generator).to(x) for key in ("context", "y") if key in inputs}
    )
    cond, uncond = api.text_conds(inputs), api.text_conds(negative)
    sigma = torch.full((IMAGES,), SIGMA_T, dtype=x.dtype)
    latent = tuple(x.shape[-2:])  # (H, W) of a 4-D latent or of each frame of Neo's 5-D (B, C, T, H, W)
    grid = (-(-latent[0] // case.patch), -(-latent[1] // case.patch))  # the model's patches, odd sides padded
    label = f"{host} {case.name} {'x'.join(map(str, x.shape[2:]))}"
    rel = case.rel + api.output_rel

    def step(p, cfg):
        return api.step(p.sampler.model_wrap_cfg, x, sigma, cond, uncond, cfg)

    with torch.no_grad(), case.context():  # the host's globals the case needs (Qwen-Image 2.1's references)
        report(smoke.no_hooks(case.model), f"{label}: no hooks before")
        plain = {cfg: step(processing(patcher), cfg) for cfg in (1.0, 4.0)}
        cond_plain = api.cond_pass(patcher, x, sigma, cond)
        scale = SEG_SCALE * float((x - cond_plain).abs().max())
        for spec, blur in family.settings():
            chosen = resolve_layers(spec, family.layers)
            with smoke.reference_attention(case, chosen, grid, blur) as ref:
                cond_ref = api.cond_pass(patcher, x, sigma, cond)
            explicit = smoke.explicit_calls(case.model, chosen, case.blocks)
            report(ref.explicit == explicit, f"{label} {spec} sigma={blur}: reference ran {ref.explicit}/{explicit}")
            for cfg in (1.0, 4.0):
                expected = plain[cfg] + SEG_SCALE * (cond_plain - cond_ref)
                main_rows = IMAGES * (1 if cfg == 1.0 else 2)  # CFG 1: the hosts skip the uncond pass
                for batch_rows in (True, False):
                    p = processing(patcher)
                    params = SegParams(enabled=True, scale=SEG_SCALE, blur_sigma=blur, layers=spec)
                    text = adapter.patch_unet(p, params, batch_rows=batch_rows)
                    with counted_calls(case.model) as calls:
                        out = step(p, cfg)
                    rides = batch_rows and api.rows_ride_along()  # else SEG's own call, even when batching
                    where = f"{label} {spec} sigma={blur} cfg={cfg:g} {'batched' if batch_rows else 'separate'}"
                    check_step(report, where, out, expected, plain[cfg], (scale, rel, text), calls, main_rows, rides)
                    report(smoke.no_hooks(case.model), f"{where}: no hooks left")
        for params in (SegParams(enabled=False, layers="all"), SegParams(enabled=True, scale=0.0)):
            p = processing(patcher)
            installed = adapter.patch_unet(p, params) is not None or p.sd_model.forge_objects.unet is not patcher
            same = [bool(step(p, cfg).equal(plain[cfg])) for cfg in (1.0, 4.0)]
            what = "disabled" if not params.enabled else "scale 0"
            report(not installed and all(same), f"{label} SEG {what}: nothing installed, bit-identical at CFG 1, 4")
        p = processing(patcher)
        installed = adapter.patch_unet(p, SegParams(enabled=True, layers="j7"))
        error = raised(lambda: step(p, 4.0))
        names = isinstance(error, ValueError) and f"it has {family.blocks}" in str(error)
        report(installed is None and names, f"{label} layers j7: sampling raised {type(error).__name__}: {error}")
        report(smoke.no_hooks(case.model), f"{label}: no hooks left after the failed step")
    report(patcher.model_options == options, f"{label}: plain patcher's model_options untouched")


def check_step(report, where: str, out, expected, plain, bound: tuple, calls: list, main_rows: int, rides: bool):
    """One SEG step against the reference, ``bound = (scale, rel, the layers that ran)``: the relative error within
    ``rel`` of ``scale``, an effect well over it, the output's dtype, and the transformer's calls (one batched call
    where the SEG rows ride, else two)."""
    scale, rel, layers = bound
    err = float((out - expected).abs().max()) / scale
    effect = float((out - plain).abs().max()) / scale
    ok = err <= rel and effect > smoke.EFFECT_FACTOR * rel and out.dtype == plain.dtype
    report(ok, f"{where}: rel err {err:.2e} <= {rel:.1e}, effect {effect:.2e} (layers {layers})")
    want = [main_rows + IMAGES] if rides else [main_rows, IMAGES]
    report(calls == want, f"{where}: transformer calls {calls} == {want}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=sorted(APIS), required=True, help="imitation: no host tree (CI)")
    host = parser.parse_args().host
    tree = smoke.setup(host)
    import torch

    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine: threads only add overhead
    failures = []

    def report(ok: bool, line: str) -> None:
        print(("PASS " if ok else "FAIL ") + line, flush=True)
        if not ok:
            failures.append(line)

    api = APIS[host]()  # the imitation's modules must be in sys.modules before the host kind is read
    from lib_seg.forge import adapter

    print(f"{host} tree {tree}, torch {torch.__version__}, lib_seg host kind {adapter.host_kind()}")
    for case in api.cases():
        if hasattr(api, "run"):  # ComfyUI: its own node path (tools/_comfy_adapter.py)
            api.run(host, case, report)
        else:
            run_case(host, api, case, report)
    print(f"{len(failures)} failed" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
