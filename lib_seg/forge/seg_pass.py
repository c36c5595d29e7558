"""One Forge-family SEG pass: the post-CFG function and the model-function wrapper, over validated settings."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lib_seg import targets
from lib_seg.core import batching, guidance, query_hooks, schedule
from lib_seg.core.rows import OUT_OF_MEMORY
from lib_seg.forge import host as forge_host
from lib_seg.forge import rows as forge_rows
from lib_seg.forge.patches import SkipCallback, attn1_patch, sampling_progress, with_attn1_replaces

log = logging.getLogger("sd_webui_seg")
SEG_MARK = "_sd_webui_seg_post_cfg"


@dataclass
class SegPass:
    """SEG for one sampling pass: validated settings, the attn1 patches, and the rows of this step.

    ``post_cfg`` is the host's post-CFG function.  ``model_wrapper`` (installed as the patcher's
    ``model_function_wrapper`` when ``batch_rows`` and no other extension has one) appends the SEG
    rows to the first UNet call of each denoiser step; ``post_cfg`` then replays them through the
    host's batching (:mod:`lib_seg.forge.rows`) or, when the step was not batched, makes the separate
    cond-only pass.  An attn1 replace already registered for a key (StyleAlign, Reference-only, SAG)
    is called with the blurred queries instead of the host attention in the separate pass, so the SEG
    pass keeps that extension's effect and the guidance holds only the blur (such steps are never
    batched).

    ``dit``: on a diffusion transformer (a :class:`lib_seg.targets.DitTarget`) no attn1 patch exists; the
    same two paths arm the family's hooks on the transformer for the call instead (:mod:`lib_seg.dit.hooks`),
    blurring only the SEG rows in the batched call.
    """

    kind: str
    keys: tuple
    seg_scale: float
    sigma: float
    window: tuple[float, float]
    denoiser: Any
    batch_rows: bool = False
    prefix_reuse: bool = True
    on_skip: SkipCallback | None = None  # None: warn once per layer
    kept: forge_rows.KeptRows | None = None
    seen_step: int | None = None
    dit: targets.DitTarget | None = None

    def __post_init__(self) -> None:
        if self.on_skip is None:
            self.on_skip = self.dit.skip_warner() if self.dit is not None else query_hooks.skip_warner()
        if self.dit is not None:
            self.patches = {}
        else:
            self.patches = {tuple(key): attn1_patch(self.kind, key, self.sigma, self.on_skip) for key in self.keys}

    def step(self) -> int | None:
        step = getattr(self.denoiser, "step", None)
        return step if isinstance(step, int) else None

    def in_window(self, transformer_options: Mapping, sigma: torch.Tensor) -> bool:
        start, end = self.window
        if start <= 0.0 and end >= 1.0:
            return True
        fraction = sampling_progress(self.denoiser, transformer_options, sigma)
        if fraction is None:
            raise RuntimeError("SEG: this host does not tell the sampling progress; set start 0 and end 1")
        return schedule.in_window(fraction, start, end)

    def model_wrapper(self, apply_model: Callable, args: Mapping) -> torch.Tensor:
        call = self._batched_call(apply_model, args)
        if call is None:
            return apply_model(args["input"], args["timestep"], **args["c"])
        try:
            with self._blurring_seg_rows(apply_model, call):
                out = apply_model(call.input, call.timestep, **call.c)
        except OUT_OF_MEMORY:  # the estimate was optimistic: this pass goes on without extra rows
            self.batch_rows = False
            log.warning("SEG: out of memory with the SEG rows in the main UNet call; SEG makes its own call now")
            return apply_model(args["input"], args["timestep"], **args["c"])
        chunk_shape = call.input[: call.chunk_rows].shape
        self.kept = forge_rows.KeptRows(self.seen_step, chunk_shape, out[call.main_rows :])
        return out[: call.main_rows]

    def _blurring_seg_rows(self, apply_model: Callable, call: forge_rows.BatchedCall) -> AbstractContextManager:
        """What blurs the SEG rows of a batched call: the attn1 patches already in ``call`` (UNet, plus
        prefix reuse), or hooks on the transformer's blocks for those rows plus the DiT prefix reuse."""
        if self.dit is None:
            return self._shared_prefix(apply_model, call)
        stack = ExitStack()
        stack.enter_context(self.dit.blurred(self.keys, self.sigma, slice(call.main_rows, None), self.on_skip))
        total = call.input.shape[0]
        if self.prefix_reuse and "forward" not in vars(self.dit.model) and self.dit.prefix_pays(total - call.main_rows):
            stack.enter_context(self.dit.shared_prefix(self.keys, total, call.main_rows, call.drop, call.expand))
        return stack

    def _shared_prefix(self, apply_model: Callable, call: forge_rows.BatchedCall):
        """Prefix reuse (:mod:`lib_seg.core.batching`) unless it does not pay (one SEG row), the UNet's forward is
        patched on the instance, or another extension modifies layers inside blocks
        (``block_inner_modifiers`` see every row)."""
        unet = query_hooks.as_ldm_unet(getattr(getattr(apply_model, "__self__", None), "diffusion_model", None))
        inner_modifiers = call.c["transformer_options"].get("block_inner_modifiers")
        total = call.input.shape[0]
        pays = batching.prefix_pays(total - call.main_rows)
        if not self.prefix_reuse or not pays or unet is None or "forward" in vars(unet) or inner_modifiers:
            return nullcontext()
        return batching.shared_prefix(unet, self.keys, total, call.main_rows, call.drop, call.expand)

    def _batched_call(self, apply_model: Callable, args: Mapping) -> forge_rows.BatchedCall | None:
        """Only the first UNet call of a step is the main pass (other passes come after it)."""
        step = self.step()
        if not self.batch_rows or step is None or step == self.seen_step:
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
        return forge_rows.batched_call(args, self.patches)

    def post_cfg(self, args: dict) -> torch.Tensor:
        denoised, options = args["denoised"], args["model_options"]
        kept, self.kept = self.kept, None
        if not self.in_window(options.get("transformer_options") or {}, args["sigma"]):
            return denoised
        cond_seg = None
        if kept is not None and kept.step == self.step():
            try:
                replay = {**options, "model_function_wrapper": forge_rows.replay_wrapper(kept)}
                cond_seg = self._cond_pass(args, _without_control(args["cond"]), replay)
            except forge_rows.ReplayMismatch as mismatch:  # this pass's layout will not change: stop batching
                log.info("SEG: the host splits this pass's cond rows (%s); SEG makes its own UNet call", mismatch)
                self.batch_rows = False
        if cond_seg is None:
            with self._blurring_separate_pass():
                cond_seg = self._cond_pass(args, args["cond"], self._separate_options(options))
        return guidance.apply_seg(denoised, args["cond_denoised"], cond_seg, self.seg_scale)

    def _blurring_separate_pass(self) -> AbstractContextManager:
        """DiT: every row of the separate pass is a SEG row (UNet: the attn1 patches in its options)."""
        return nullcontext() if self.dit is None else self.dit.blurred(self.keys, self.sigma, on_skip=self.on_skip)

    def _separate_options(self, options: dict) -> dict:
        """The options of the separate pass: our attn1 patches (UNet; a DiT is blurred by hooks), and no
        SEG model-function wrapper (that pass must not batch SEG rows into itself)."""
        if self.dit is not None:
            seg_options = dict(options)
        else:
            seg_options = with_attn1_replaces(options, self._step_patches(options))
        if getattr(seg_options.get("model_function_wrapper"), SEG_MARK, False):
            del seg_options["model_function_wrapper"]
        return seg_options

    def _step_patches(self, options: dict) -> dict:
        """Our attn1 patches, each wrapping an attn1 replace another extension registered for its key."""
        existing = ((options.get("transformer_options") or {}).get("patches_replace") or {}).get("attn1") or {}
        step_patches = {}
        for key, patch in self.patches.items():
            inner = existing.get(key) or existing.get(key[:2])
            step_patches[key] = patch if inner is None else attn1_patch(self.kind, key, self.sigma, self.on_skip, inner)
        return step_patches

    def _cond_pass(self, args: dict, cond: Any, options: dict) -> torch.Tensor:
        return forge_host.cond_only_pass(self.kind, args["model"], cond, args["input"], args["sigma"], options)


def _without_control(cond: list) -> list:
    """Cond entries without ControlNet: a replay runs no UNet, so it needs no control residuals."""
    return [{key: value for key, value in entry.items() if key != "control"} for entry in cond]
