"""The ``--host comfyui`` of tools/dit_adapter_smoke.py: the SEG node's path (``lib_seg.comfy.adapter.patch_model``)
through ComfyUI's own ``ModelPatcher`` and sampling function, on the ComfyUI transformers of tools/_comfy_cases.py.

Not a script: ``tools/dit_adapter_smoke.py`` uses :class:`ComfyUI` for ``--host comfyui`` (run from the repo root
with ComfyUI's venv; the tree is COMFYUI_DIR as in dit_backend_smoke):
    HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 /work/hosts/comfyui/venv/bin/python -m tools.dit_adapter_smoke \\
        --host comfyui

Read at hiddenswitch/pip-and-uv-installable-ComfyUI 87606c5f.  Each case's transformer goes into the ``model_base``
class its ``comfy.supported_models`` config builds (``get_model``, with the case's own unet_config; the built
transformer is then replaced by the case's, as the reForge wrap does), in a ``comfy.model_patcher.ModelPatcher`` on
the CPU.  The conditioning is what a prompt node gives, ``[[context, {"pooled_output": ..., "guidance": ...,
"reference_latents": [...]}]]``, turned into model conds by ComfyUI's own ``sampler_helpers.convert_cond`` and
``samplers.process_conds`` (the model's ``extra_conds``: Flux.2 pads the text to 512 tokens, Lumina adds
``num_tokens``, references become ``ref_latents``).  One denoiser step is ``comfy.samplers.sampling_function(model,
x, sigma, uncond, cond, cfg, model_options, seed)`` between the patcher's ``pre_run`` and ``cleanup``, as a
sampler calls it (CFG 1 skips the uncond, the post-CFG functions run); the cond-only passes of the expectation are
``comfy.samplers.calc_cond_batch``.  Checked as for the other hosts: ``plain + 3 (cond_plain - cond_ref)`` at CFG 1
and 4, batched and separate, the transformer's call sizes, no hooks left, the plain patcher's ``model_options``
untouched, SEG off (scale 0) returning the patcher itself, a block spec the model lacks refused by ``patch_model``
with the model's blocks named.  ``BaseModel._apply_model`` casts the prediction to float32 (``F32_OUTPUT_REL``).
"""

from __future__ import annotations

import copy
import dataclasses

from tools import _comfy_cases as comfy_cases
from tools import dit_backend_smoke as smoke
from tools.dit_adapter_smoke import (
    F32_OUTPUT_REL,
    IMAGES,
    SEG_SCALE,
    SIGMA_T,
    Family,
    check_step,
    counted_calls,
    raised,
)

# The cases whose conditioning a prompt node (and a reference-latent node) gives; Wan's time_dim_concat and 2.1 i2v
# (CLIP vision output, concat latent), Qwen-Image-Layered and Z-Image Omni need other nodes' conds and stay with
# dit_backend_smoke.
WANTED = ("Flux", "Flux+Kontext", "Chroma", "Flux.2-Klein", "Flux.2-Klein+ref", "MMDiT", "MMDiT+attn2", "Z-Image")
WANTED += ("Lumina 2", "Qwen-Image", "Qwen-Image-Edit", "Wan", "Wan 3-frame", "Anima", "Anima 3-frame")
# Conds lib_seg.forge.rows does not copy into extra rows (not in its CONDITIONING_KEYS): a reference latent list
# (``ref_latents``): with it SEG makes its own cond-only call even when asked to batch (same result, one more call),
# which the call counts expect.  Lumina's / Z-Image's ``num_tokens`` (a CONDConstant, model_base.py:1232-1235) rides.
ALONE = ("ref_latents",)
TEXT_LENGTH = {"Flux2": 512}  # model_base.Flux2.extra_conds pads the text to 512 tokens (model_base.py:961-970)


class ComfyUI:
    """ComfyUI's ``ModelPatcher``, ``process_conds``, ``sampling_function`` and ``calc_cond_batch``."""

    output_rel = F32_OUTPUT_REL  # BaseModel._apply_model: ``model_output.float()``

    def __init__(self):
        import torch
        from comfy import model_patcher, sampler_helpers, samplers, supported_models

        self.torch, self.samplers, self.helpers = torch, samplers, sampler_helpers
        self.supported, self.model_patcher = supported_models, model_patcher

    def cases(self):
        return [case for case in smoke.comfyui_cases() if case.name in WANTED]

    def wrap(self, case):
        torch, cpu = self.torch, self.torch.device("cpu")
        name, unet_config = comfy_cases.CONFIGS[case.model]
        config = getattr(self.supported, name)(dict(unet_config))
        config.set_inference_dtype(next(case.model.parameters()).dtype, None)
        base = config.get_model({}, device=cpu)
        base.diffusion_model = case.model
        with torch.no_grad():
            return self.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu), name

    def conds(self, base, inputs: dict, x):
        """A prompt's conditioning as the sampler gets it: model conds from the model's ``extra_conds``."""
        extra = {"pooled_output": inputs.get("y")}  # a text encoder's, None where it has none (T5, Qwen, ...)
        if "guidance" in inputs:
            extra["guidance"] = float(inputs["guidance"][0])
        if "ref_latents" in inputs:
            extra["reference_latents"] = list(inputs["ref_latents"])
        raw = [[inputs["context"], extra]]
        cpu = self.torch.device("cpu")
        return self.samplers.process_conds(base, x, {"c": self.helpers.convert_cond(raw)}, cpu, seed=0)["c"]

    def step(self, patcher, x, sigma, cond, uncond, cfg: float):
        patcher.pre_run()  # sets the model's current_patcher, as sampling does before the first step
        try:
            return self.samplers.sampling_function(patcher.model, x, sigma, uncond, cond, cfg, patcher.model_options, 0)
        finally:
            patcher.cleanup()

    def cond_pass(self, patcher, x, sigma, cond):
        patcher.pre_run()
        try:
            return self.samplers.calc_cond_batch(patcher.model, [cond], x, sigma, patcher.model_options)[0]
        finally:
            patcher.cleanup()

    def run(self, host: str, case, report) -> None:
        from lib_seg.comfy import adapter
        from lib_seg.core.blocks import resolve_layers
        from lib_seg.core.params import SegParams

        torch = self.torch
        family = Family.of(case.model)
        patcher, name = self.wrap(case)
        if name in TEXT_LENGTH:
            case = dataclasses.replace(case, n_ctx=TEXT_LENGTH[name])
        options = copy.deepcopy(patcher.model_options)
        inputs = dict(case.inputs)
        x, generator = inputs["x"], torch.Generator().manual_seed(2)
        negative = {key: value for key, value in inputs.items() if key in ("guidance", "ref_latents")}
        drawn = [key for key in ("context", "y") if key in inputs]
        negative.update({key: torch.randn(inputs[key].shape, generator=generator).to(x) for key in drawn})
        cond, uncond = self.conds(patcher.model, inputs, x), self.conds(patcher.model, negative, x)
        sigma = torch.full((IMAGES,), SIGMA_T, dtype=x.dtype)
        latent = tuple(x.shape[-2:])
        grid = (-(-latent[0] // case.patch), -(-latent[1] // case.patch))
        label = f"{host} {case.name} {'x'.join(map(str, x.shape[2:]))}"
        rel = case.rel + self.output_rel

        with torch.no_grad():
            report(smoke.no_hooks(case.model), f"{label}: no hooks before")
            plain = {cfg: self.step(patcher, x, sigma, cond, uncond, cfg) for cfg in (1.0, 4.0)}
            cond_plain = self.cond_pass(patcher, x, sigma, cond)
            scale = SEG_SCALE * float((x - cond_plain).abs().max())
            for spec, blur in family.settings():
                chosen = resolve_layers(spec, family.layers)
                with smoke.reference_attention(case, chosen, grid, blur) as ref:
                    cond_ref = self.cond_pass(patcher, x, sigma, cond)
                explicit = smoke.explicit_calls(case.model, chosen, case.blocks)
                ran = f"{label} {spec} sigma={blur}: reference ran {ref.explicit}/{explicit}"
                report(ref.explicit == explicit, ran)
                for cfg in (1.0, 4.0):
                    expected = plain[cfg] + SEG_SCALE * (cond_plain - cond_ref)
                    main_rows = IMAGES * (1 if cfg == 1.0 else 2)  # CFG 1: ComfyUI skips the uncond pass
                    for batch_rows in (True, False):
                        params = SegParams(enabled=True, scale=SEG_SCALE, blur_sigma=blur, layers=spec)
                        clone = adapter.patch_model(patcher, params, batch_rows=batch_rows)
                        text = adapter.layer_text(clone, spec)
                        with counted_calls(case.model) as calls:
                            out = self.step(clone, x, sigma, cond, uncond, cfg)
                        rides = batch_rows and not any(key in inputs for key in ALONE)
                        where = f"{label} {spec} sigma={blur} cfg={cfg:g} {'batched' if batch_rows else 'separate'}"
                        check_step(
                            report, where, out, expected, plain[cfg], (scale, rel, text), calls, main_rows, rides
                        )
                        report(smoke.no_hooks(case.model), f"{where}: no hooks left")
            off = adapter.patch_model(patcher, SegParams(enabled=True, scale=0.0))
            same = [bool(self.step(off, x, sigma, cond, uncond, cfg).equal(plain[cfg])) for cfg in (1.0, 4.0)]
            report(off is patcher and all(same), f"{label} SEG scale 0: the patcher itself, bit-identical at CFG 1, 4")
            error = raised(lambda: adapter.patch_model(patcher, SegParams(enabled=True, layers="j7")))
            names = isinstance(error, ValueError) and f"it has {family.blocks}" in str(error)
            report(names, f"{label} layers j7: patch_model raised {error!r}")
            report(smoke.no_hooks(case.model), f"{label}: no hooks left at the end")
        report(patcher.model_options == options, f"{label}: plain patcher's model_options untouched")
