"""One SEG step, the same on every host: when it runs, where its rows ride, how it falls back, how it combines.

The split follows diffusers' guiders (prepare, run, combine, clean up), with the host-specific parts left to
the adapters, which only translate host objects:

* **prepare** — :class:`SegStep` holds the validated settings of one sampling pass and the network it blurs
  (a :mod:`lib_seg.targets` target: UNet attn1 layers by module hooks or by attn1 patches, DiT blocks).
* **window** — :meth:`SegStep.in_window` turns the host's sampling progress into "SEG this step or not".
* **run** — either the SEG rows ride in the host's main model call (:meth:`SegStep.main_call`: blur only those
  rows, compute the blocks before the first blurred one once for them when that pays, and on an out-of-memory
  error redo the main call without them and switch the rows off for the rest of the pass), or SEG makes its
  own cond-only call (:meth:`SegStep.separate_call`).  Both give the same ``cond_seg``.
* **combine** — :meth:`SegStep.combine`: ``denoised + seg_scale * (cond - cond_seg)``, per AND sub-prompt
  weight when the host composes prompts.
* **clean up** — every hook lives inside the ``with`` blocks here; nothing outlives a call.

Errors in the settings are raised by :func:`prepare` (a ``ValueError`` naming the field); the adapters raise
them from inside sampling, where the hosts fail the request with the message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lib_seg import targets
from lib_seg.core import guidance, schedule
from lib_seg.core.rows import OUT_OF_MEMORY, RowMap
from lib_seg.core.skips import SkipCallback

log = logging.getLogger("sd_webui_seg")

Call = Callable[[dict], torch.Tensor]  # runs the model with these transformer options


def whole_pass(window: tuple[float, float]) -> bool:
    """The window covers the whole pass (no progress needed)."""
    return window[0] <= 0.0 and window[1] >= 1.0


def in_window(window: tuple[float, float], progress: float | None) -> bool:
    """Whether a step gets SEG; ``progress`` is the host's fraction of sampling done (None: the host tells none)."""
    if whole_pass(window):
        return True
    if progress is None:
        raise RuntimeError("SEG: this host does not tell the sampling progress; set start 0 and end 1")
    return schedule.in_window(progress, *window)


@dataclass(frozen=True)
class RowLayout:
    """Where the SEG rows sit in a batched main call of ``total`` rows, and how to drop or re-add them."""

    total: int
    seg: slice
    drop: RowMap  # total rows -> the host's rows
    expand: RowMap  # the host's rows -> total rows (copies of the cond rows as the SEG rows)

    @property
    def seg_rows(self) -> int:
        return self.seg.stop - self.seg.start

    @property
    def main_rows(self) -> int:
        return self.total - self.seg_rows


@dataclass
class SegStep:
    """SEG for one sampling pass on one network (see the module docstring)."""

    target: targets.QueryTarget
    keys: tuple
    seg_scale: float
    sigma: float
    window: tuple[float, float] = (0.0, 1.0)
    batch_rows: bool = False
    prefix_reuse: bool = True
    on_skip: SkipCallback | None = None  # None: the target's warner (one warning per block)

    def __post_init__(self) -> None:
        if self.on_skip is None:
            self.on_skip = self.target.skip_warner()

    @property
    def always(self) -> bool:
        return whole_pass(self.window)

    def in_window(self, progress: float | None) -> bool:
        return in_window(self.window, progress)

    def main_call(
        self, call: Call, layout: RowLayout, options: dict, without_rows: Callable[[], Any]
    ) -> tuple[Any, bool]:
        """The host's main call with the SEG rows ``layout.seg`` blurred; on OOM, ``without_rows()``.

        Returns ``(call's output, True)``, or ``(without_rows(), False)`` after an out-of-memory error (the
        estimate was optimistic): the pass goes on with the separate call (``batch_rows`` is switched off),
        so the caller must take this step's ``cond_seg`` from :meth:`separate_call` then.
        """
        try:
            with ExitStack() as stack:
                seg_options = stack.enter_context(
                    self.target.blurring(self.keys, self.sigma, layout.seg, self.on_skip, options)
                )
                stack.enter_context(self._shared_prefix(layout, options))
                return call(seg_options), True
        except OUT_OF_MEMORY:
            self.batch_rows = False
            log.warning("SEG: out of memory with the SEG rows in the main model call; SEG makes its own call now")
            return without_rows(), False

    def _shared_prefix(self, layout: RowLayout, options: dict):
        """Compute the SEG rows of the blocks before the first blurred one once, unless that does not pay
        (the target says), the network's forward is patched on the instance, or another extension modifies
        layers inside blocks (Forge-family ``block_inner_modifiers`` see every row)."""
        model = self.target.model
        if (
            not self.prefix_reuse
            or "forward" in vars(model)
            or options.get("block_inner_modifiers")
            or not self.target.prefix_pays(layout.seg_rows)
        ):
            return nullcontext()
        return self.target.shared_prefix(self.keys, layout.total, layout.main_rows, layout.drop, layout.expand)

    def separate_call(self, call: Call, options: dict) -> torch.Tensor:
        """SEG's own call: every row is a SEG row."""
        with self.target.blurring(self.keys, self.sigma, None, self.on_skip, options) as seg_options:
            return call(seg_options)

    def combine(
        self,
        denoised: torch.Tensor,
        cond: torch.Tensor,
        cond_seg: torch.Tensor,
        conds_list: Sequence[Sequence[tuple[int, float]]] | None = None,
    ) -> torch.Tensor:
        """The guided prediction plus SEG; ``conds_list``: A1111's AND sub-prompt weights per image."""
        if conds_list is None:
            return guidance.apply_seg(denoised, cond, cond_seg, self.seg_scale)
        return guidance.apply_seg_composable(denoised, cond, cond_seg, conds_list, self.seg_scale)


def prepare(
    target: targets.QueryTarget,
    layers: str,
    setting: tuple[float, float],
    window: tuple[float, float] = (0.0, 1.0),
    **options: Any,
) -> SegStep:
    """A :class:`SegStep` for ``target``; raises ``ValueError`` naming ``layers`` when the model lacks them."""
    seg_scale, sigma = setting
    return SegStep(target, target.resolve(layers), seg_scale, sigma, window, **options)
