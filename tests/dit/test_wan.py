"""SEG on Wan 2.1 / 2.2: what only Wan has (frames, Wan's RoPE layout, its cross-attention); each frame's
self-attention queries blurred over its own grid against a float64 logit blur (videos, CLIP image tokens,
``time_dim_concat`` frames, no q-norm), only the video queries changing, batched rows, prefix reuse and the
sequences that fit no grid are run by tests/dit/test_family_table.py (``wan``).

The model is tests/support/dit_wan.py (Neo 2.26's Wan structure: 5-D latents, Conv3d patches (1, 2, 2),
interleaved 3D RoPE after the full-width q-norm, text cross-attention, CLIP image tokens on i2v,
``time_dim_concat`` frames).  A one-frame call must be exactly image SEG.
"""

from __future__ import annotations

import math

import pytest
import torch

from lib_seg.core.blocks import DitLayer, resolve_layers
from lib_seg.core.blur import blur_queries
from lib_seg.dit.families.wan import blur_frames, blur_frames_before_rope
from lib_seg.dit.hooks import available_layers, blurred_dit_queries
from lib_seg.dit.queries import apply_rope, blur_before_rope
from tests.support.dit_blocks import Hooks, rope_complex, rope_rotations
from tests.support.dit_cases import SIGMAS, WAN_CASE, Setup, call, hooked, seg, video_grid
from tests.support.dit_wan import video_ids
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close, assert_within, max_abs, sum_rounding_bound


@pytest.mark.parametrize("sigma", SIGMAS)
def test_a_one_frame_call_is_image_seg(sigma):
    """One frame: the 2D blur over the H x W grid, the image reference itself (no frame helper)."""
    model, inputs = WAN_CASE.make(Setup((1, 7, 10), "t2v"))
    chosen = resolve_layers("b0,b2", available_layers(model))
    grid = video_grid((7, 10))
    with hooked(
        WAN_CASE, model, chosen, lambda _: Hooks(logits=blur_logit_rows(slice(0, grid[0] * grid[1]), grid, sigma))
    ):
        expected = call(WAN_CASE, model, inputs)
    assert_network_close(seg(WAN_CASE, model, inputs, chosen, sigma), expected)


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


def test_the_cross_attentions_q_norm_gets_no_hook():
    """Only the chosen block's self-attention q-norm is hooked while armed; its cross-attention (text and CLIP
    image tokens) is left alone."""
    model = WAN_CASE.build(model_type="i2v")
    block = model.blocks[1]
    with blurred_dit_queries(model, [DitLayer("block", 1)], 2.0):
        assert block.self_attn.norm_q._forward_hooks and not block.cross_attn.norm_q._forward_hooks
