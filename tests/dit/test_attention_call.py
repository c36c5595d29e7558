"""lib_seg.dit.attention_call on every family that blurs at the attention call: the seam never outlives its block.

Each tiny model calls its file's module-global ``attention_function`` as Neo's model files do (the imitations of
tests/support cite the Neo files); while SEG is armed that name is SEG's wrapper, and whatever ends the block (here
an interruption) puts the host's function back and leaves no hook on any module.  Exactness, the report of a call
that never came and the override chain are each family's own tests.
"""

from __future__ import annotations

import pytest

from lib_seg.core.blocks import resolve_layers
from lib_seg.dit.hooks import available_layers, blurred_dit_queries
from tests.support import dit_anima, dit_krea, dit_nextdit, dit_qwen21
from tests.support.dit_blocks import neo_attention
from tests.support.dit_models import randomize

MODELS = {  # the family's test model, in its Neo 2.29 layout where it has one
    "nextdit": (dit_nextdit, lambda: dit_nextdit.build(seed=11, fused=True)),
    "qwen21": (dit_qwen21, lambda: dit_qwen21.build(seed=11)),
    "anima": (dit_anima, lambda: randomize(dit_anima.TinyAnima(fused=True), seed=11).double().eval()),
    "krea2": (dit_krea, lambda: randomize(dit_krea.TinyKrea2(layout="2.29"), seed=11).double().eval()),
}


@pytest.mark.parametrize("family", MODELS)
def test_the_module_global_is_restored_and_no_hook_outlives_the_block(family):
    module, build = MODELS[family]
    model = build()
    chosen = resolve_layers("all", available_layers(model))
    with pytest.raises(RuntimeError, match="interrupted"), blurred_dit_queries(model, chosen, 2.0):
        assert module.attention_function is not neo_attention  # wrapped while armed
        raise RuntimeError("interrupted")
    assert module.attention_function is neo_attention
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
