"""Reporting a chosen layer SEG could not blur: one warning per layer that names it, never a silent no-op.

A layer is skipped when its queries fit no token grid of the image (HyperTile tiles, random token merging),
when a DiT family cannot place the image tokens in its call (``reason`` says why), or when a chosen block's
attention never reached SEG.  Every target reports through one :data:`SkipCallback`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sd_webui_seg")

SkipCallback = Callable[..., None]  # (layer, n_tokens, grid=None, reason=None)


def skip_warner(format_keys: Callable[[list], str]) -> SkipCallback:
    """A callback that warns once per layer whose queries stay unblurred.

    ``format_keys`` names the layer (UNet layers or DiT blocks).  ``reason``: why the layer's tokens could not
    be placed, when the caller knows (a DiT family says e.g. that the model's position ids contradict the
    grid); else the usual suspects are named."""
    warned: set = set()

    def on_skip(key: Any, n_tokens: int, grid: tuple[int, int] | None = None, reason: str | None = None) -> None:
        if key in warned:
            return
        warned.add(key)
        if reason is not None:
            log.warning("SEG: %s is left unblurred: %s (%d queries)", format_keys([key]), reason, n_tokens)
            return
        block = f" (its block's map is {grid[0]}x{grid[1]})" if grid else ""
        log.warning(
            "SEG: %s sees %d queries, which fit no token grid of this image%s (HyperTile tiles, "
            "random token merging?); its queries are left unblurred",
            format_keys([key]),
            n_tokens,
            block,
        )

    return on_skip
