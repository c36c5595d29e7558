"""SEG on Qwen-Image 2.1: what only Qwen-Image 2.1 has (segments, block-causal masks, the override alone); its
exactness with and without references (the target image's queries blurred at its own segment's attention call),
batched rows, prefix reuse, the ids that contradict the target's grid and the kernel no seam reaches are run by
tests/dit/test_family_table.py (``qwen21``).

The model is tests/support/dit_qwen21.py (Neo 2.29.1's ``backend/nn/qwen21.py`` interfaces: no patchify,
``[text | ref 0 | text | ref 1 | ... | target]`` attended segment by segment under block-causal masks, q/k norm
and RoPE fused, the module-global ``attention_function`` called once per segment).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from lib_seg.core.blocks import DitLayer, resolve_layers
from lib_seg.dit.attention_call import CallShape, ImageTokens, Skip
from lib_seg.dit.families import qwen21
from lib_seg.dit.families.qwen21 import QWEN21
from lib_seg.dit.hooks import available_layers, blurred_dit_queries
from tests.support import dit_qwen21
from tests.support.dit_blocks import OVERRIDE, Hooks
from tests.support.dit_cases import QWEN21_CASE, Setup, call, seg, slow
from tests.support.dit_qwen21 import TinyQwen21
from tests.support.tolerance import assert_network_close


def _no_skip(*skip) -> None:
    raise AssertionError(f"unexpected skip {skip}")


@contextmanager
def _segment_hooks(model: TinyQwen21, chosen, hooks: dict):
    attentions = [model.transformer_blocks[layer.index].attn for layer in chosen]
    try:
        for attention in attentions:
            attention.segment_hooks = hooks
        yield
    finally:
        for attention in attentions:
            attention.segment_hooks = {}


@pytest.mark.parametrize("refs", ["no-refs", "two-refs"])
def test_only_the_target_queries_change_as_they_enter_attention(refs):
    """Every text and reference segment's queries (a reference of the target's size among them), every
    segment's keys and values: bit-identical; the target's queries change."""
    model, inputs = QWEN21_CASE.make(Setup((5, 7), draw={"refs": refs}))
    chosen = resolve_layers("s1", available_layers(model))
    call(QWEN21_CASE, model, inputs)
    n_segments = len(model.segments)
    assert n_segments == (2 if refs == "no-refs" else 6)  # text, target / text, ref, text, ref, text, target
    plain = {i: Hooks(seen={}) for i in range(n_segments)}
    with _segment_hooks(model, chosen, plain):
        call(QWEN21_CASE, model, inputs)
    blurred = {i: Hooks(seen={}) for i in range(n_segments)}
    with _segment_hooks(model, chosen, blurred):
        seg(QWEN21_CASE, model, inputs, chosen, 2.0, on_skip=_no_skip)
    for i in range(n_segments):
        before, after = plain[i].seen, blurred[i].seen
        assert torch.equal(after["k"], before["k"]) and torch.equal(after["v"], before["v"])
        if i < n_segments - 1:
            assert torch.equal(after["q"], before["q"]), f"segment {i}'s queries changed"
    if refs == "two-refs":  # the reference of the target's size: as many queries, fewer keys
        assert plain[1].seen["q"].shape == plain[n_segments - 1].seen["q"].shape
        assert plain[1].seen["k"].shape[2] < plain[n_segments - 1].seen["k"].shape[2]
    assert not torch.equal(blurred[n_segments - 1].seen["q"], plain[n_segments - 1].seen["q"])


def test_the_override_alone_reaches_a_bound_kernel_and_chains_in_front_of_another():
    """A kernel no module global names (bound in the closure): only ``wrap_attn``'s override sees the calls;
    another extension's override still runs, on SEG's blurred queries, and the caller's dict is left alone."""
    model, inputs = QWEN21_CASE.make(Setup((6, 7), build={"kernel": "bound"}, draw={"refs": "two-refs"}))
    chosen = resolve_layers("s1", available_layers(model))
    seen = []

    def other(func, *args, **kwargs):
        seen.append(args[0].shape[1])
        return func(*args, **kwargs)

    options = {OVERRIDE: other}
    with torch.no_grad(), blurred_dit_queries(model, chosen, 2.0, on_skip=_no_skip):
        got = model(**inputs, transformer_options=options)
    assert options == {OVERRIDE: other} and len(seen) == 3 * len(model.segments)  # every call reached it
    assert_network_close(got, slow(QWEN21_CASE, model, inputs, chosen, 2.0))


def test_locate_waits_for_the_call_over_the_whole_sequence_and_checks_its_queries():
    """Calls over fewer keys are other segments' (None: keep waiting); the call over all of them must hold
    the ``H x W`` target's queries; no ids or no latent: nothing is placed."""
    record, layer = qwen21._Call(), DitLayer("single", 0)
    record.latent = (4, 5)
    assert "no position ids" in record.where()
    with pytest.raises(Skip, match="no position ids"):
        QWEN21.locate(record, layer, CallShape(6, 6, 2), None)
    ids = torch.cat([torch.arange(6.0)[:, None].expand(6, 3), dit_qwen21.image_ids(4, 5, 6.0).double()])[None]
    record.on_ids(None, (ids,), {})
    assert record.where() == ((4, 5), 26)
    assert QWEN21.locate(record, layer, CallShape(6, 6, 2), None) is None  # the text segment's call
    assert QWEN21.locate(record, layer, CallShape(20, 26, 2), [1]) == ImageTokens(0, (4, 5), rows=[1])
    for queries, keys in ((19, 26), (26, 26), (20, 27)):
        with pytest.raises(Skip, match=f"over {keys} keys has {queries} queries, not the 4x5 image's 20"):
            QWEN21.locate(record, layer, CallShape(queries, keys, 2), None)
    record.reset()
    assert record.where() == "the model call passed no 4D latent (B, C, H, W)"


def test_what_only_looks_like_qwen_image_21_is_not_claimed():
    flux_like = TinyQwen21(hidden=8, heads=1, axes=(2, 2, 4))
    flux_like.single_blocks = torch.nn.ModuleList()  # another family's block list: not Qwen-Image 2.1
    assert not QWEN21.matches(flux_like)
