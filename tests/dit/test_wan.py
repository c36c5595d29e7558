"""SEG on Wan 2.1 / 2.2: each frame's self-attention queries blurred over its own grid, against a float64 logit blur.

The model is tests/support/dit_wan.py (Neo 2.26's Wan structure: 5-D latents, Conv3d patches (1, 2, 2),
interleaved 3D RoPE after the full-width q-norm, text cross-attention, CLIP image tokens on i2v,
``time_dim_concat`` frames).  The slow path never touches a query: the chosen blocks compute their
self-attention explicitly and blur the logit rows of each video frame over that frame's grid with the
dense reference blur.  A one-frame call must be exactly image SEG.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.core.blur import blur_queries
from lib_seg.dit.families.wan import RELEASED, blur_frames, blur_frames_before_rope
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import shared_prefix
from lib_seg.dit.queries import apply_rope, blur_before_rope
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support.dit_anima import TinyAnima
from tests.support.dit_blocks import Hooks, rope_complex, rope_rotations
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.dit_wan import TinyWan, blurred_frame_logits, video_ids
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import (
    FLOAT64_NETWORK_REL,
    assert_network_close,
    assert_within,
    max_abs,
    sum_rounding_bound,
)

N_TXT = 5
VIDEOS = [(1, 6, 6), (1, 9, 13), (3, 5, 8), (2, 7, 4)]  # (T, H, W): one-frame square, odd sides, videos
SIGMAS = [0.9, 3.0, math.inf]


def _build(**kwargs) -> TinyWan:
    return randomize(TinyWan(**kwargs), seed=7).double().eval()


def _inputs(video, batch: int = 2, i2v: bool = False, concat: int = 0, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = {"x": draw(batch, 4, *video), "context": draw(batch, N_TXT, 12)}
    inputs["timestep"] = torch.rand(batch, generator=generator, dtype=torch.float64)
    if i2v:
        inputs["clip_fea"] = draw(batch, 3, 6)
    if concat:
        inputs["time_dim_concat"] = draw(batch, 4, concat, *video[1:])
    return inputs


def _grid(video) -> tuple[int, int]:
    return -(-video[1] // 2), -(-video[2] // 2)  # Neo pads H and W to the patch


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    video = tuple(inputs["x"].shape[2:])
    with blurred_frame_logits([model.blocks[layer.index] for layer in chosen], sigma, video[0], _grid(video), rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("video", VIDEOS, ids=str)
def test_wan_queries_equal_blurred_logit_rows_frame_by_frame(video, sigma):
    model, inputs = _build(), _inputs(video)
    plain = _call(model, inputs)
    for spec in ["b1", "all"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


@pytest.mark.parametrize("variant", ["i2v", "time_dim_concat"])
@pytest.mark.parametrize("sigma", [0.9, math.inf])
@pytest.mark.parametrize("video", [(1, 9, 13), (2, 7, 4)], ids=str)
def test_clip_image_tokens_and_concatenated_frames_are_left_alone(video, sigma, variant):
    """i2v: the cross-attention also attends to CLIP image tokens; time_dim_concat: two more frames follow
    the video in the self-attention.  Neither is blurred."""
    model = _build(model_type="i2v" if variant == "i2v" else "t2v")
    inputs = _inputs(video, i2v=variant == "i2v", concat=2 if variant == "time_dim_concat" else 0)
    chosen = resolve_layers("b0,b2", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, sigma), _slow(model, inputs, chosen, sigma))


def test_without_qk_norm_the_identity_norm_is_hooked():
    model, inputs = _build(qk_norm=False), _inputs((2, 5, 6))
    assert isinstance(model.blocks[0].self_attn.norm_q, torch.nn.Identity)
    chosen = resolve_layers("all", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, 2.0), _slow(model, inputs, chosen, 2.0))


@pytest.mark.parametrize("sigma", SIGMAS)
def test_a_one_frame_call_is_image_seg(sigma):
    """One frame: the 2D blur over the H x W grid, the image reference itself (no frame helper)."""
    model, inputs = _build(), _inputs((1, 7, 10))
    chosen = resolve_layers("b0,b2", available_layers(model))
    grid = _grid((1, 7, 10))
    blocks = [model.blocks[layer.index] for layer in chosen]
    try:
        for block in blocks:
            block.hooks = Hooks(logits=blur_logit_rows(slice(0, grid[0] * grid[1]), grid, sigma))
        expected = _call(model, inputs)
    finally:
        for block in blocks:
            block.hooks = Hooks()
    assert_network_close(_seg(model, inputs, chosen, sigma), expected)


@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_one_frame_blur_before_rope_is_the_image_one(sigma):
    """With one frame, Wan's inverse-rotate / blur / rotate is Flux's image :func:`blur_before_rope`."""
    generator = torch.Generator().manual_seed(1)
    grid, batch, heads, dim = (3, 5), 2, 2, 8
    q = torch.randn(batch, 15 + 4, heads, dim, generator=generator, dtype=torch.float64)  # 4 tokens after the frame
    ids = torch.cat([video_ids(1, *grid, batch), torch.full((batch, 4, 3), 7.0, dtype=torch.float64)], dim=1)
    freqs = rope_rotations(ids, (4, 2, 2)).movedim(1, 2)  # (B, L, 1, D/2, 2, 2), as Wan passes them
    got = blur_frames_before_rope(q, freqs, 1, grid, sigma, rows=[1])
    image = blur_before_rope(q.transpose(1, 2), freqs.movedim(2, 1), slice(0, 15), grid, sigma, rows=[1])
    assert_within(got, image.transpose(1, 2), sum_rounding_bound(torch.float64, 64, max_abs(q)), "one frame")
    assert torch.equal(got[0], q[0]) and torch.equal(got[:, 15:], q[:, 15:])


@pytest.mark.parametrize("sigma", [0.7, 2.5, math.inf])
@pytest.mark.parametrize("frames,grid", [(1, (4, 4)), (3, (3, 5)), (4, (1, 6)), (2, (7, 1))])
def test_blur_frames_equals_a_loop_over_frames(frames, grid, sigma):
    tokens = torch.randn(
        2, frames * grid[0] * grid[1], 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    n = grid[0] * grid[1]
    loop = torch.cat([blur_queries(tokens[:, f * n : (f + 1) * n], *grid, sigma) for f in range(frames)], dim=1)
    assert_within(
        blur_frames(tokens, frames, grid, sigma), loop, sum_rounding_bound(torch.float64, 2 * n, max_abs(tokens))
    )
    if math.isinf(sigma):  # each frame's mean query, no temporal mixing
        means = tokens.unflatten(1, (frames, n)).mean(dim=2, keepdim=True).expand(-1, -1, n, -1).flatten(1, 2)
        assert_within(blur_frames(tokens, frames, grid, sigma), means, 1e-14 * max(max_abs(tokens), 1.0))
    with pytest.raises(ValueError, match="not"):
        blur_frames(tokens[:, 1:], frames, grid, sigma)


def test_apply_rope_on_wans_layout_is_the_hosts_interleaved_rope_and_inverts():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 2, 16, generator=generator, dtype=torch.float64)
    freqs = rope_rotations(video_ids(2, 2, 3, 2), (8, 4, 4)).movedim(1, 2)
    assert_within(apply_rope(x, freqs), rope_complex(x, freqs), 1e-14 * max_abs(x), "interleaved RoPE")
    assert_within(apply_rope(apply_rope(x, freqs), freqs.transpose(-1, -2)), x, 1e-14 * max_abs(x), "R^T R")


def test_only_video_queries_change_and_keys_values_stay():
    """Entering the chosen block's self-attention: keys, values and the time_dim_concat frames' queries are
    bit-identical; the video queries are the frame-wise blur of the plain ones (after RoPE); the
    cross-attention's q-norm gets no hook."""
    video, concat = (2, 5, 6), 1
    model, inputs = _build(model_type="i2v"), _inputs(video, i2v=True, concat=concat)
    layer, block = DitLayer("block", 1), model.blocks[1]
    block.hooks = Hooks(seen={})
    try:
        _call(model, inputs)
        plain = dict(block.hooks.seen)
        with blurred_dit_queries(model, [layer], 2.0):
            assert block.self_attn.norm_q._forward_hooks and not block.cross_attn.norm_q._forward_hooks
            _call(model, inputs)
            seg = dict(block.hooks.seen)
    finally:
        block.hooks = Hooks()
    assert torch.equal(plain["k"], seg["k"]) and torch.equal(plain["v"], seg["v"])
    n_video = video[0] * 3 * 3
    assert torch.equal(plain["q"][:, :, n_video:], seg["q"][:, :, n_video:])
    tokens = lambda q: q[:, :, :n_video].transpose(1, 2).flatten(2)  # noqa: E731
    expected = blur_frames(tokens(plain["q"]), video[0], (3, 3), 2.0)
    assert_within(tokens(seg["q"]), expected, FLOAT64_NETWORK_REL * max_abs(expected), "video queries")


def test_batched_rows_equal_separate_calls():
    model, inputs = _build(model_type="i2v"), _inputs((2, 5, 7), i2v=True)
    chosen = resolve_layers("b0,b2", available_layers(model))
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))


@pytest.mark.parametrize(
    "build,reason",
    [
        (lambda: TinyWan(extra_tokens=2), None),  # a sequence longer than the grid (an extension's tokens)
        (lambda: TinyWan(swap_ids=True), "position ids"),  # ids with rows and columns swapped (non-square)
    ],
    ids=["extra tokens", "swapped ids"],
)
def test_a_sequence_that_fits_no_grid_is_skipped_with_a_warning(build, reason):
    model, inputs, skips = randomize(build(), seed=7).double().eval(), _inputs((2, 5, 8)), []
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert sorted({s[0] for s in skips}) == list(chosen)
    if reason is None:
        assert all(len(s) == 3 and s[1] == 2 * 3 * 4 + 2 and s[2] == (3, 4) for s in skips)
    else:
        assert all(reason in s[3] for s in skips)


def test_prefix_reuse_skips_the_seg_rows_in_the_prefix_blocks():
    model, inputs = _build(), _inputs((2, 5, 6), batch=2)
    chosen = resolve_layers("b2", available_layers(model))
    seg = {k: with_seg_rows(v, 2) for k, v in inputs.items()}  # (cond, SEG) rows, as Forge appends them
    seen: list[int] = []
    handles = [
        b.self_attn.q.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0])) for b in model.blocks[:2]
    ]
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
    assert seen == [2, 2]  # in b0 and b1 only the main rows were computed
    assert_network_close(shared, full)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_family_detection_tells_wan_from_the_others():
    assert dit_family(TinyWan()) == "wan" and dit_family(TinyWan(model_type="i2v")) == "wan"
    assert dit_family(TinyAnima()) == "anima"
    for other in (TinyFlux(), TinyFlux2(), TinyMMDiT()):
        assert dit_family(other) not in ("wan", "anima")


@pytest.mark.parametrize("release", sorted(RELEASED))
def test_block_names_and_the_middle_default_at_released_depths(release):
    depth = RELEASED[release]
    model = TinyWan(dim=12, num_heads=1, ffn_dim=8, num_layers=depth)
    assert available_layers(model) == model_layers(block=depth)
    middle = f"b{depth // 2}"
    assert default_spec(model) == middle and query_target(model).canonical("middle") == middle
    assert query_target(model).resolve("middle") == (DitLayer("block", depth // 2),)
    with pytest.raises(ValueError, match=f"it has b0-{depth - 1}"):
        query_target(model).resolve(f"b{depth}")
