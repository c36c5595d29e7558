"""lib_seg.dit.queries RoPE helpers: rope(blur_before_rope(q)) == blur(rope(q)), to rounding.

Rounding bounds (tests/support/tolerance.py): a rotation is a 2-term sum per output, the blur a sum
of at most ``N + 1`` terms (the mean; the axis products use fewer); both sides of the identity are
chains of these maps applied to values whose pair norms stay within ``2 max|q|`` (rotations keep a
pair's norm, the convex blur keeps each channel within its range, hence a pair within sqrt(2) of it),
so every sum's |addends| are within ``2 sqrt(2) max|q|``.
"""

import math

import pytest
import torch

from lib_seg.dit.geometry import image_token_slice, patch_grid
from lib_seg.dit.queries import apply_rope, blur_before_rope, blur_image_queries, inverse_rope
from tests.support.dit_blocks import rope_complex, rope_rotations, token_ids
from tests.support.tolerance import assert_within, max_abs, sum_rounding_bound, unit_roundoff

AXES, HEADS, N_TXT, N_EXTRA = (4, 6, 6), 3, 4, 3


def chain_bound(q: torch.Tensor, grid, dtype=torch.float64) -> float:
    """Rounding of R(R^T(blur(R q))) and of blur(R q), each against the exact blur(R q)."""
    blur_terms = grid[0] * grid[1] + 1
    terms = (3 * 2 + blur_terms) + (2 + blur_terms) + 4  # + 4: pe's cos^2 + sin^2 = 1 only to rounding
    return sum_rounding_bound(dtype, terms, 2 * math.sqrt(2) * max_abs(q))


def joint(grid, batch=2, dtype=torch.float64, seed=0):
    """Joint ``[txt | img | extra]`` queries (B, heads, L, D), their rotations and the image slice."""
    torch.manual_seed(seed)
    pe = rope_rotations(token_ids(N_TXT, *grid, N_EXTRA, batch=batch) * 7.0, AXES)  # * 7: large angles
    q = torch.randn(batch, HEADS, pe.shape[2], sum(AXES), dtype=dtype)
    return q, pe, image_token_slice(N_TXT, *grid)


def test_apply_rope_is_complex_multiplication():
    q, pe, _ = joint((3, 4))
    bound = 2 * sum_rounding_bound(torch.float64, 2, math.sqrt(2) * max_abs(q))
    assert_within(apply_rope(q, pe), rope_complex(q, pe), bound, "rotation vs complex product")
    assert_within(inverse_rope(apply_rope(q, pe), pe), q, 2 * bound + 4 * unit_roundoff(torch.float64) * max_abs(q))
    assert not torch.allclose(apply_rope(q, pe), q)


@pytest.mark.parametrize("sigma", [0.8, 2.0, 30.0, math.inf])
@pytest.mark.parametrize("latent,pad", [((6, 6), True), ((7, 11), True), ((7, 11), False), ((4, 12), True)])
def test_single_block_joint_queries(sigma, latent, pad):
    """Single-stream hook: QK-norm output of the whole joint sequence, with the whole ``pe``."""
    grid = patch_grid(*latent, pad=pad)
    q, pe, image = joint(grid)
    out = blur_before_rope(q, pe, image, grid, sigma)
    expected = blur_image_queries(apply_rope(q, pe), image, grid, sigma, "bhld")
    assert_within(apply_rope(out, pe), expected, chain_bound(q, grid), "rope(blur_before_rope(q))")
    assert torch.equal(out[:, :, : image.start], q[:, :, : image.start]), "text rows changed"
    assert torch.equal(out[:, :, image.stop :], q[:, :, image.stop :]), "extra (Kontext) rows changed"


@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_double_block_image_queries_with_the_image_part_of_pe(sigma):
    """Double-stream hook: the image stream's q alone, with ``pe[:, :, n_txt:]``."""
    grid = patch_grid(9, 6)
    q, pe, image = joint(grid)
    q_img, pe_img = q[:, :, image], pe[:, :, image]
    whole = slice(0, grid[0] * grid[1])
    out = blur_before_rope(q_img, pe_img, whole, grid, sigma)
    expected = blur_image_queries(apply_rope(q, pe), image, grid, sigma, "bhld")[:, :, image]
    assert_within(apply_rope(out, pe_img), expected, chain_bound(q, grid))


def test_blurring_before_rope_without_the_identity_is_wrong():
    """Why the identity is needed: RoPE rotates each token differently, so it does not commute."""
    grid = (4, 4)
    q, pe, image = joint(grid)
    naive = apply_rope(blur_image_queries(q, image, grid, 2.0, "bhld"), pe)
    exact = blur_image_queries(apply_rope(q, pe), image, grid, 2.0, "bhld")
    assert max_abs(naive - exact) > 0.1


def test_rows_and_a_shared_pe():
    """Batched SEG rows with one ``pe`` for the batch (B = 1, as Flux's ids are per image)."""
    grid = (3, 5)
    q, pe, image = joint(grid, batch=4)
    pe = pe[:1]
    out = blur_before_rope(q, pe, image, grid, 1.2, rows=[0, 2])
    separate = blur_before_rope(q[[0, 2]], pe, image, grid, 1.2)
    assert_within(out[[0, 2]], separate, 2 * chain_bound(q, grid))
    assert torch.equal(out[[1, 3]], q[[1, 3]])
    per_row_pe = blur_before_rope(q, pe.expand(4, -1, -1, -1, -1, -1), image, grid, 1.2, rows=slice(0, 3, 2))
    assert_within(per_row_pe, out, 2 * chain_bound(q, grid))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_queries(dtype):
    """Rotation and blur run in float32 (pe's dtype), rounded once to q's dtype at the end."""
    grid = (4, 4)
    q64, pe, image = joint(grid)
    q, pe32 = q64.to(dtype), pe.float()
    out = blur_before_rope(q, pe32, image, grid, 1.0)
    assert out.dtype == dtype
    assert torch.equal(out[:, :, : image.start], q[:, :, : image.start])
    host = apply_rope(out.float(), pe32)  # the host's RoPE, in float32
    expected = blur_image_queries(apply_rope(q.double(), pe), image, grid, 1.0, "bhld")
    bound = math.sqrt(2) * unit_roundoff(dtype) * 2 * max_abs(q) + chain_bound(q, grid, torch.float32)
    assert_within(host, expected, bound + 8 * unit_roundoff(torch.float32) * max_abs(q))


def test_shape_errors():
    q, pe, image = joint((2, 2))
    for bad in (pe[:, :, 1:], pe[..., 1:, :, :], pe[..., 0], torch.cat([pe, pe, pe])):
        with pytest.raises(ValueError, match="do not fit queries"):
            blur_before_rope(q, bad, image, (2, 2), 1.0)
    with pytest.raises(ValueError, match="not the 2x3 patch grid"):
        blur_before_rope(q, pe, image, (2, 3), 1.0)
