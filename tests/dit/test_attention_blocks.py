"""lib_seg.dit.queries inside DiT blocks (tests/support/dit_blocks.py), against a slow float64 path.

The slow path never blurs a query: it computes the attention explicitly and blurs the image rows of
the pre-softmax logits with the dense reference blur of tests/core/test_blur.py.  SEG's blur of the image
queries feeding the fused kernel must give the same block output (paper Prop. 3.1), whichever hook
point a host offers: the q entering attention (after RoPE), Flux's QK-norm output before RoPE
(through ``blur_before_rope``), or MMDiT's ``ln_q`` output.  Float64 comparisons of a whole block use
tests/support/tolerance.py's FLOAT64_NETWORK_REL (about 2.3e-10 of the output's magnitude).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lib_seg.dit.geometry import image_token_slice, patch_grid
from lib_seg.dit.queries import blur_before_rope, blur_image_queries
from tests.support.dit_blocks import DoubleStreamBlock, Hooks, JointBlock, SingleStreamBlock, rope_rotations, token_ids
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close, max_abs

HIDDEN, HEADS, AXES, N_TXT = 32, 2, (4, 6, 6), 5
GRIDS = [patch_grid(6, 6), patch_grid(7, 9, pad=True), patch_grid(7, 9, pad=False), patch_grid(3, 10)]
SIGMAS = [0.9, 3.0, math.inf]
# (block, hook point): the hook points a host adapter may use
ROUTES = [
    ("double", "after_rope"),
    ("double", "qk_norm"),
    ("double_kontext", "qk_norm"),
    ("single", "after_rope"),
    ("single", "qk_norm"),
    ("single_kontext", "qk_norm"),
    ("sd3", "ln_q"),
    ("sd3", "attention_q"),
    ("sd3_identity_ln", "ln_q"),
]


def _random_block(block: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for name, parameter in block.named_parameters():
        if not name.endswith("scale"):  # RMSNorm scales stay near 1
            nn.init.normal_(parameter, std=0.3)
    return block.double()


class Setup:
    """A block with random float64 weights and inputs; ``run(hooks)`` returns every stream's output."""

    def __init__(self, kind: str, grid: tuple[int, int], batch: int = 1, seed: int = 0):
        self.kind, self.grid = kind, grid
        n_img = grid[0] * grid[1]
        n_extra = 3 if kind.endswith("kontext") else 0
        self.image = image_token_slice(N_TXT, *grid)  # in the joint sequence [txt | img | extra]
        torch.manual_seed(seed + 1)
        txt = torch.randn(1, N_TXT, HIDDEN, dtype=torch.float64).expand(batch, -1, -1)
        img = torch.randn(1, n_img + n_extra, HIDDEN, dtype=torch.float64).expand(batch, -1, -1)
        vec = torch.randn(1, HIDDEN, dtype=torch.float64).expand(batch, -1)
        self.pe = rope_rotations(token_ids(N_TXT, *grid, n_extra, batch=batch), AXES)
        if kind.startswith("double"):
            block = _random_block(DoubleStreamBlock(HIDDEN, HEADS), seed)
            self.run = lambda hooks: torch.cat(block(img, txt, vec, self.pe, hooks), dim=1)
        elif kind.startswith("single"):
            block = _random_block(SingleStreamBlock(HIDDEN, HEADS), seed)
            self.run = lambda hooks: block(torch.cat([txt, img], dim=1), vec, self.pe, hooks)
        else:
            block = _random_block(JointBlock(HIDDEN, HEADS, qk_norm=kind == "sd3"), seed)
            self.run = lambda hooks: torch.cat(block(txt, img, vec, hooks), dim=1)

    def seg_hooks(self, route: str, sigma: float, rows=None) -> Hooks:
        """Hooks blurring the image queries at ``route`` with lib_seg.dit."""
        grid, image = self.grid, self.image
        image_only = slice(0, grid[0] * grid[1])  # the image stream's own q: image first, then extra
        if route == "after_rope":
            return Hooks(attention_q=lambda q: blur_image_queries(q, image, grid, sigma, "bhld", rows))
        if route == "attention_q":
            return Hooks(attention_q=lambda q: blur_image_queries(q, image, grid, sigma, "bld", rows))
        if route == "ln_q":
            return Hooks(q_norm=lambda q: blur_image_queries(q, image_only, grid, sigma, "blhd", rows))
        if self.kind.startswith("double"):  # qk_norm of the image stream: pe of its tokens only
            pe = self.pe[:, :, N_TXT:]
            return Hooks(q_norm=lambda q: blur_before_rope(q, pe, image_only, grid, sigma, rows))
        return Hooks(q_norm=lambda q: blur_before_rope(q, self.pe, image, grid, sigma, rows))

    def slow_hooks(self, sigma: float, rows=None) -> Hooks:
        """Explicit attention whose logits get their image rows blurred by the dense reference."""
        return Hooks(logits=blur_logit_rows(self.image, self.grid, sigma, rows))


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("kind,route", ROUTES)
def test_blurred_queries_equal_blurred_logit_rows(kind, route, grid, sigma):
    setup = Setup(kind, grid)
    fast = setup.run(setup.seg_hooks(route, sigma))
    slow = setup.run(setup.slow_hooks(sigma))
    assert_network_close(fast, slow, f"{kind} block, SEG at {route}")
    plain = setup.run(Hooks())
    assert max_abs(fast - plain) > 1e-3 * max_abs(plain), "SEG changed nothing: the test would prove nothing"


@pytest.mark.parametrize("kind", ["double", "single", "sd3"])
def test_slow_path_without_blur_is_the_fused_path(kind):
    setup = Setup(kind, (3, 4))
    assert_network_close(setup.run(Hooks(logits=lambda x: x)), setup.run(Hooks()), "explicit vs fused attention")


@pytest.mark.parametrize("kind,route", ROUTES)
def test_only_image_query_rows_change(kind, route):
    """Keys, values and the text (and Kontext) query rows entering attention are bit-identical."""
    setup = Setup(kind, (3, 5))
    plain, seg = Hooks(seen={}), setup.seg_hooks(route, 1.5)
    seg.seen = {}
    plain_out, seg_out = setup.run(plain), setup.run(seg)
    for name in ("k", "v"):
        assert torch.equal(plain.seen[name], seg.seen[name]), f"{name} changed"
    q0, q1 = plain.seen["q"], seg.seen["q"]  # (B, heads, L, D)
    image = setup.image
    assert torch.equal(q0[:, :, : image.start], q1[:, :, : image.start]), "text query rows changed"
    assert torch.equal(q0[:, :, image.stop :], q1[:, :, image.stop :]), "extra query rows changed"
    assert not torch.allclose(q0[:, :, image], q1[:, :, image])
    text_out = slice(-N_TXT, None) if kind.startswith("double") else slice(0, N_TXT)
    if not kind.startswith("single"):  # separate text weights: the text stream's output is unchanged
        assert_network_close(seg_out[:, text_out], plain_out[:, text_out], "text stream output")


@pytest.mark.parametrize("kind,route", ROUTES)
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_batched_seg_rows_equal_separate_calls(kind, route, sigma):
    """Rows 1 and 3 of a batch of 4 identical inputs are SEG rows; the others are plain."""
    grid = (3, 4)
    batched = Setup(kind, grid, batch=4)
    out = batched.run(batched.seg_hooks(route, sigma, rows=[1, 3]))
    single = Setup(kind, grid, batch=1)
    seg, plain = single.run(single.seg_hooks(route, sigma)), single.run(Hooks())
    for row, expected in ((0, plain), (1, seg), (2, plain), (3, seg)):
        assert_network_close(out[row : row + 1], expected, f"row {row}")
    slow = batched.run(batched.slow_hooks(sigma, rows=[1, 3]))
    assert_network_close(out, slow, "batched SEG rows vs slow path")
