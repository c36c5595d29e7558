"""One Forge-family SEG pass: the host's post-CFG function and model-function wrapper around a SEG step.

What is specific to the ComfyUI-style patcher hosts here, and only that: which denoiser step a call belongs to and
whether it is inside the window (:class:`DenoiserClock` on the WebUIs, :class:`SigmaClock` on ComfyUI), the first
model call of a step as the main call (``model_function_wrapper`` args), the rows appended to it and replayed
through the host's own cond-only batching (:mod:`lib_seg.forge.rows`), the host's memory estimate, and the
cond-only pass through the host's batching.  The window test, the blur of the SEG rows (module hooks or attn1
patches: the target decides), the prefix gate, the out-of-memory fallback and the combination are the step's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lib_seg.forge import host as forge_host
from lib_seg.forge import rows as forge_rows
from lib_seg.forge.patches import sampling_progress
from lib_seg.step import SegStep

log = logging.getLogger("sd_webui_seg")
SEG_MARK = "_sd_webui_seg_post_cfg"


@dataclass(frozen=True)
class DenoiserClock:
    """The WebUIs: the step is the host's denoiser counter ``p.sampler.model_wrap_cfg.step`` (see
    :mod:`lib_seg.forge.adapter`), the window a fraction of the pass's steps."""

    denoiser: Any

    def step(self, _sigma: torch.Tensor) -> int | None:
        step = getattr(self.denoiser, "step", None)
        return step if isinstance(step, int) else None

    def in_window(self, seg: SegStep, transformer_options: Mapping, sigma: torch.Tensor) -> bool:
        if seg.always:
            return True
        return seg.in_window(sampling_progress(self.denoiser, transformer_options, sigma))

    def advance(self) -> None:
        """The host counts its own steps."""


@dataclass
class SigmaClock:
    """ComfyUI: no step counter reaches a model patch.  A step is one denoiser evaluation: SEG's post-CFG function
    runs once at its end (:meth:`advance`), and every model call of the evaluation shares its noise level, so
    ``(evaluations so far, sigma)`` tells the evaluation's first call (the main one) from a later call at the same
    sigma (another node's extra pass) and from the next evaluation, even at an equal sigma.  The window is a sigma
    range, ``sigma_end <= sigma <= sigma_start``, from the model's ``percent_to_sigma`` as ComfyUI's own guidance
    nodes convert their start/end percent."""

    sigma_start: float
    sigma_end: float
    evaluations: int = 0

    def step(self, sigma: torch.Tensor) -> tuple[int, float]:
        return self.evaluations, float(sigma.flatten()[0])

    def in_window(self, _seg: SegStep, _transformer_options: Mapping, sigma: torch.Tensor) -> bool:
        return self.sigma_end <= float(sigma.flatten()[0]) <= self.sigma_start

    def advance(self) -> None:
        self.evaluations += 1


@dataclass
class SegPass:
    """SEG for one sampling pass on a Forge-family host.

    ``post_cfg`` is the host's post-CFG function.  ``model_wrapper`` (installed as the patcher's
    ``model_function_wrapper`` when the step batches rows and no other extension has one) appends the SEG
    rows to the first model call of each denoiser step; ``post_cfg`` then replays them through the host's
    batching or, when the step was not batched, makes the separate cond-only pass.
    """

    kind: str
    seg: SegStep
    clock: DenoiserClock | SigmaClock
    kept: forge_rows.KeptRows | None = None
    seen_step: Hashable | None = None

    def in_window(self, transformer_options: Mapping, sigma: torch.Tensor) -> bool:
        return self.clock.in_window(self.seg, transformer_options, sigma)

    def model_wrapper(self, apply_model: Callable, args: Mapping) -> torch.Tensor:
        def unbatched() -> torch.Tensor:
            return apply_model(args["input"], args["timestep"], **args["c"])

        call = self._batched_call(apply_model, args)
        if call is None:
            return unbatched()

        def batched(options: dict) -> torch.Tensor:
            return apply_model(call.input, call.timestep, **{**call.c, "transformer_options": options})

        out, ran = self.seg.main_call(batched, call.layout, call.c["transformer_options"], unbatched)
        if not ran:
            return out
        chunk_shape = call.input[: call.chunk_rows].shape
        self.kept = forge_rows.KeptRows(self.seen_step, chunk_shape, out[call.main_rows :])
        return out[: call.main_rows]

    def _batched_call(self, apply_model: Callable, args: Mapping) -> forge_rows.BatchedCall | None:
        """Only the first model call of a step is the main pass (other passes come after it)."""
        step = self.clock.step(args["timestep"])
        if not self.seg.batch_rows or step is None or step == self.seen_step:
            return None
        self.seen_step = step
        if not self.in_window(args["c"].get("transformer_options") or {}, args["timestep"]):
            return None
        flags, x = args["cond_or_uncond"], args["input"]
        extra = len(forge_rows.cond_chunks(flags)) * (x.shape[0] // max(len(flags), 1))
        model = getattr(apply_model, "__self__", None)
        if not extra or not forge_host.extra_rows_allowed(self.kind):
            return None
        if not forge_host.fits_in_memory(self.kind, model, (x.shape[0] + extra, *x.shape[1:]), x.device):
            return None
        return forge_rows.batched_call(args)

    def post_cfg(self, args: dict) -> torch.Tensor:
        try:
            return self._post_cfg(args)
        finally:
            self.clock.advance()

    def _post_cfg(self, args: dict) -> torch.Tensor:
        denoised, options = args["denoised"], args["model_options"]
        kept, self.kept = self.kept, None
        if not self.in_window(options.get("transformer_options") or {}, args["sigma"]):
            return denoised
        cond_seg = None
        if kept is not None and kept.step == self.clock.step(args["sigma"]):
            try:
                replay = {**options, "model_function_wrapper": forge_rows.replay_wrapper(kept)}
                cond_seg = self._cond_pass(args, _without_control(args["cond"]), replay)
            except forge_rows.ReplayMismatch as mismatch:  # this pass's layout will not change: stop batching
                log.info("SEG: the host splits this pass's cond rows (%s); SEG makes its own model call", mismatch)
                self.seg.batch_rows = False
        if cond_seg is None:
            separate = _without_seg_wrapper(options)
            cond_seg = self.seg.separate_call(
                lambda seg_options: self._cond_pass(
                    args, args["cond"], {**separate, "transformer_options": seg_options}
                ),
                separate.get("transformer_options") or {},
            )
        return self.seg.combine(denoised, args["cond_denoised"], cond_seg)

    def _cond_pass(self, args: dict, cond: Any, options: dict) -> torch.Tensor:
        return forge_host.cond_only_pass(self.kind, args["model"], cond, args["input"], args["sigma"], options)


def _without_seg_wrapper(options: dict) -> dict:
    """The separate pass must not batch SEG rows into itself: no SEG model-function wrapper."""
    if getattr(options.get("model_function_wrapper"), SEG_MARK, False):
        options = {key: value for key, value in options.items() if key != "model_function_wrapper"}
    return options


def _without_control(cond: list) -> list:
    """Cond entries without ControlNet: a replay runs no UNet, so it needs no control residuals."""
    return [{key: value for key, value in entry.items() if key != "control"} for entry in cond]
