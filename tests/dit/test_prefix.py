"""lib_seg.dit.prefix: the SEG rows skip the blocks before the first blurred one, and nothing changes."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pytest
import torch
from torch import nn

from lib_seg.core.blocks import DitLayer, resolve_layers
from lib_seg.dit.hooks import available_layers, blurred_dit_queries
from lib_seg.dit.prefix import blocks_in_order, prefix_plan, shared_prefix
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.tolerance import assert_network_close

F64 = torch.float64
N_COND = 2  # A1111's layout: [cond (2) | SEG (2) | uncond (2)]


def _inputs(flux: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * N_COND
    cond = {
        "x": torch.randn(rows, 4, 7, 9, generator=g, dtype=F64),
        "context": torch.randn(rows, 5, 12, generator=g, dtype=F64),
        "y": torch.randn(rows, 8, generator=g, dtype=F64),
        "t": torch.rand(rows, generator=g, dtype=F64),
    }
    return {key: with_seg_rows(value, N_COND) for key, value in cond.items()}  # cond, SEG copies, uncond


def _call(model, inputs):
    if isinstance(model, TinyFlux):
        return model(inputs["x"], inputs["t"], inputs["context"], inputs["y"])
    return model(inputs["x"], inputs["t"], y=inputs["y"], context=inputs["context"])


def _rows_seen(model) -> tuple[list[int], list]:
    """Batch size each block ran with, in order (a pre-hook records the first tensor argument)."""
    seen = []

    def record(_block, args, kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        seen.append(first.shape[0])

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for _, block in blocks_in_order(model)]
    return seen, handles


@pytest.mark.parametrize(
    "build,spec,prefix",
    [
        (lambda: TinyFlux(depth=3, single=3), "d2,s1", 2),
        (lambda: TinyFlux(depth=2, single=3), "s1-2", 3),  # every double block and s0
        (lambda: TinyMMDiT(depth=4, pad=True, attn2_blocks=(0, 1)), "j2-3", 2),
    ],
)
def test_prefix_rows_are_computed_once_and_the_output_is_unchanged(build, spec, prefix):
    model = randomize(build(), seed=7).to(F64).eval()
    chosen = resolve_layers(spec, available_layers(model))
    inputs, total = _inputs(isinstance(model, TinyFlux)), 3 * N_COND
    drop, expand = partial(without_seg_rows, n_cond=N_COND), partial(with_seg_rows, n_cond=N_COND)
    seg_rows = slice(N_COND, 2 * N_COND)
    with torch.no_grad(), blurred_dit_queries(model, chosen, 2.0, seg_rows):
        full = _call(model, inputs)
        with shared_prefix(model, chosen, total, total - N_COND, drop, expand):
            seen, handles = _rows_seen(model)  # after the prefix's own pre-hooks: sees what blocks get
            shared = _call(model, inputs)
        for handle in handles:
            handle.remove()
    assert seen == [total - N_COND] * prefix + [total] * (len(seen) - prefix)
    assert_network_close(shared, full)
    assert not torch.equal(full[:N_COND], full[N_COND : 2 * N_COND])  # the SEG rows were blurred
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@dataclass
class Modulation:
    scale: torch.Tensor


class Opaque:
    """A per-row tensor inside an object that is neither a container nor a dataclass."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale


class ContainerArgs(nn.Module):
    """A block that gets its per-row modulation inside an object, as Chroma's and Flux.2's blocks get
    tuples of ``ModulationOut`` dataclasses (Neo ``backend/nn/flux.py``)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.rows: list[int] = []

    def forward(self, img, mod):
        self.rows.append(img.shape[0])
        scale = mod[1][0].scale if isinstance(mod, tuple) else mod.scale
        return self.proj(img) * scale[:, None, None]


class ChromaLike(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap
        self.double_blocks = nn.ModuleList([ContainerArgs(), ContainerArgs()])
        self.single_blocks = nn.ModuleList([ContainerArgs()])

    def forward(self, img, scale):
        for block in (*self.double_blocks, *self.single_blocks):
            img = block(img, mod=self.wrap(scale))
        return img


def _prefix_rows(wrap) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    model = ChromaLike(wrap)
    img, scale = with_seg_rows(torch.randn(4, 3, 4), 2), with_seg_rows(torch.rand(4), 2)
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    with torch.no_grad():
        plain = model(img, scale)
        for block in model.double_blocks:
            block.rows.clear()
        with shared_prefix(model, [DitLayer("single", 0)], 6, 4, drop, expand):
            shared = model(img, scale)
    return [n for block in model.double_blocks for n in block.rows], shared, plain


@pytest.mark.parametrize(
    "wrap",
    [Modulation, lambda scale: (None, (Modulation(scale), Modulation(scale)))],
    ids=["dataclass", "tuple of dataclasses"],
)
def test_rows_inside_containers_and_dataclasses_are_slimmed(wrap):
    rows, shared, plain = _prefix_rows(wrap)
    assert rows == [4, 4]  # the 2 SEG rows skipped both prefix blocks (the modulation was slimmed too)
    torch.testing.assert_close(shared, plain)


def test_blocks_with_rows_inside_other_objects_are_not_slimmed():
    rows, shared, plain = _prefix_rows(Opaque)
    assert rows == [6, 6] and torch.equal(shared, plain)


def test_no_prefix_before_the_first_block():
    model = TinyMMDiT(depth=3)
    assert prefix_plan(model, [DitLayer("joint", 0), DitLayer("joint", 2)])[0] == []
    assert prefix_plan(model, [DitLayer("joint", 2)])[0] == list(model.joint_blocks[:2])
    flux = TinyFlux(depth=2, single=3)
    assert prefix_plan(flux, [DitLayer("single", 1)])[0] == [*flux.double_blocks, flux.single_blocks[0]]
