"""SEG on Krea 2: what only Krea 2 has (the image found by every axis of its ids, 5-D Wan latents folded into the
batch, blocks called outside a model call); grid, text length and image place read from the model and the call
against a float64 logit blur in both layouts, with references, only the image queries changing, batched rows,
prefix reuse (and its safe fallbacks) and the grids its ids contradict are run by tests/dit/test_family_table.py
(``krea2``).

The model is tests/support/dit_krea.py: Neo's ``SingleStreamDiT`` (patch 2, grouped-query attention, a
text-fusion transformer) in Neo 2.26's layout (``[txt | image | references]``, 3D context, 5D Wan latents
folded into the batch, a reference path that never calls the blocks) and Neo 2.27+'s (ba50f188: 4D context
``(B, L, layers, width)``, ``[txt | references | image]`` with every reference on the image's grid).
"""

from __future__ import annotations

import torch

from lib_seg.core.blocks import DitLayer, resolve_layers
from lib_seg.dit.families import FAMILIES
from lib_seg.dit.families.krea import KREA2, frame_rows, image_start
from lib_seg.dit.hooks import available_layers, blurred_dit_queries
from tests.support.dit_blocks import token_ids
from tests.support.dit_cases import KREA_CASE, Setup, call, seg, slow
from tests.support.dit_krea import grid_ids
from tests.support.tolerance import assert_network_close


def test_the_image_is_found_by_every_axis_of_its_ids():
    ids = lambda *parts: torch.cat(parts, dim=1)  # noqa: E731
    text, image, same = torch.zeros(2, 4, 3), grid_ids(3, 4, 0, 2, None), grid_ids(3, 4, 1, 2, None)
    assert image_start(ids(text, same, image), 4, (3, 4)) == 16  # 2.29: a same-grid reference first
    assert image_start(ids(text, image, same), 4, (3, 4)) == 4  # 2.26: the image first
    assert image_start(ids(text, same), 4, (3, 4)) is None  # a reference is never the image
    assert image_start(ids(text, image), 4, (4, 3)) is None  # a grid its ids contradict
    assert image_start(token_ids(4, 3, 4, n_extra=6, batch=2), 4, (3, 4)) == 4


def test_5d_wan_latents_blur_each_frame_and_only_the_chosen_rows():
    """Neo 2.26 hands Krea 2 ``(B, C, T, H, W)`` latents (Wan layout) and folds the frames into the batch."""
    model, inputs = KREA_CASE.make(Setup((7, 6), "2.26", draw={"frames": 2}))
    inputs["context"] = inputs["context"].repeat_interleave(2, dim=0)  # one text row per frame, as Neo needs
    inputs["timesteps"] = inputs["timesteps"].repeat_interleave(2)
    chosen = resolve_layers("s1", available_layers(model))
    got = seg(KREA_CASE, model, inputs, chosen, 2.0, rows=[1])
    assert_network_close(got, slow(KREA_CASE, model, inputs, chosen, 2.0, rows=[2, 3]))  # row 1 = sequences 2, 3
    assert torch.equal(got[0], call(KREA_CASE, model, inputs)[0])
    assert frame_rows(slice(1, None), 3, 2) == [3, 4, 5] and frame_rows(slice(0, 1), 1, 4) == slice(0, 1)


def test_a_block_called_outside_a_model_call_is_skipped():
    """No model call recorded a latent: the image tokens cannot be placed and q stays as it is."""
    model, skips = KREA_CASE.build(layout="2.26"), []
    x, vec = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 1, 192, dtype=torch.float64)
    chosen = resolve_layers("s1", available_layers(model))
    with torch.no_grad():
        plain = model.blocks[1](x, vec, None)
        with blurred_dit_queries(model, chosen, 2.0, on_skip=lambda *a: skips.append(a)):
            got = model.blocks[1](x, vec, None)
    assert torch.equal(got, plain)
    assert skips == [(DitLayer("single", 1), 9, None, "the model call passed no 4D or 5D latent")]


def test_krea2_is_asked_before_every_other_family():
    assert FAMILIES.index(KREA2) == 0  # its single-stream ``blocks`` would fit others' looser structures
