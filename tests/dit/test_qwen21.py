"""SEG on Qwen-Image 2.1: the target image's queries blurred at its own segment's attention call.

The model is tests/support/dit_qwen21.py (Neo 2.29.1's ``backend/nn/qwen21.py`` interfaces: no patchify,
``[text | ref 0 | text | ref 1 | ... | target]`` attended segment by segment under block-causal masks, q/k norm
and RoPE fused, the module-global ``attention_function`` called once per segment).  The slow path never
touches a query: the chosen blocks' target-segment call (the last) computes attention explicitly and blurs the
image rows of its pre-softmax logits on the latent's grid (tests/support/slow_seg.py's ``blur_logit_rows``),
before the host's mask, as :func:`tests.support.dit_blocks.attend` applies it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.attention_call import NEVER_CALLED, CallShape, ImageTokens, Skip
from lib_seg.dit.families import FAMILIES, family_of, qwen21
from lib_seg.dit.families.qwen import QWEN_IMAGE
from lib_seg.dit.families.qwen21 import QWEN21, RELEASED
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import shared_prefix
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support import dit_qwen21
from tests.support.dit_blocks import OVERRIDE, Hooks
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_models import TinyFlux, TinyMMDiT
from tests.support.dit_qwen import TinyQwen
from tests.support.dit_qwen21 import TinyQwen21, build
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close

N_TXT = 6
LATENTS = [(6, 6), (5, 7), (1, 9)]  # square, odd and non-square, one row
# (reference sizes, image slots): none; one of another size; two, the first of the target's own size (its call
# has as many queries as the target's, but fewer keys), text before each and after the last
REFS = {
    "no-refs": ((), ()),
    "one-ref": (((3, 4),), (2,)),
    "two-refs": (("target", (4, 3)), (1, 4)),
    "refs-first": (("target", (2, 5)), (0, 0)),  # no text before the references: image segments back to back
}


def _ref_sizes(latent, refs) -> list[tuple[int, int]]:
    return [tuple(latent) if ref == "target" else ref for ref in refs]


def _inputs(latent, refs: str = "no-refs", batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, N_TXT, 8)}
    inputs["timesteps"] = torch.rand(batch, generator=generator, dtype=torch.float64)
    sizes, slots = REFS[refs]
    if sizes:
        inputs["ref_latents"] = [draw(1, 4, *size) for size in _ref_sizes(latent, sizes)]
        inputs["image_slots"] = list(slots)
    return inputs


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{"transformer_options": {}, **inputs})  # as Neo's KModel calls it


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


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    """The target's segment (the last) blurs the image rows of its logits: all its queries are the image."""
    grid = tuple(inputs["x"].shape[-2:])
    blur = Hooks(logits=blur_logit_rows(slice(0, grid[0] * grid[1]), grid, sigma, rows))
    with _segment_hooks(model, chosen, {-1: blur}):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


def _no_skip(*skip) -> None:
    raise AssertionError(f"unexpected skip {skip}")


FULL = ("no-refs", "two-refs")  # every latent; the other layouts on the odd, non-square one
CASES = [(refs, latent) for refs in REFS for latent in (LATENTS if refs in FULL else LATENTS[1:2])]


@pytest.mark.parametrize("sigma", [0.9, math.inf])
@pytest.mark.parametrize(("refs", "latent"), CASES, ids=str)
def test_qwen21_queries_equal_blurred_logit_rows_of_the_target(refs, latent, sigma):
    model, inputs = build(seed=3), _inputs(latent, refs)
    plain = _call(model, inputs)
    for spec in ["s1", "all", "s0,s2"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma, on_skip=_no_skip)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


@pytest.mark.parametrize("refs", ["no-refs", "two-refs"])
def test_only_the_target_queries_change_as_they_enter_attention(refs):
    """Every text and reference segment's queries (a reference of the target's size among them), every
    segment's keys and values: bit-identical; the target's queries change."""
    model, inputs = build(seed=4), _inputs((5, 7), refs)
    chosen = resolve_layers("s1", available_layers(model))
    _call(model, inputs)
    n_segments = len(model.segments)
    assert n_segments == (2 if refs == "no-refs" else 6)  # text, target / text, ref, text, ref, text, target
    plain = {i: Hooks(seen={}) for i in range(n_segments)}
    with _segment_hooks(model, chosen, plain):
        _call(model, inputs)
    seg = {i: Hooks(seen={}) for i in range(n_segments)}
    with _segment_hooks(model, chosen, seg):
        _seg(model, inputs, chosen, 2.0, on_skip=_no_skip)
    for i in range(n_segments):
        before, after = plain[i].seen, seg[i].seen
        assert torch.equal(after["k"], before["k"]) and torch.equal(after["v"], before["v"])
        if i < n_segments - 1:
            assert torch.equal(after["q"], before["q"]), f"segment {i}'s queries changed"
    if refs == "two-refs":  # the reference of the target's size: as many queries, fewer keys
        assert plain[1].seen["q"].shape == plain[n_segments - 1].seen["q"].shape
        assert plain[1].seen["k"].shape[2] < plain[n_segments - 1].seen["k"].shape[2]
    assert not torch.equal(seg[n_segments - 1].seen["q"], plain[n_segments - 1].seen["q"])


def test_batched_rows_equal_separate_calls():
    model, inputs = build(seed=5), _inputs((5, 7), "two-refs")
    chosen = resolve_layers("s0,s2", available_layers(model))
    doubled = {k: torch.cat([v, v]) if k in ("x", "context", "timesteps") else v for k, v in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))
    picked = _seg(model, doubled, chosen, 3.0, rows=[1])
    assert_network_close(picked[0], together[0])
    assert_network_close(picked[2:], together[:2])
    assert_network_close(picked[1], together[3])
    assert_network_close(together[2:], _slow(model, doubled, chosen, 3.0, rows=[2, 3])[2:])


def test_an_attention_that_reaches_no_seam_is_reported_by_name():
    """A kernel that attends by itself (neither the module global nor ``wrap_attn``): every chosen block is
    reported when its ``attn`` returns, and nothing changes."""
    model, inputs, skips = build(seed=8, kernel="private"), _inputs((6, 6), "one-ref"), []
    chosen = resolve_layers("s1-2", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [s[0] for s in skips] == list(chosen) and all(s[3] == NEVER_CALLED for s in skips)


def test_the_override_alone_reaches_a_bound_kernel_and_chains_in_front_of_another():
    """A kernel no module global names (bound in the closure): only ``wrap_attn``'s override sees the calls;
    another extension's override still runs, on SEG's blurred queries, and the caller's dict is left alone."""
    model, inputs = build(seed=10, kernel="bound"), _inputs((6, 7), "two-refs")
    chosen = resolve_layers("s1", available_layers(model))
    seen = []

    def other(func, *args, **kwargs):
        seen.append(args[0].shape[1])
        return func(*args, **kwargs)

    options = {OVERRIDE: other}
    with torch.no_grad(), blurred_dit_queries(model, chosen, 2.0, on_skip=_no_skip):
        got = model(**inputs, transformer_options=options)
    assert options == {OVERRIDE: other} and len(seen) == 3 * len(model.segments)  # every call reached it
    assert_network_close(got, _slow(model, inputs, chosen, 2.0))


def _mangled_ids(model: TinyQwen21, change) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook on ``pe_embedder`` that changes the ids the model (and SEG, registered after it) sees."""
    return model.pe_embedder.register_forward_pre_hook(lambda _m, args: (change(args[0].clone()),))


def _transpose_target(ids, grid=(5, 7)):
    """The target's ids say 7x5 (row-major on the transposed grid): the token count fits, the grid does not."""
    n = grid[0] * grid[1]
    target = ids[:, -n:, 1:3].reshape(1, *grid, 2).transpose(1, 2).reshape(1, n, 2)  # column-major
    ids[:, -n:, 1:3] = target.flip(-1)
    return ids


def _vary_index(ids, n=35):
    ids[:, -n:, 0] += torch.arange(n, dtype=ids.dtype) % 2
    return ids


def _continue_index(ids, n=35):
    ids[:, -n - 1, 0] = ids[:, -1, 0]
    return ids


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_transpose_target, "do not lay its last 35 tokens on the 5x7 grid"),
        (_vary_index, "not one image (axis 0 varies)"),
        (_continue_index, "image ids run on before its last 35 tokens"),
    ],
)
def test_ids_that_contradict_the_target_grid_leave_every_block_alone(change, reason):
    model, inputs, skips = build(seed=7), _inputs((5, 7), "one-ref"), []
    chosen = resolve_layers("s0,s2", available_layers(model))
    handle = _mangled_ids(model, change)
    try:
        plain = _call(model, inputs)
        got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    finally:
        handle.remove()
    assert torch.equal(got, plain)
    assert [s[0] for s in skips] == list(chosen) and all(reason in s[3] for s in skips)


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


def test_prefix_reuse_skips_the_seg_rows_of_the_blocks_before_the_first_blurred_one():
    model, inputs = build(seed=12, layers=4), _inputs((5, 6), "two-refs")
    chosen = resolve_layers("s2", available_layers(model))
    seg = {k: with_seg_rows(v, 2) if k in ("x", "context", "timesteps") else v for k, v in inputs.items()}
    seg["transformer_options"] = {"cond_or_uncond": [0, 0], "sigmas": torch.ones(4, dtype=torch.float64)}
    seen: list[int] = []
    handles = [
        block.attn.to_q.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
        for block in model.transformer_blocks[:3]
    ]
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4), on_skip=_no_skip):
        full = _call(model, seg)
        seen.clear()
        with shared_prefix(model, chosen, 4, 2, drop, expand):
            shared = _call(model, seg)
    for handle in handles:
        handle.remove()
    assert seen == [2, 2, 4]  # s0, s1 on the main rows only; s2 on all rows
    assert_network_close(shared, full)
    assert_network_close(shared[2:], _slow(model, inputs, chosen, 2.0))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_exactly_one_family_claims_qwen_image_21_and_qwen_image():
    qwen21, qwen = TinyQwen21(hidden=8, heads=1, axes=(2, 2, 4)), TinyQwen()
    assert [f for f in FAMILIES if f.matches(qwen21)] == [QWEN21] and family_of(qwen21) is QWEN21
    assert [f for f in FAMILIES if f.matches(qwen)] == [QWEN_IMAGE] and family_of(qwen) is QWEN_IMAGE
    assert dit_family(qwen21) == "qwen21" and dit_family(qwen) == "qwen"
    for other in (TinyFlux(), TinyFlux2(), TinyMMDiT(), qwen):
        assert not QWEN21.matches(other)
    flux_like = TinyQwen21(hidden=8, heads=1, axes=(2, 2, 4))
    flux_like.single_blocks = torch.nn.ModuleList()  # another family's block list: not Qwen-Image 2.1
    assert not QWEN21.matches(flux_like)
    no_modulation = TinyQwen21(hidden=8, heads=1, axes=(2, 2, 4))
    del no_modulation.modulation  # the model-wide modulation is part of the structure
    assert dit_family(no_modulation) is None


def test_block_names_and_the_middle_default_on_the_released_depth():
    released = TinyQwen21(hidden=8, heads=1, layers=RELEASED["qwen-image-2.1"], axes=(2, 2, 4))
    assert available_layers(released) == model_layers(single=32)
    assert QWEN21.default is None and default_spec(released) == "s16"
    target = query_target(released)
    assert target.resolve("middle") == (DitLayer("single", 16),)
    assert target.canonical("middle") == "s16"  # infotext names the resolved block
    assert target.resolve("s7-9") == tuple(DitLayer("single", i) for i in (7, 8, 9))
    with pytest.raises(ValueError, match="it has s0-31"):
        target.resolve("s32")
    assert default_spec(build()) == "s1"  # a 3-block model: its middle block
