"""The attn1 replacement a Forge-family SEG pass registers, and the window progress it reads.

``patches_replace["attn1"]`` entries are called by the hosts' ``BasicTransformerBlock`` as
``patch(q, k, v, extra_options)`` with projected q/k/v; the block applies ``to_out`` itself.
Interfaces: classic Forge 4a9c8f32, new Forge dfdcbab, reForge 3b56b26 (see ``tests/support/forge_host.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from lib_seg import targets
from lib_seg.core import blur, geometry, layers, schedule
from lib_seg.core.skips import SkipCallback
from lib_seg.forge import host as forge_host
from lib_seg.forge import rows as forge_rows

Patch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def with_replaces(transformer_options: Mapping, patches: Mapping[tuple, Patch]) -> dict:
    """A copy of ``transformer_options`` with ``patches`` added to ``patches_replace["attn1"]``.

    Copy-on-write along the path only (transformer_options, patches_replace, attn1): the patcher's own
    dicts, shared by every later step and pass, stay untouched.
    """
    options = dict(transformer_options)
    replaces = dict(options.get("patches_replace") or {})
    replaces["attn1"] = {**(replaces.get("attn1") or {}), **patches}
    options["patches_replace"] = replaces
    return options


BLOCK_GRID = "seg_block_grid"


def record_block_grid(h: torch.Tensor, when: str, transformer_options: dict) -> torch.Tensor:
    """Block modifier: note the (H, W) of the map entering each UNet block, before the block runs.

    Classic and new Forge call ``transformer_options["block_modifiers"]`` as ``(h, "before", options)``
    just before each input, middle and output block, after Deep Shrink's input/output block patches
    resized ``h``, and their ``BasicTransformerBlock`` copies ``transformer_options`` into the attn1
    patch's ``extra_options``.  A block's SpatialTransformer sees the map the block got (ResBlocks keep
    the size, the Upsample comes after it), so the attn1 patch learns the true grid in every step.
    """
    if when == "before":
        transformer_options[BLOCK_GRID] = (int(h.shape[-2]), int(h.shape[-1]))
    return h


def token_grid(n_tokens: int, extra_options: Mapping) -> tuple[int, int] | None:
    """(h, w) of the tokens an attn1 patch sees, or None when no grid fits ``n_tokens``.

    Exact sources first: reForge's ``activations_shape`` (the SpatialTransformer's input), then the
    map recorded by :func:`record_block_grid` on classic and new Forge (right under Deep Shrink too).
    Without either, the UNet's ceil-halving chain is walked from the latent's ``original_shape``.  A
    count that fits none of them (token merging, HyperTile tiles) gives None: never a guess.
    """
    for exact in (extra_options.get("activations_shape"), extra_options.get(BLOCK_GRID)):
        if exact is not None and len(exact) >= 2:
            height, width = int(exact[-2]), int(exact[-1])
            return (height, width) if height * width == n_tokens else None
    original = extra_options.get("original_shape")
    if original is None or len(original) < 2:
        return None
    return geometry.token_grid(n_tokens, int(original[-2]), int(original[-1]))


def set_block_grid_recorder(transformer_options: dict, on: bool) -> None:
    """Put :func:`record_block_grid` in ``block_modifiers`` exactly once (``on``) or not at all.

    A new list, as the hosts' ``append_transformer_option`` makes, so a patcher this was cloned
    from keeps its own.
    """
    existing = transformer_options.get("block_modifiers")
    kept = [modifier for modifier in existing or () if modifier is not record_block_grid]
    if on:
        kept.append(record_block_grid)
    if kept or existing is not None:
        transformer_options["block_modifiers"] = kept


def blur_for_layer(
    q: torch.Tensor, sigma: float, extra_options: Mapping, key: layers.LayerKey, on_skip: SkipCallback
) -> torch.Tensor:
    """Blurred queries; infinite blur is the token mean and needs no grid, a finite one does."""
    n_tokens = q.shape[1]
    grid = token_grid(n_tokens, extra_options)
    if grid is None and blur.is_infinite_sigma(sigma):
        grid = (1, n_tokens)
    if grid is None:
        on_skip(key, n_tokens)
        return q
    return blur.blur_queries(q, grid[0], grid[1], sigma)


def attn1_patch(kind: str, key: layers.LayerKey, sigma: float, on_skip: SkipCallback, inner: Patch | None = None):
    """``patches_replace["attn1"]`` entry: blur q, then the attention (``inner`` patch or the host's).

    In a batched main call only the SEG rows (``transformer_options[SEG_ROWS]``) are blurred.
    """

    def patch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        rows = extra_options.get(forge_rows.SEG_ROWS)
        if rows is None:
            q = blur_for_layer(q, sigma, extra_options, key, on_skip)
        else:
            start, stop = rows
            q = torch.cat([q[:start], blur_for_layer(q[start:stop], sigma, extra_options, key, on_skip), q[stop:]])
        if inner is not None:
            return inner(q, k, v, extra_options)
        return forge_host.run_attention(kind, q, k, v, extra_options)

    return patch


def sampling_progress(denoiser: Any, transformer_options: Mapping, sigma: torch.Tensor) -> float | None:
    """Progress of this denoiser call (see the module docstring), or None if the host tells nothing."""
    step, total = getattr(denoiser, "step", None), getattr(denoiser, "total_steps", None)
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        return schedule.progress(step, total)
    sample_sigmas = transformer_options.get("sample_sigmas")
    if sample_sigmas is not None:
        return schedule.progress_from_sigma(float(sigma.flatten()[0]), sample_sigmas)
    return None


class PatchedUnet(targets.UnetTarget):
    """A Forge-family UNet, blurred through ``patches_replace["attn1"]`` entries in the call's transformer options.

    The hosts' ``BasicTransformerBlock`` hands an attn1 patch the exact token grid (reForge's
    ``activations_shape``, :func:`record_block_grid` elsewhere, hence :attr:`records_block_grid`), which module
    hooks would have to rebuild.  An attn1 replace another extension registered for a key (StyleAlign,
    Reference-only) is called with the blurred queries instead of the host attention, so SEG keeps that
    extension's effect and the guidance holds only the blur.  ``rows``: only those rows of the call are
    blurred (:data:`lib_seg.forge.rows.SEG_ROWS`).
    """

    records_block_grid = True

    def __init__(self, model: Any, kind: str):
        super().__init__(model)
        self.kind = kind

    @contextmanager
    def blurring(
        self, keys: Iterable, sigma: float, rows: slice | None, on_skip: SkipCallback | None, options: dict
    ) -> Iterator[dict]:
        existing = (options.get("patches_replace") or {}).get("attn1") or {}
        patches = {}
        for key in keys:
            inner = existing.get(tuple(key)) or existing.get(tuple(key)[:2])
            patches[tuple(key)] = attn1_patch(self.kind, key, sigma, on_skip, inner)
        seg_options = with_replaces(options, patches)
        if rows is not None:
            seg_options[forge_rows.SEG_ROWS] = (rows.start, rows.stop)
        yield seg_options
