"""SEG on Anima: what only Anima has (its cross-attention through the same attention function, calls on other
tokens than the block's grid); the self-attention queries of the image blurred over its grid against a float64
logit blur (frames, reference frames), only the image queries changing, batched rows, prefix reuse and the
kernel no seam reaches are run by tests/dit/test_family_table.py (``anima``).

The model is tests/support/dit_anima.py: Neo's Anima (Cosmos-Predict2 blocks on 5-D latents, patches 1x2x2,
split-half 3D RoPE, cross-attention to the LLM adapter's output, reference latents appended as frames), in
Neo 2.26's layout (q-norm module, then RoPE) and 2.29's (``ck.rms_rope_split_half``: no q-norm module runs),
both calling the module-global ``attention_function``.
"""

from __future__ import annotations

import pytest
import torch

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.hooks import blurred_dit_queries
from tests.support.dit_blocks import Hooks
from tests.support.dit_cases import ANIMA_CASE, ANIMA_VARIANTS, Setup, call, seg


@pytest.mark.parametrize("variant", ANIMA_VARIANTS)
def test_the_cross_attention_of_a_chosen_block_gets_its_own_queries_unblurred(variant):
    """The chosen block's cross-attention (to the text, through the same attention function as its
    self-attention) gets the queries of its own input."""
    model, inputs = ANIMA_CASE.make(Setup((1, 5, 6), variant, draw={"refs": 1}))
    block, cross, cross_input = model.blocks[1], {}, []
    handle = block.cross_attn.register_forward_pre_hook(lambda _m, args: cross_input.append(args[0]))
    try:
        block.cross_hooks = Hooks(seen=cross)
        seg(ANIMA_CASE, model, inputs, [DitLayer("block", 1)], 2.0)
    finally:
        block.cross_hooks = Hooks()
        handle.remove()
    attention = block.cross_attn
    with torch.no_grad():
        own = attention.q_norm(attention.q_proj(cross_input[-1]).unflatten(-1, (attention.heads, -1)))
    assert torch.equal(cross["q"], own.transpose(1, 2))


def test_queries_that_are_not_the_blocks_grid_are_skipped_with_a_warning():
    """An attention call on other tokens than the block's grid (a tiling extension's sub-grid) is left as
    it is, with a warning."""
    (model, inputs), skips = ANIMA_CASE.make(Setup((1, 6, 8), "2.26")), []
    attention, layer = model.blocks[1].self_attn, DitLayer("block", 1)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad(), blurred_dit_queries(model, [layer], 2.0, on_skip=lambda *a: skips.append(a)):
        call(ANIMA_CASE, model, inputs)
        assert not skips
        got = attention(x, None, None, {})
    assert torch.equal(got, attention(x, None, None, {}))
    assert skips == [(layer, 5, None, "its 5 queries are not the block's 1x3x4 token grid")]
