"""SEG on NextDiT (Z-Image, Lumina Image 2): what only NextDiT has; its exactness on every variant (caption and
image pad tokens, grouped k/v heads, one shared Identity norm, Neo 2.29's fused kernels, the override alone),
batched rows, prefix reuse through both refiner streams, the grids its ids contradict and the kernel no seam
reaches are run by tests/dit/test_family_table.py (``nextdit``).

The model is tests/support/dit_nextdit.py (Neo 2.26's ``backend/nn/lumina.py`` structure: caption and
noise refiners, then ``layers`` over ``[caption | caption pad | image | image pad]``, 3-axis RoPE as 2x2
rotations applied after the q-norm inside the attention).
"""

from __future__ import annotations

import torch

from lib_seg.core.blocks import resolve_layers
from lib_seg.dit.hooks import available_layers, blurred_dit_queries
from tests.support.dit_blocks import OVERRIDE
from tests.support.dit_cases import NEXTDIT_CASE, Setup, slow
from tests.support.tolerance import assert_network_close


def test_the_override_chains_in_front_of_another_extensions_and_leaves_the_callers_options_alone():
    """Another extension's ``optimized_attention_override`` still runs, on SEG's blurred queries, and the
    caller's ``transformer_options`` dict is the same object with the same keys afterwards."""
    model, inputs = NEXTDIT_CASE.make(Setup((6, 7), "override-only"))
    chosen = resolve_layers("l1", available_layers(model))
    seen = []

    def other(func, *args, **kwargs):
        seen.append(args[0].shape)
        return func(*args, **kwargs)

    options = {OVERRIDE: other}
    with torch.no_grad(), blurred_dit_queries(model, chosen, 2.0):
        got = model(**inputs, transformer_options=options)
    assert options == {OVERRIDE: other} and len(seen) == 3 + 2 * 2  # every attention call reached it
    assert_network_close(got, slow(NEXTDIT_CASE, model, inputs, chosen, 2.0))
