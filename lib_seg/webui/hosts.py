"""The one protocol the WebUI script talks to: which WebUI runs us, and what SEG does around its sampling.

A WebUI adapter answers three questions of the script (``scripts/seg.py``), which then knows no host:

* :meth:`WebuiAdapter.prepare` (``process``): can SEG run on this job's model, and which layers does it
  blur (for the infotext, when known before sampling)?
* :meth:`WebuiAdapter.before_sampling` (``process_before_every_sampling``, every pass incl. hires): install SEG
  for the pass, or the error to raise inside it; returns the layer text when the adapter learns it only now.
* :meth:`WebuiAdapter.after_sampling` (``postprocess``): undo what was installed on long-lived objects.

:class:`A1111` wraps :mod:`lib_seg.a1111.adapter`, :class:`Forge` the Forge family's :mod:`lib_seg.forge.adapter`
(Forge 2.x, Neo, reForge, classic Forge and Forge Classic).  Host modules are imported only inside methods.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from lib_seg.core.params import SegParams
from lib_seg.webui import ui as seg_ui

log = logging.getLogger("sd_webui_seg")


class WebuiAdapter(Protocol):
    def prepare(self, p: Any, params: SegParams) -> tuple[SegParams | None, Exception | None, str | None]: ...

    def before_sampling(
        self, p: Any, params: SegParams | None, error: Exception | None, opts: Any, cmd_opts: Any
    ) -> str | None: ...

    def after_sampling(self, p: Any) -> None: ...


def _denoiser(p: Any) -> Any:
    return getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)


class A1111:
    """AUTOMATIC1111: checks the model before sampling, attaches a SEG run to the sampler's ``CFGDenoiser``."""

    def prepare(self, p: Any, params: SegParams) -> tuple[SegParams | None, Exception | None, str | None]:
        from lib_seg.a1111 import adapter as a1111

        reason = a1111.unsupported_reason(p.sd_model, a1111.custom_unet())
        if reason:
            log.warning("SEG is off for this model: %s", reason)
            return None, None, None
        try:
            return params, None, a1111.layer_text(p.sd_model, params.layers)
        except ValueError as exc:
            return None, exc, None

    def before_sampling(
        self, p: Any, params: SegParams | None, error: Exception | None, opts: Any, cmd_opts: Any
    ) -> str | None:
        from lib_seg.a1111 import adapter as a1111

        denoiser = _denoiser(p)
        if denoiser is not None:
            batch_rows = seg_ui.batch_rows_allowed(opts, cmd_opts, bool(getattr(p.sd_model, "is_sdxl", False)))
            hr = bool(getattr(p, "is_hr_pass", False))
            a1111.attach(denoiser, a1111.SegRun(params, is_hr_pass=hr, error=error, batch_rows=batch_rows))
        return None

    def after_sampling(self, p: Any) -> None:
        from lib_seg.a1111 import adapter as a1111

        a1111.detach(_denoiser(p))


class Forge:
    """The Forge family: SEG goes on a clone of the job's UNet patcher before each pass; nothing to undo."""

    def __init__(self, adapter: Any):
        self.adapter = adapter

    def prepare(self, p: Any, params: SegParams) -> tuple[SegParams | None, Exception | None, str | None]:
        return params, None, None  # the patcher's model is known only when sampling starts

    def before_sampling(
        self, p: Any, params: SegParams | None, error: Exception | None, opts: Any, cmd_opts: Any
    ) -> str | None:
        batch_rows = bool(getattr(opts, seg_ui.BATCH_ROWS_SETTING, True))
        return self.adapter.patch_unet(p, params, error, batch_rows)

    def after_sampling(self, p: Any) -> None:
        return None


def webui_adapter() -> WebuiAdapter:
    """The Forge-family adapter when this WebUI is one of them, else A1111's."""
    try:
        from lib_seg.forge import adapter as forge
    except ImportError:  # pragma: no cover - lib_seg.forge imports nothing host-specific
        return A1111()
    return Forge(forge) if forge.host_kind() else A1111()


def on_cfg_denoiser(denoiser_params: Any) -> None:
    """The WebUI's global ``on_cfg_denoiser`` callback: A1111's SEG run keeps the main pass's cond rows there
    (the Forge family never attaches a run, so nothing happens on it)."""
    from lib_seg.a1111 import adapter as a1111

    a1111.on_cfg_denoiser(denoiser_params)
