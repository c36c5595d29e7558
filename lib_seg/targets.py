"""The network SEG blurs, behind one interface: a UNet (attn1 layers) or a DiT (transformer blocks).

The adapters ask a target four things: which layers the loaded model has, which of them a spec
selects, what infotext records, and a context manager in which one call of the model blurs the chosen
queries.  A UNet answers with :mod:`lib_seg.core.layers` and :mod:`lib_seg.unet.hooks` (A1111's path; the
Forge family patches attn1 instead), a DiT with :mod:`lib_seg.dit`.  The same spec text means
different layers on each: ``d4`` is UNet input block 4 but Flux double block 4; the loaded model decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import cached_property
from typing import Any

from torch import nn

from lib_seg.core import blocks as dit_layers
from lib_seg.core import layers, skips
from lib_seg.core.skips import SkipCallback
from lib_seg.dit import hooks as dit_hooks
from lib_seg.dit import prefix as dit_prefix
from lib_seg.unet import hooks as unet_hooks
from lib_seg.unet import prefix as unet_prefix


class QueryTarget:
    """What every target shares: the module, and :meth:`blurring`, the one way :mod:`lib_seg.step` blurs a call."""

    records_block_grid = False  # the Forge-family patcher must carry the block modifier that records each grid

    def __init__(self, model: nn.Module):
        self.model = model

    def blurred(self, keys: Iterable, sigma: float, rows: slice | None = None, on_skip=None) -> AbstractContextManager:
        raise NotImplementedError

    @contextmanager
    def blurring(
        self, keys: Iterable, sigma: float, rows: slice | None, on_skip: SkipCallback | None, options: dict
    ) -> Iterator[dict]:
        """Within the block, a call of the model with the yielded transformer options blurs the queries of
        ``keys`` (batch ``rows`` only, if given).  Module-hook targets yield ``options`` unchanged; a target
        that blurs through the host's patches yields a copy that carries them."""
        with self.blurred(keys, sigma, rows, on_skip):
            yield options


class UnetTarget(QueryTarget):
    """An ldm/sgm UNet; layers are :class:`lib_seg.core.layers.LayerKey`."""

    @cached_property
    def available(self) -> tuple:
        return layers.unet_layers(self.model)

    def resolve(self, spec: str) -> tuple:
        return layers.resolve_layers(spec, self.available)

    def canonical(self, spec: str) -> str:
        return layers.canonical_spec(spec, self.available)

    def blurred(self, keys: Iterable, sigma: float, rows: slice | None = None, on_skip=None) -> AbstractContextManager:
        return unet_hooks.blurred_queries(self.model, keys, sigma, rows, on_skip)

    def skip_warner(self) -> SkipCallback:
        return unet_hooks.skip_warner()

    def shared_prefix(self, keys: Iterable, total_rows: int, main_rows: int, drop, expand) -> AbstractContextManager:
        """Compute the SEG rows of the blocks before the first chosen layer once (see ``batching``)."""
        return unet_prefix.shared_prefix(self.model, keys, total_rows, main_rows, drop, expand)

    def prefix_pays(self, seg_rows: int) -> bool:
        return unet_prefix.prefix_pays(seg_rows)


class DitTarget(QueryTarget):
    """A diffusion transformer of a family :mod:`lib_seg.dit.families` knows; layers are
    :class:`lib_seg.core.blocks.DitLayer`."""

    @cached_property
    def available(self) -> tuple:
        return dit_hooks.available_layers(self.model)

    @cached_property
    def default(self) -> str:
        """What ``middle`` selects on this model (its family's default, resolved to its blocks)."""
        return dit_hooks.default_spec(self.model)

    def resolve(self, spec: str) -> tuple:
        return dit_layers.resolve_layers(spec, self.available, self.default)

    def canonical(self, spec: str) -> str:
        return dit_layers.canonical_spec(spec, self.available, self.default)

    def blurred(self, keys: Iterable, sigma: float, rows: slice | None = None, on_skip=None) -> AbstractContextManager:
        return dit_hooks.blurred_dit_queries(self.model, keys, sigma, rows, on_skip)

    def skip_warner(self) -> SkipCallback:
        return skips.skip_warner(dit_layers.format_layers)

    def shared_prefix(self, keys: Iterable, total_rows: int, main_rows: int, drop, expand) -> AbstractContextManager:
        return dit_prefix.shared_prefix(self.model, keys, total_rows, main_rows, drop, expand)

    def prefix_pays(self, seg_rows: int) -> bool:
        """A DiT block is heavy and the prefix needs one hook per block: it pays from one SEG row
        (``docs/benchmarks.md``, DiT table)."""
        return True


def query_target(model: Any, unet_target: Callable[[nn.Module], QueryTarget] | None = None) -> QueryTarget | None:
    """The target for a diffusion model module, or None when SEG cannot blur it.

    ``unet_target``: how this host blurs a UNet (default :class:`UnetTarget`, module hooks; the Forge family
    passes its attn1-patch target)."""
    unet = unet_hooks.as_ldm_unet(model)
    if unet is not None:
        return (unet_target or UnetTarget)(unet)
    if dit_hooks.dit_family(model) is not None:
        return DitTarget(model)
    return None
