"""SEG on Anima: the self-attention queries of the image blurred over its grid, against a float64 logit blur.

The model is tests/support/dit_anima.py (Neo 2.26's Anima: Cosmos-Predict2 blocks on 5-D latents, patches
1x2x2, split-half 3D RoPE after the per-head q-norm, cross-attention to the LLM adapter's output, reference
latents appended as frames).  The slow path never touches a query: the chosen blocks compute their
self-attention explicitly and blur the image frames' logit rows with the dense reference blur.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lib_seg.core.batching import with_seg_rows, without_seg_rows
from lib_seg.core.targets import query_target
from lib_seg.dit.families.anima import RELEASED
from lib_seg.dit.families.wan import blur_frames, rotate
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.layers import DitLayer, model_layers, resolve_layers
from lib_seg.dit.prefix import shared_prefix
from tests.support.dit_anima import TinyAnima, VideoRope3D, rope_split_half
from tests.support.dit_blocks import Hooks
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.dit_wan import TinyWan, blurred_frame_logits
from tests.support.tolerance import FLOAT64_NETWORK_REL, assert_network_close, assert_within, max_abs

N_TXT = 6
LATENTS = [(1, 6, 6), (1, 9, 13), (1, 5, 12), (2, 5, 7)]  # (T, H, W): square, odd sides, non-square, two frames
SIGMAS = [0.9, 3.0, math.inf]


def _build(**kwargs) -> TinyAnima:
    return randomize(TinyAnima(**kwargs), seed=11).double().eval()


def _inputs(latent, batch: int = 2, refs: int = 0, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, N_TXT, 12)}
    inputs["timesteps"] = torch.rand(batch, generator=generator, dtype=torch.float64)
    if refs:
        inputs["ref_latents"] = [draw(batch, 4, 1, *latent[1:]) for _ in range(refs)]
    return inputs


def _grid(latent) -> tuple[int, int]:
    return -(-latent[1] // 2), -(-latent[2] // 2)


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    latent = tuple(inputs["x"].shape[2:])
    with blurred_frame_logits([model.blocks[layer.index] for layer in chosen], sigma, latent[0], _grid(latent), rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("latent", LATENTS, ids=str)
def test_anima_queries_equal_blurred_logit_rows(latent, sigma):
    model, inputs = _build(), _inputs(latent)
    plain = _call(model, inputs)
    for spec in ["b1", "all"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


@pytest.mark.parametrize("refs", [1, 2])
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_reference_latents_are_left_alone(sigma, refs):
    """Neo's Anima reference (edit) latents follow the image as frames; only the image frame is blurred."""
    model, inputs = _build(), _inputs((1, 7, 6), refs=refs)
    chosen = resolve_layers("b0,b2", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, sigma), _slow(model, inputs, chosen, sigma))


def test_rotate_split_half_is_the_hosts_rope_and_inverts():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3 * 2 * 4, 2, 16, generator=generator, dtype=torch.float64)
    rope = VideoRope3D(16)(torch.zeros(1, 3, 2, 4, 16))[None, :, None]  # (1, L, 1, D/2, 2, 2)
    assert_within(rotate(x, rope, "split_half"), rope_split_half(x, rope), 1e-14 * max_abs(x), "split-half RoPE")
    assert not torch.allclose(rotate(x, rope, "split_half"), rotate(x, rope))  # the pairing matters
    assert_within(rotate(rotate(x, rope, "split_half"), rope.transpose(-1, -2), "split_half"), x, 1e-14 * max_abs(x))


def test_only_image_queries_change_and_keys_values_stay():
    """Entering the chosen block's self-attention: keys, values and the reference frame's queries are
    bit-identical; the image queries are the blur of the plain ones (after RoPE); the cross-attention's
    q-norm gets no hook."""
    model, inputs = _build(), _inputs((1, 5, 6), refs=1)
    layer, block = DitLayer("block", 1), model.blocks[1]
    block.hooks = Hooks(seen={})
    try:
        _call(model, inputs)
        plain = dict(block.hooks.seen)
        with blurred_dit_queries(model, [layer], 2.0):
            assert block.self_attn.q_norm._forward_hooks and not block.cross_attn.q_norm._forward_hooks
            _call(model, inputs)
            seg = dict(block.hooks.seen)
    finally:
        block.hooks = Hooks()
    assert torch.equal(plain["k"], seg["k"]) and torch.equal(plain["v"], seg["v"])
    n_image = 3 * 3
    assert torch.equal(plain["q"][:, :, n_image:], seg["q"][:, :, n_image:])
    tokens = lambda q: q[:, :, :n_image].transpose(1, 2).flatten(2)  # noqa: E731
    expected = blur_frames(tokens(plain["q"]), 1, (3, 3), 2.0)
    assert_within(tokens(seg["q"]), expected, FLOAT64_NETWORK_REL * max_abs(expected), "image queries")


def test_batched_rows_equal_separate_calls():
    model, inputs = _build(), _inputs((1, 7, 9), refs=1)
    chosen = resolve_layers("b0,b2", available_layers(model))
    doubled = {
        k: [torch.cat([r, r]) for r in v] if isinstance(v, list) else torch.cat([v, v]) for k, v in inputs.items()
    }
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))


def test_queries_that_are_not_the_blocks_grid_are_skipped_with_a_warning():
    """An attention call on other tokens than the block's grid (a tiling extension's sub-grid) is left as
    it is, with a warning."""
    model, inputs, skips = _build(), _inputs((1, 6, 8)), []
    norm = model.blocks[1].self_attn.q_norm
    q = torch.randn(2, 5, 2, 16, dtype=torch.float64)
    with torch.no_grad(), blurred_dit_queries(model, [DitLayer("block", 1)], 2.0, on_skip=lambda *a: skips.append(a)):
        model(**inputs)
        assert not skips
        got = norm(q)
    assert torch.equal(got, norm(q))
    assert skips == [(DitLayer("block", 1), 5, (3, 4))]


def test_prefix_reuse_skips_the_seg_rows_in_the_prefix_blocks():
    """The blocks' rotations are one row for all (left as they are); every per-row argument is slimmed."""
    model, inputs = _build(), _inputs((1, 5, 6), batch=2)
    chosen = resolve_layers("b2", available_layers(model))
    seg = {k: with_seg_rows(v, 2) for k, v in inputs.items()}  # (cond, SEG) rows, as Forge appends them
    seen: list[int] = []
    blocks = model.blocks[:2]
    handles = [b.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0])) for b in blocks]
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    try:
        with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4)):
            full = _call(model, seg)
            seen.clear()
            with shared_prefix(model, chosen, 4, 2, drop, expand):
                shared = _call(model, seg)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [2, 2]
    assert_network_close(shared, full)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_family_detection_tells_anima_from_the_others():
    assert dit_family(TinyAnima()) == "anima" and dit_family(TinyWan()) == "wan"
    for other in (TinyFlux(), TinyFlux2(), TinyMMDiT()):
        assert dit_family(other) not in ("wan", "anima")


def test_block_names_and_the_middle_default_at_the_released_depth():
    depth = RELEASED["anima"]
    model = TinyAnima(model_channels=12, num_heads=1, num_blocks=depth, adaln_lora_dim=2)
    assert available_layers(model) == model_layers(block=depth)
    assert default_spec(model) == "b14" and query_target(model).canonical("middle") == "b14"
    assert query_target(model).resolve("b0,b27") == (DitLayer("block", 0), DitLayer("block", 27))
    with pytest.raises(ValueError, match="it has b0-27"):
        query_target(model).resolve("b28")
