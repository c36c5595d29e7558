"""AUTOMATIC1111 (1.9-1.10) adapter: translates the host's objects into core calls.

How SEG runs on A1111 (interfaces read from v1.10.1 ``modules/sd_samplers_cfg_denoiser.py``):

* ``process_before_every_sampling`` attaches a :class:`SegRun` to the sampler's ``CFGDenoiser``
  (``p.sampler.model_wrap_cfg``) and wraps that *instance's* ``combine_denoised``.  txt2img makes a
  new denoiser per batch and for the hires pass, img2img reuses one, so attaching is idempotent.
* The ``cfg_denoiser`` callback hands us the rows the main pass uses: cond rows first (one per AND
  sub-prompt), with their x, sigma, image-cond and text cond.  We keep the cond rows.
* Inside ``combine_denoised`` (before the inpaint mask blend, so masked areas stay protected) we run
  one extra ``inner_model`` call on those cond rows with the queries of the chosen attn1 layers
  blurred, and add ``seg_scale * sum_w w (cond - cond_seg)`` per image.  Being a separate call, it
  does not care how the main pass was batched (batch_cond_uncond, prompt lengths, skipped uncond).
* Batched mode (``batch_rows``, when the host batches cond and uncond in one call of equal token
  length): the callback inserts the SEG rows between the cond and the uncond rows instead, the
  inner model's call blurs only those rows, and with ``prefix_reuse`` the blocks before the first
  blurred one compute them once (:mod:`lib_seg.unet.prefix`).  Anything else uses the separate call,
  and so does a batched call that runs out of memory: the main call is redone without the SEG rows and
  this step's SEG comes from the separate call, as do the pass's later steps.
* SD3 (``sd_model.is_sd3``, an MMDiT at ``sd_model.model.diffusion_model``) runs the same two paths:
  the network is a :mod:`lib_seg.targets` target, which blurs UNet attn1 layers through
  :mod:`lib_seg.unet.hooks` or DiT blocks through :mod:`lib_seg.dit.hooks` (A1111's SD3 sampler
  is the same ``CFGDenoiser``, with ``DictWithShape`` conds like SDXL's).
* Errors (bad settings, layers the model lacks) are raised from inside sampling: A1111 only logs
  exceptions from script hooks, but one from the denoiser fails the request with the message.
No host module is imported at module level; the script passes host objects in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lib_seg import step, targets
from lib_seg.a1111.host import (  # noqa: F401 - the adapter's public names
    cond_rows,
    condition_dict,
    crossattn,
    custom_unet,
    diffusion_model,
    doubled,
    layer_text,
    query_target,
    unsupported_reason,
)
from lib_seg.core import rows, schedule
from lib_seg.core.params import SegParams
from lib_seg.core.skips import SkipCallback
from lib_seg.step import RowLayout, SegStep

log = logging.getLogger("sd_webui_seg")

RUN_ATTR = "_seg_run"
WRAPPED_ATTR = "_seg_wrapped_combine"
WRAPPED_FORWARD_ATTR = "_seg_wrapped_forward"
ERROR_ATTR = "_seg_raises"


@dataclass
class BatchedStep:
    """This step's SEG rows are ``n_cond .. 2 n_cond`` of the main call (``rows`` or ``rows - uncond``)."""

    n_cond: int
    rows: tuple[int, ...]
    ran: bool = False  # set once the main call really blurred the SEG rows

    def layout(self, total: int) -> RowLayout:
        n = self.n_cond
        drop, expand = partial(rows.without_seg_rows, n_cond=n), partial(rows.with_seg_rows, n_cond=n)
        return RowLayout(total, slice(n, 2 * n), drop, expand)


@dataclass
class SegRun:
    """SEG for one sampling pass: validated settings, or the error to raise inside sampling.

    The step itself (window, blur, prefix, out-of-memory fallback, combination) is :class:`lib_seg.step.SegStep`,
    one per network (the refiner may swap it mid-run); this class translates A1111's denoiser objects."""

    params: SegParams | None
    is_hr_pass: bool = False
    error: Exception | None = None
    batch_rows: bool = False
    prefix_reuse: bool = True
    on_skip: SkipCallback | None = None  # None: the target's warner
    captured: tuple | None = None
    batched: BatchedStep | None = None
    wrapped_models: list = field(default_factory=list)
    _steps: dict = field(default_factory=dict)

    def capture(self, denoiser_params: Any) -> None:
        """``cfg_denoiser`` callback: keep the cond rows of the main pass (they come first), and in
        batched mode add the SEG rows to it (the host reads x, sigma, image_cond, text_cond back)."""
        dp = denoiser_params
        n = cond_rows(dp.text_cond)
        self.captured = (dp.x[:n], dp.sigma[:n], dp.image_cond[:n], dp.text_cond)
        self.batched = None
        if self.error is not None or not self.batch_rows or not self._batchable(dp) or not self.active(dp.denoiser):
            return
        uncond = dp.x.shape[0] - n
        dp.x, dp.sigma, dp.image_cond = (rows.with_seg_rows(t, n) for t in (dp.x, dp.sigma, dp.image_cond))
        dp.text_cond = doubled(dp.text_cond)
        self.batched = BatchedStep(n, (2 * n + uncond, 2 * n))
        if _wrap_inner_forward(dp.denoiser):
            self.wrapped_models.append(dp.denoiser.inner_model)

    @staticmethod
    def _batchable(dp: Any) -> bool:
        """One main call holds every row only when cond and uncond have the same token count."""
        uncond = getattr(dp, "text_uncond", None)
        return uncond is not None and crossattn(dp.text_cond).shape[1:] == crossattn(uncond).shape[1:]

    def step_for(self, target: targets.QueryTarget) -> SegStep:
        """The step on the network in use now; raises ``ValueError`` when it lacks the chosen layers."""
        key = id(target.model)
        if key not in self._steps:
            self._steps[key] = step.prepare(
                target,
                self.params.layers,
                self.setting,
                self.window,
                prefix_reuse=self.prefix_reuse,
                on_skip=self.on_skip,
            )
            self.on_skip = self._steps[key].on_skip  # one warning per layer across the pass's networks
        return self._steps[key]

    def layers_for(self, target: targets.QueryTarget) -> tuple:
        return self.step_for(target).keys

    @property
    def setting(self) -> tuple[float, float] | None:
        return self.params.for_pass(self.is_hr_pass) if self.params else None

    @property
    def window(self) -> tuple[float, float]:
        return self.params.start, self.params.end

    def active(self, denoiser: Any) -> bool:
        if self.error is not None:
            raise self.error
        if self.setting is None:
            return False
        return step.in_window(self.window, schedule.progress(denoiser.step, denoiser.total_steps or 0))

    def main_call(self, denoiser: Any, original, x: torch.Tensor, sigma: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The batched main ``inner_model`` call: the step blurs the SEG rows; on OOM the main call is redone
        without them and this pass goes on with the separate call."""
        batched, layout = self.batched, self.batched.layout(x.shape[0])
        seg = self.step_for(query_target(denoiser.p.sd_model))

        def slim() -> torch.Tensor:
            return _without_the_seg_rows(original, layout, x, sigma, kwargs)

        out, batched.ran = seg.main_call(lambda _options: original(x, sigma, **kwargs), layout, {}, slim)
        self.batch_rows = self.batch_rows and batched.ran
        return out

    def seg_prediction(self, denoiser: Any, seg: SegStep) -> torch.Tensor:
        """One extra ``inner_model`` call on the cond rows with blurred queries."""
        if self.captured is None:
            raise RuntimeError("SEG: the cfg_denoiser callback did not run; is the script loaded?")
        x, sigma, image_cond, text_cond = self.captured
        return seg.separate_call(
            lambda _options: denoiser.inner_model(x, sigma, cond=condition_dict(text_cond, image_cond)), {}
        )

    def combine(self, denoiser: Any, denoised: torch.Tensor, x_out: torch.Tensor, conds_list: Sequence) -> torch.Tensor:
        batched, self.batched = self.batched, None
        if batched is None and not self.active(denoiser):  # a batch the host split up still gets SEG
            return denoised
        seg = self.step_for(query_target(denoiser.p.sd_model))
        if batched is not None and batched.ran:
            n = batched.n_cond
            return seg.combine(denoised, x_out[:n], x_out[n : 2 * n], conds_list)
        cond_seg = self.seg_prediction(denoiser, seg)
        return seg.combine(denoised, x_out[: cond_seg.shape[0]], cond_seg, conds_list)


def _without_the_seg_rows(original, layout: RowLayout, x: torch.Tensor, sigma: torch.Tensor, kwargs: dict):
    """The main call without the SEG rows; they come back as unblurred copies of the cond rows, which
    nothing reads (the host reads the cond rows from the front and the uncond rows from the end, and
    :meth:`SegRun.combine` makes the separate call since ``ran`` stays False)."""
    slim = partial(rows.map_rows, rows=layout.total, fn=layout.drop)
    return layout.expand(original(slim(x), slim(sigma), **slim(kwargs)))


def _wrap_inner_forward(denoiser: Any) -> bool:
    """Blur the SEG rows during the main ``inner_model`` call of a batched step (wrapped once;
    the refiner switch replaces the inner model, hence the check every step)."""
    model_wrap = denoiser.inner_model
    if hasattr(model_wrap.forward, WRAPPED_FORWARD_ATTR):
        return False
    original = model_wrap.forward

    def forward(x, sigma, **kwargs):
        run = getattr(denoiser, RUN_ATTR, None)
        step = run.batched if run is not None else None
        if step is None or x.shape[0] not in step.rows:
            return original(x, sigma, **kwargs)
        return run.main_call(denoiser, original, x, sigma, kwargs)

    setattr(forward, WRAPPED_FORWARD_ATTR, original)
    model_wrap.forward = forward
    return True


def _seg_combine_denoised(denoiser: Any):
    wrapped = denoiser.combine_denoised

    def combine_denoised(x_out, conds_list, uncond, cond_scale):
        denoised = wrapped(x_out, conds_list, uncond, cond_scale)
        run = getattr(denoiser, RUN_ATTR, None)
        return denoised if run is None else run.combine(denoiser, denoised, x_out, conds_list)

    setattr(combine_denoised, WRAPPED_ATTR, wrapped)
    return combine_denoised


def attach(denoiser: Any, run: SegRun) -> None:
    """Give ``denoiser`` (a ``CFGDenoiser``) this run; wrap its ``combine_denoised`` once.

    A run that carries an error makes the denoiser's first call raise it, before any UNet work.
    """
    if not hasattr(denoiser.combine_denoised, WRAPPED_ATTR):
        denoiser.combine_denoised = _seg_combine_denoised(denoiser)
    setattr(denoiser, RUN_ATTR, run)
    _drop_raiser(denoiser)
    if run.error is not None:
        denoiser.forward = _raiser(run.error)


def _raiser(error: Exception):
    def forward(*_args, **_kwargs):
        raise error

    setattr(forward, ERROR_ATTR, True)
    return forward


def _drop_raiser(denoiser: Any) -> None:
    if hasattr(vars(denoiser).get("forward"), ERROR_ATTR):
        del denoiser.forward


def detach(denoiser: Any) -> None:
    """Undo :func:`attach` (restores whatever ``combine_denoised`` was there before)."""
    if denoiser is None:
        return
    current = vars(denoiser).get("combine_denoised")
    if current is not None and hasattr(current, WRAPPED_ATTR):
        original = getattr(current, WRAPPED_ATTR)
        if getattr(original, "__self__", None) is denoiser and original.__func__ is type(denoiser).combine_denoised:
            del denoiser.combine_denoised
        else:
            denoiser.combine_denoised = original
    _drop_raiser(denoiser)
    run = vars(denoiser).pop(RUN_ATTR, None)
    for model_wrap in run.wrapped_models if run is not None else ():
        if hasattr(vars(model_wrap).get("forward"), WRAPPED_FORWARD_ATTR):
            del model_wrap.forward


def on_cfg_denoiser(denoiser_params: Any) -> None:
    """Global ``on_cfg_denoiser`` callback; only denoisers we attached to are looked at."""
    run = getattr(getattr(denoiser_params, "denoiser", None), RUN_ATTR, None)
    if run is not None:
        run.capture(denoiser_params)
