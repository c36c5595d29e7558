"""What every DiT family of lib_seg.dit must do, run on each family's tiny model (the table of
tests/support/dit_cases.py, one :class:`FamilyCase` per family, in the shape of diffusers' ``PipelineTesterMixin``).

* SEG equals a float64 reference that never touches a query: the chosen attentions blur the image rows of their
  pre-softmax logits on the true grid, frame by frame (paper Prop. 3.1), for square, odd, non-square and one-row
  latents, references and extra frames included; and it changes the output.
* Entering a chosen attention, only the image queries change, and they are the dense blur of the plain ones; text,
  pad, reference and concatenated-frame queries, every key and every value stay bit for bit.
* SEG rows in a batch (all of them, or some) equal the plain and the separate SEG calls; prefix reuse runs the
  blocks before the first chosen one on the main rows only (or falls back to full rows) and changes nothing.
* A block SEG cannot place (a grid the ids or the query count contradict, a kernel no seam reaches) is left as it
  is and reported; no block chosen is the plain call bit for bit; an interrupted block leaves no hook and puts
  every wrapped module global back; the patch is read from the model when it has no ``patch_size``; exactly one
  registered family claims each test model, and none once the module that defines its family is gone.
* The family's model at each released model's block counts (the family's facts) has those blocks, names them in
  specs and errors, and ``middle`` selects the family's default there; on the tiny model, its middle block.

What only one family has stays in its own file (tests/dit/test_<family>.py).
"""

from __future__ import annotations

import pytest
import torch

from lib_seg.core.blocks import DitLayer, format_layers, model_layers, resolve_layers
from lib_seg.dit.families import FAMILIES, family_of
from lib_seg.dit.families.flux import FLUX1, FLUX2
from lib_seg.dit.geometry import model_patch_size
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.targets import query_target
from tests.support.dit_cases import (
    ANY,
    CASES,
    blurred_image_queries,
    call,
    per_row,
    prefix_run,
    recorded,
    seg,
    slow,
)
from tests.support.tolerance import FLOAT64_NETWORK_REL, assert_network_close, assert_within, max_abs


def _params(kind: str) -> list:
    return [pytest.param(case, item, id=f"{case.name}-{item.id}") for case in CASES for item in getattr(case, kind)]


def _chosen(model, spec: str):
    return resolve_layers(spec, available_layers(model))


def _no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("case", "exact"), _params("exact"))
def test_seg_equals_the_logit_blur_on_the_true_grid(case, exact):
    model, inputs = case.make(exact.setup)
    seams = [getattr(module, name) for module, name in case.seams]
    plain, skips = call(case, model, inputs), []
    for spec in exact.specs or case.specs:
        chosen = _chosen(model, spec)
        got = seg(case, model, inputs, chosen, exact.sigma, on_skip=lambda *a: skips.append(a))
        assert_network_close(got, slow(case, model, inputs, chosen, exact.sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"
    assert not skips
    assert [getattr(module, name) for module, name in case.seams] == seams  # the host's functions back
    assert _no_hooks(model)


@pytest.mark.parametrize(("case", "queries"), _params("queries"))
def test_only_the_image_queries_change_as_they_enter_attention(case, queries):
    model, inputs = case.make(queries.setup)
    (layer,) = _chosen(model, queries.spec)
    plain = recorded(case, model, inputs, layer)
    blurred = recorded(case, model, inputs, layer, queries.sigma)
    place = case.place(model, inputs, layer)
    q, q0 = blurred["q"], plain["q"]  # (B, heads, L, D) as they entered attention
    assert q.shape[2] == queries.tokens
    assert torch.equal(blurred["k"], plain["k"]) and torch.equal(blurred["v"], plain["v"])
    assert torch.equal(q[:, :, : place.start], q0[:, :, : place.start])  # text and whatever precedes the image
    assert torch.equal(q[:, :, place.image.stop :], q0[:, :, place.image.stop :])  # pad, references, frames after
    expected = blurred_image_queries(q0, place, queries.sigma)
    assert_within(q[:, :, place.image], expected, FLOAT64_NETWORK_REL * max_abs(expected), "image queries")
    assert not torch.equal(q[:, :, place.image], q0[:, :, place.image])


@pytest.mark.parametrize(("case", "batched"), _params("batched"))
def test_batched_rows_equal_separate_calls(case, batched):
    model, inputs = case.make(batched.setup)
    n, chosen = batched.setup.batch, _chosen(model, batched.spec)
    doubled = per_row(inputs, n, lambda t: torch.cat([t, t]))
    together = seg(case, model, doubled, chosen, 3.0, rows=slice(n, 2 * n))
    assert_network_close(together[:n], call(case, model, inputs))  # batch size changes only the rounding
    assert_network_close(together[n:], seg(case, model, inputs, chosen, 3.0))
    assert_network_close(together[n:], slow(case, model, inputs, chosen, 3.0))
    picked = seg(case, model, doubled, chosen, 3.0, rows=[n - 1])  # one SEG row: the last image's
    for row in range(2 * n):
        assert_network_close(picked[row], together[n + row if row == n - 1 else row % n], f"row {row}")


@pytest.mark.parametrize(("case", "prefix"), _params("prefix"))
def test_prefix_reuse_skips_the_seg_rows_before_the_first_blurred_block(case, prefix):
    model, inputs = case.make(prefix.setup)
    n, chosen = prefix.setup.batch, _chosen(model, prefix.spec)
    options = prefix.options() if prefix.options else None
    full, shared, seen = prefix_run(case, model, inputs, chosen, n, prefix.probe, options)
    assert seen == list(prefix.rows)
    if min(seen) == 2 * n:  # nothing slimmed: the very same call
        assert torch.equal(shared, full)
    assert_network_close(shared, full)
    assert not torch.equal(full[n:], full[:n])  # the SEG rows were blurred
    assert_network_close(shared[n:], slow(case, model, inputs, chosen, 2.0))
    assert _no_hooks(model)


@pytest.mark.parametrize(("case", "skipped"), _params("skipped"))
def test_a_block_seg_cannot_place_is_left_alone_and_reported(case, skipped):
    model = case.model(skipped.setup)
    if skipped.mangle is not None:
        skipped.mangle(model)
    inputs, skips = case.inputs(model, skipped.setup), []
    chosen = _chosen(model, skipped.spec)
    got = seg(case, model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, call(case, model, inputs))
    reported = [s[0] for s in skips]
    assert (reported if skipped.once else list(dict.fromkeys(reported))) == list(chosen), reported
    for report in skips:
        if skipped.verbatim:
            assert report[3:] == skipped.reasons, report
        elif skipped.reasons:
            assert all(reason in report[3] for reason in skipped.reasons), report
        else:  # the query count holds no grid: no reason to add
            assert len(report) == 3, report
        assert skipped.queries is None or report[1] == skipped.queries, report
        assert skipped.grid is ANY or report[2] == skipped.grid, report


@pytest.mark.parametrize(("case", "unpatched"), _params("unpatched"))
def test_the_patch_is_read_from_the_model_without_a_patch_size(case, unpatched):
    model, inputs = case.make(unpatched.setup)
    if hasattr(model, "patch_size"):
        del model.patch_size
    assert not hasattr(model, "patch_size")
    if unpatched.patch is not None:
        assert model_patch_size(model, inputs["x"].shape[1]) == unpatched.patch
    chosen = _chosen(model, "all")
    assert_network_close(seg(case, model, inputs, chosen, 2.0), slow(case, model, inputs, chosen, 2.0))


_VARIANTS = [(case, variant) for case in CASES for variant in case.variants]
_MODELS = [pytest.param(case, variant, id="-".join(filter(None, (case.name, variant)))) for case, variant in _VARIANTS]


@pytest.mark.parametrize(("case", "variant"), _MODELS)
def test_no_chosen_block_is_the_plain_call_bit_for_bit(case, variant):
    model, inputs = case.make(next(e.setup for e in case.exact if e.setup.variant == variant))
    with blurred_dit_queries(model, [], 2.0):
        got = call(case, model, inputs)
    assert torch.equal(got, call(case, model, inputs))


@pytest.mark.parametrize(("case", "variant"), _MODELS)
def test_an_interrupted_block_leaves_no_hook_and_every_host_function_in_place(case, variant):
    """While armed, an attention-call family's module global is SEG's wrapper; whatever ends the block (here an
    interruption) puts the host's function back and leaves no hook on any module."""
    model = case.build(**case.variants[variant])
    seams = [getattr(module, name) for module, name in case.seams]
    with pytest.raises(RuntimeError, match="interrupted"), blurred_dit_queries(model, _chosen(model, "all"), 2.0):
        for (module, name), host in zip(case.seams, seams, strict=True):
            assert getattr(module, name) is not host, f"{name} is not wrapped while armed"
        raise RuntimeError("interrupted")
    assert [getattr(module, name) for module, name in case.seams] == seams
    assert _no_hooks(model)


def _builder(case, variant):
    return lambda: case.build(**case.variants[variant])


_CLAIMS = [pytest.param(_builder(c, v), c.family_of(v), id=p.id) for (c, v), p in zip(_VARIANTS, _MODELS, strict=True)]


SHARED = {FLUX2: [FLUX1]}  # Flux.2 keeps Flux.1's block lists: FLUX1 claims it too, and FLUX2 is asked first


@pytest.mark.parametrize(("build", "family"), _CLAIMS)
def test_exactly_one_registered_family_claims_each_test_model(build, family):
    model = build()
    assert [f for f in FAMILIES if f.matches(model)] == [family, *SHARED.get(family, [])]
    assert family_of(model) is family and dit_family(model) == family.name


@pytest.mark.parametrize(
    ("case", "variant"), [p for p, (case, _) in zip(_MODELS, _VARIANTS, strict=True) if case.defining]
)
def test_without_its_defining_module_no_family_claims_the_model(case, variant):
    model = case.build(**case.variants[variant])
    assert family_of(model) is case.family_of(variant)
    delattr(model, case.defining)
    assert not case.family_of(variant).matches(model) and dit_family(model) is None


def _released() -> list:
    return [
        pytest.param(case, family, name, id=f"{case.name}-{name}")
        for case in CASES
        for family in dict.fromkeys([case.family, *case.families.values()])
        for name in family.released
    ]


@pytest.mark.parametrize(("case", "family", "name"), _released())
def test_block_names_and_the_middle_default_at_a_released_models_depth(case, family, name):
    """The family's model, narrow, with a released model's block counts (the family's facts, whose defaults
    tests/dit/test_released.py checks) has those blocks, and ``middle`` selects the family's default for them."""
    counts = family.released[name]
    blocks, model = model_layers(**counts), case.narrow(family, **counts)
    assert family_of(model) is family and (family.default is not None) == case.published
    assert available_layers(model) == blocks
    target, default = query_target(model), resolve_layers(family.default_for(blocks), blocks)
    assert target.resolve("middle") == default
    assert default_spec(model) == target.canonical("middle") == format_layers(default)  # infotext names the blocks
    picked = blocks[1:4] + blocks[5:6]
    spec = format_layers(picked)  # a range and a block
    assert target.resolve(spec) == picked and target.canonical(spec) == spec
    assert target.resolve(format_layers((blocks[0], blocks[-1]))) == (blocks[0], blocks[-1])
    for kind in dict.fromkeys(layer.kind for layer in blocks):  # the kind's preset word: every block of it
        assert target.resolve(kind) == tuple(layer for layer in blocks if layer.kind == kind)
    past = DitLayer(blocks[-1].kind, blocks[-1].index + 1)
    with pytest.raises(ValueError, match=f"it has {format_layers(blocks)}"):
        target.resolve(format_layers((past,)))


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_middle_on_the_tiny_model_is_its_middle_block(case):
    assert default_spec(case.build(**next(iter(case.variants.values())))) == case.middle
