"""SEG on Ernie-Image: the post-RoPE image queries blurred at the attention seam, against a float64 logit blur.

The model is tests/support/dit_ernie.py (Neo 2.26's ``ErnieImageModel``: ``[image | text]``, patch-1
convolution embedding, split-half RoPE maps that are no rotations, ``attention_function`` called by its
module-global name).  The slow path never touches a query: the chosen layers compute attention explicitly and
blur the image rows (the first ``N`` tokens) of their pre-softmax logits.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.families import FAMILIES, family_of
from lib_seg.dit.families.ernie import ERNIE, RELEASED, ids_on_grid
from lib_seg.dit.families.krea import KREA2
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import shared_prefix
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support import dit_ernie
from tests.support.dit_blocks import Hooks
from tests.support.dit_ernie import ErnieAttention, TinyErnie, split_half_maps
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_krea import TinyKrea2
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close

N_TXT = 5
LATENTS = [(6, 6), (9, 13), (5, 12), (1, 7)]  # square, odd sides, non-square, one row (patch 1)


def _build(**kwargs) -> TinyErnie:
    return randomize(TinyErnie(**kwargs), seed=3).double().eval()


def _inputs(latent, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, *latent, generator=g, dtype=torch.float64)
    context = torch.randn(batch, N_TXT, 12, generator=g, dtype=torch.float64)
    return {"x": x, "timesteps": torch.rand(batch, generator=g, dtype=torch.float64), "context": context}


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@contextmanager
def _slow_reference(model, chosen, sigma, grid, rows=None):
    attns = [model.layers[layer.index].self_attention for layer in chosen]
    for attn in attns:  # the image is the first grid[0] * grid[1] tokens
        attn.hooks = Hooks(logits=blur_logit_rows(slice(0, grid[0] * grid[1]), grid, sigma, rows))
    try:
        yield
    finally:
        for attn in attns:
            attn.hooks = Hooks()


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    grid = patch_grid(*inputs["x"].shape[-2:], model.x_embedder.patch_size, pad=False)
    with _slow_reference(model, chosen, sigma, grid, rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


@pytest.mark.parametrize("sigma", [0.9, 3.0, math.inf])
@pytest.mark.parametrize("patch,latent", [*((1, lat) for lat in LATENTS), (2, (6, 10)), (2, (4, 2))], ids=str)
def test_ernie_queries_equal_blurred_logit_rows_on_the_true_grid(patch, latent, sigma):
    model, inputs = _build(patch=patch), _inputs(latent)
    plain = _call(model, inputs)
    for spec in ["l1", "all", "l0,l2"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"
    assert dit_ernie.attention_function is _host_attention  # the seam is restored


_host_attention = dit_ernie.attention_function


def test_text_queries_and_all_keys_and_values_entering_attention_stay_bit_identical(monkeypatch):
    model, inputs, seen = _build(), _inputs((5, 7)), []

    def recorder(q, k, v, heads, **kwargs):
        seen.append((q, k, v))
        return _host_attention(q, k, v, heads, **kwargs)

    monkeypatch.setattr(dit_ernie, "attention_function", recorder)
    _call(model, inputs)
    with blurred_dit_queries(model, resolve_layers("l1", available_layers(model)), 2.0):
        _call(model, inputs)
    assert dit_ernie.attention_function is recorder and len(seen) == 6
    (q0, k0, v0), (q1, k1, v1) = seen[1], seen[4]  # layer 1, without and with SEG
    n_image = 5 * 7
    assert torch.equal(q1[:, n_image:], q0[:, n_image:]) and not torch.equal(q1[:, :n_image], q0[:, :n_image])
    assert torch.equal(k1, k0) and torch.equal(v1, v0)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], seen[3], strict=True))  # l0 runs before the blur


def test_batched_rows_equal_separate_calls():
    model, inputs = _build(), _inputs((7, 9))
    chosen = resolve_layers("l0,l2", available_layers(model))
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: _build(patch_attr=2), "do not hold 4x6 image and 5 text tokens"),  # a lying patch_size
        (lambda: _build(transpose_ids=True), "do not lay its image tokens on the 9x13 grid"),
    ],
    ids=["count", "ids"],
)
def test_a_grid_the_sequence_or_the_ids_contradict_is_skipped_with_a_warning(build, message):
    model, inputs, skips = build(), _inputs((9, 13)), []
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [s[0] for s in skips] == list(chosen) and all(message in s[3] for s in skips)


class _Unreachable(ErnieAttention):
    """A host whose attention calls its kernel by a qualified name: no module-global seam to wrap."""

    def forward(self, x, attention_mask=None, image_rotary_emb=None):
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        q, k = (dit_ernie.apply_split_half(t, image_rotary_emb).flatten(2) for t in (q, k))
        return self.to_out[0](dit_ernie.attention_function(q, k, self.to_v(x), self.heads))


def test_a_layer_whose_attention_seam_cannot_be_reached_is_skipped():
    model, inputs, skips = _build(), _inputs((4, 5)), []
    attention = model.layers[1].self_attention
    attention.__class__ = _Unreachable
    chosen = resolve_layers("l1", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert skips == [(DitLayer("layer", 1), 20 + N_TXT, None, skips[0][3])] and "never reached SEG" in skips[0][3]


def test_the_seam_is_restored_when_the_call_fails():
    model, inputs = _build(), _inputs((4, 4))
    with pytest.raises(RuntimeError), blurred_dit_queries(model, resolve_layers("l2", available_layers(model)), 2.0):
        assert dit_ernie.attention_function is not _host_attention
        model(inputs["x"], inputs["timesteps"], inputs["context"][..., :5])  # wrong text width: text_proj fails
    assert dit_ernie.attention_function is _host_attention


def test_unchosen_layers_pass_through_the_seam_bit_for_bit():
    model, inputs, outputs = _build(), _inputs((4, 5)), []
    handles = [layer.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for layer in model.layers]
    _call(model, inputs)
    _seg(model, inputs, resolve_layers("l2", available_layers(model)), 2.0)
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


def test_family_detection_is_by_structure_and_claims_no_other_model():
    ernie = _build()
    assert family_of(ernie) is ERNIE and dit_family(ernie) == "ernie"
    assert not any(family.matches(ernie) for family in FAMILIES if family is not ERNIE)
    for other in (TinyFlux(), TinyFlux2(), TinyMMDiT(), TinyKrea2()):
        assert not ERNIE.matches(other)
    assert not KREA2.matches(ernie)
    del ernie.pos_embed
    assert not ERNIE.matches(ernie)


def test_block_names_and_the_middle_default_on_the_released_depth():
    released = TinyErnie(hidden=16, heads=1, layers=RELEASED["ernie-image"])
    assert available_layers(released) == model_layers(layer=36)
    assert default_spec(released) == "l18"
    target = query_target(released)
    assert target.resolve("middle") == (DitLayer("layer", 18),) and target.canonical("middle") == "l18"
    with pytest.raises(ValueError, match="it has l0-35"):
        target.resolve("l36")


def test_prefix_reuse_skips_the_seg_rows_in_the_prefix_layers():
    model = _build(layers=4)
    inputs = {k: with_seg_rows(v, 2) for k, v in _inputs((6, 7)).items()}
    chosen = resolve_layers("l2", available_layers(model))
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    seen: list[int] = []
    record = lambda _m, args: seen.append(args[0].shape[0])  # noqa: E731
    handles = [layer.self_attention.to_q.register_forward_pre_hook(record) for layer in model.layers]
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4)):
        full = _call(model, inputs)
        seen.clear()
        with shared_prefix(model, chosen, 4, 2, drop, expand):
            shared = _call(model, inputs)
    for handle in handles:
        handle.remove()
    assert seen == [2, 2, 4, 4]
    assert_network_close(shared, full)
    assert not torch.equal(full[:2], full[2:])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
