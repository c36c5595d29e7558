"""SEG on PixelDiT / PiD: what only PixelDiT has (its 2D rotations check, PiD's LQ rows, a host that mixes rows
between blocks); patch and pixel blocks blurred on the grid read from the model against a logit blur, only the
image queries changing, batched rows, prefix reuse falling back to full rows and the grids the queries or
rotations contradict are run by tests/dit/test_family_table.py (``pixeldit``).

The model is tests/support/dit_pixeldit.py (Neo 2.26's ``PixDiT_T2I`` / ``PidNet``: RGB pixels padded to 16-px
patches, here 4-px; MMDiT ``patch_blocks`` over ``[text | image]``; ``pixel_blocks`` whose attention runs over
the patch tokens alone; interleaved 2D RoPE; PiD's LQ gate).
"""

from __future__ import annotations

import pytest
import torch

from lib_seg.core.blocks import resolve_layers
from lib_seg.dit.families.pixeldit import rotations_fit_grid
from lib_seg.dit.hooks import available_layers
from lib_seg.dit.prefix import prefix_plan
from tests.support.dit_cases import PIXELDIT_CASE, PIXELDIT_VARIANTS, Setup, call, per_row
from tests.support.dit_pixeldit import rope_2d


@pytest.mark.parametrize("variant", PIXELDIT_VARIANTS)
def test_no_block_is_in_the_prefix(variant):
    """The host mixes rows between blocks (PiD's LQ gate, ``t_emb`` between the streams; the pixel blocks see
    B * Hs * Ws rows): prefix reuse plans no block (the table checks the call falls back to full rows)."""
    model = PIXELDIT_CASE.build(**PIXELDIT_VARIANTS[variant])
    assert prefix_plan(model, resolve_layers("j2,b1", available_layers(model)))[0] == []


def test_the_host_alone_cannot_run_pids_doubled_batch():
    """PiD's gate joins LQ features of one row with image rows of two: only SEG's rows, tiled to the features,
    run in one call (the table's batched case)."""
    model, inputs = PIXELDIT_CASE.make(Setup((13, 10), "PiD", batch=1))
    with pytest.raises(RuntimeError):
        call(PIXELDIT_CASE, model, per_row(inputs, 1, lambda t: torch.cat([t, t])))


def test_rotations_check():
    pe = rope_2d(8, 3, 4)[None, None]
    assert rotations_fit_grid(pe, (3, 4)) and not rotations_fit_grid(pe, (4, 3)) and not rotations_fit_grid(pe, (2, 6))
    assert rotations_fit_grid(rope_2d(8, 5, 5)[None, None], (5, 5))
    assert not rotations_fit_grid(rope_2d(8, 4, 3)[None, None], (3, 4))  # same count, transposed grid
