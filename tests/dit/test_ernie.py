"""SEG on Ernie-Image: what only Ernie-Image has (split-half RoPE maps that are no rotations, the seam restored when
the call fails, unchosen layers passing the seam); the post-RoPE image queries blurred at the attention seam against
a float64 logit blur, only the image queries changing, batched rows, prefix reuse and the grids the sequence or the
ids contradict, and the layer whose seam cannot be reached, are run by tests/dit/test_family_table.py (``ernie``).

The model is tests/support/dit_ernie.py (Neo 2.26's ``ErnieImageModel``: ``[image | text]``, patch-1
convolution embedding, split-half RoPE maps that are no rotations, ``attention_function`` called by its
module-global name).
"""

from __future__ import annotations

import pytest
import torch

from lib_seg.core.blocks import resolve_layers
from lib_seg.dit.families.ernie import ids_on_grid
from lib_seg.dit.hooks import available_layers, blurred_dit_queries
from tests.support import dit_ernie
from tests.support.dit_cases import ERNIE_CASE, Setup, call, seg
from tests.support.dit_ernie import split_half_maps

_host_attention = dit_ernie.attention_function


def test_the_seam_is_restored_when_the_call_fails():
    model, inputs = ERNIE_CASE.make(Setup((4, 4)))
    with pytest.raises(RuntimeError), blurred_dit_queries(model, resolve_layers("l2", available_layers(model)), 2.0):
        assert dit_ernie.attention_function is not _host_attention
        model(inputs["x"], inputs["timesteps"], inputs["context"][..., :5])  # wrong text width: text_proj fails
    assert dit_ernie.attention_function is _host_attention


def test_unchosen_layers_pass_through_the_seam_bit_for_bit():
    (model, inputs), outputs = ERNIE_CASE.make(Setup((4, 5))), []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in model.layers]
    call(ERNIE_CASE, model, inputs)
    seg(ERNIE_CASE, model, inputs, resolve_layers("l2", available_layers(model)), 2.0)
    for handle in handles:
        handle.remove()
    assert torch.equal(outputs[0], outputs[3]) and torch.equal(outputs[1], outputs[4])
    assert not torch.equal(outputs[2], outputs[5])


def test_ernie_rope_maps_are_no_rotations_at_the_released_axes():
    """Why the hook sits after RoPE: the per-pair maps have determinant cos(a - b), near 0 for some tokens."""
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    ids = torch.stack([torch.full_like(rows, 77), rows, cols], dim=-1).reshape(1, -1, 3).double()
    maps = split_half_maps(ids, (32, 48, 48), 256.0)
    determinant = torch.linalg.det(maps).abs()
    assert maps.shape == (1, 4096, 1, 64, 2, 2) and float(determinant.min()) < 1e-3
    assert float((maps @ maps.transpose(-1, -2) - torch.eye(2, dtype=torch.float64)).abs().max()) > 0.5
    assert ids_on_grid(ids[..., 1:] * 0.5 + 3, (64, 64)) and not ids_on_grid(ids[..., 1:].flip(-1), (64, 64))
