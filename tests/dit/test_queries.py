"""lib_seg.dit.queries.blur_image_queries: only the image rows, over the patch grid, in every layout."""

import math

import pytest
import torch

from lib_seg.dit.geometry import image_token_slice, patch_grid
from lib_seg.dit.queries import blur_image_queries
from tests.core.test_blur import blur_bound, reference_blur
from tests.support.tolerance import assert_within, max_abs, sum_rounding_bound

SIGMAS = [0.7, 2.5, 100.0, math.inf]
HEADS, HEAD_DIM, N_TXT, N_EXTRA = 3, 4, 5, 3


def joint_queries(grid, layout, batch=2, dtype=torch.float64, seed=0):
    """Queries of ``[txt | img | extra]`` in ``layout``, and the image slice."""
    torch.manual_seed(seed)
    length = N_TXT + grid[0] * grid[1] + N_EXTRA
    q = torch.randn(batch, length, HEADS, HEAD_DIM, dtype=dtype)
    return to_layout(q, layout), image_token_slice(N_TXT, *grid)


def to_layout(q_blhd, layout):
    if layout == "bhld":
        return q_blhd.transpose(1, 2).contiguous()
    return q_blhd.flatten(2) if layout == "bld" else q_blhd


def image_tokens(q, layout, image):
    """(B, N, heads*D) image queries, read independently of the module's reshaping."""
    blhd = q.transpose(1, 2) if layout == "bhld" else q.unflatten(-1, (HEADS, HEAD_DIM)) if layout == "bld" else q
    return blhd[:, image].reshape(q.shape[0], image.stop - image.start, HEADS * HEAD_DIM)


def non_image(q, layout, image):
    axis = 2 if layout == "bhld" else 1
    return torch.cat([q.narrow(axis, 0, image.start), q.narrow(axis, image.stop, q.shape[axis] - image.stop)], axis)


@pytest.mark.parametrize("layout", ["bhld", "blhd", "bld"])
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("latent,pad", [((8, 8), True), ((7, 10), True), ((7, 10), False), ((12, 6), True)])
def test_image_rows_match_the_dense_reference(layout, sigma, latent, pad):
    grid = patch_grid(*latent, pad=pad)  # non-square grids, odd latents with and without padding
    q, image = joint_queries(grid, layout)
    out = blur_image_queries(q, image, grid, sigma, layout)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = reference_blur(image_tokens(q, layout, image), *grid, sigma)
    assert_within(image_tokens(out, layout, image), expected, blur_bound(q, *grid, sigma, q.dtype), "image queries")
    assert torch.equal(non_image(out, layout, image), non_image(q, layout, image)), "text/extra rows changed"


@pytest.mark.parametrize("sigma", [1.0, math.inf])
def test_layouts_agree_bit_for_bit(sigma):
    grid = (3, 5)
    results = []
    for layout in ("bhld", "blhd", "bld"):
        q, image = joint_queries(grid, layout, dtype=torch.float32)
        results.append(image_tokens(blur_image_queries(q, image, grid, sigma, layout), layout, image))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_infinite_sigma_is_the_mean_of_the_image_queries():
    grid = patch_grid(9, 14)
    q, image = joint_queries(grid, "bhld")
    out = blur_image_queries(q, image, grid, math.inf, "bhld")
    tokens = image_tokens(out, "bhld", image)
    mean = image_tokens(q, "bhld", image).mean(dim=1, keepdim=True).expand_as(tokens)
    assert_within(tokens, mean, 2 * sum_rounding_bound(torch.float64, grid[0] * grid[1], max_abs(q)))
    assert torch.equal(tokens, tokens[:, :1].expand_as(tokens))  # one query for the whole image


def test_input_untouched_and_double_block_image_only_queries():
    grid = (4, 4)
    q = torch.randn(1, HEADS, 16, HEAD_DIM)
    copy = q.clone()
    out = blur_image_queries(q, slice(0, 16), grid, 1.5, "bhld")  # a double block's image-only q
    assert torch.equal(q, copy) and out.data_ptr() != q.data_ptr()
    assert not torch.equal(out, q)


@pytest.mark.parametrize("layout", ["bhld", "bld"])
@pytest.mark.parametrize("rows", [[1, 3], slice(2, 4), torch.tensor([0])])
def test_rows_limit_the_blur(layout, rows):
    grid = (3, 4)
    q, image = joint_queries(grid, layout, batch=4)
    out = blur_image_queries(q, image, grid, 1.3, layout, rows=rows)
    chosen = torch.arange(4)[rows].tolist()
    separate = blur_image_queries(q[chosen], image, grid, 1.3, layout)
    assert_within(out[chosen], separate, 2 * blur_bound(q, *grid, 1.3, q.dtype), "batched SEG rows")
    others = [i for i in range(4) if i not in chosen]
    assert torch.equal(out[others], q[others])
    assert torch.equal(non_image(out, layout, image), non_image(q, layout, image))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype_and_text_bits(dtype):
    grid = (4, 6)
    q, image = joint_queries(grid, "blhd", dtype=dtype)
    out = blur_image_queries(q, image, grid, 2.0, "blhd")
    assert out.dtype == dtype
    assert torch.equal(non_image(out, "blhd", image), non_image(q, "blhd", image))
    expected = reference_blur(image_tokens(q, "blhd", image), *grid, 2.0)
    assert_within(image_tokens(out, "blhd", image), expected, blur_bound(q, *grid, 2.0, dtype))


@pytest.mark.parametrize(
    "shape,layout,image,grid,match",
    [
        ((1, 2, 20, 4), "bhld", slice(4, 20), (4, 5), "not the 4x5 patch grid"),
        ((1, 2, 20, 4), "bhld", slice(4, 20, 2), (2, 4), "not the 2x4 patch grid"),
        ((1, 20, 8), "bld", slice(4, 30), (4, 5), "not the 4x5 patch grid"),
        ((1, 20, 8), "blhd", slice(0, 20), (4, 5), "not in 'blhd' layout"),
        ((1, 20, 8), "lbd", slice(0, 20), (4, 5), "unknown query layout 'lbd'"),
    ],
)
def test_errors(shape, layout, image, grid, match):
    with pytest.raises(ValueError, match=match):
        blur_image_queries(torch.zeros(shape), image, grid, 1.0, layout)


def test_sigma_is_checked():
    with pytest.raises(ValueError, match="blur sigma must be > 0"):
        blur_image_queries(torch.zeros(1, 4, 2), slice(0, 4), (2, 2), 0.0, "bld")


@pytest.mark.parametrize("layout", ["bld", "blhd", "bhld"])
def test_frames_are_blurred_each_over_its_own_grid_in_one_call(layout):
    """``frames`` consecutive frames (a video's image tokens) blur as that many single-frame blurs would,
    every other token and the unchosen batch rows bit for bit; a slice that is not whole frames fails."""
    generator = torch.Generator().manual_seed(5)
    shape = {"bld": (3, 2 + 3 * 12 + 1, 8), "blhd": (3, 2 + 3 * 12 + 1, 2, 4), "bhld": (3, 2, 2 + 3 * 12 + 1, 4)}
    q = torch.randn(*shape[layout], generator=generator, dtype=torch.float64)
    grid, rows = (3, 4), [0, 2]
    got = blur_image_queries(q, slice(2, 2 + 36), grid, 1.5, layout, rows, frames=3)
    expected = q
    for frame in range(3):
        start = 2 + 12 * frame
        expected = blur_image_queries(expected, slice(start, start + 12), grid, 1.5, layout, rows)
    bound = 2 * sum_rounding_bound(torch.float64, 2 * sum(grid), max_abs(q))  # two separable passes, each way
    assert_within(got, expected, bound, "frames in one call vs one call per frame")
    untouched = [t for t in range(shape[layout][2 if layout == "bhld" else 1]) if not 2 <= t < 38]
    pick = (slice(None), slice(None), untouched) if layout == "bhld" else (slice(None), untouched)
    assert torch.equal(got[pick], q[pick]) and torch.equal(got[1], q[1])
    with pytest.raises(ValueError, match="are not 3 frames of the 3x4 patch grid"):
        blur_image_queries(q, slice(2, 37), grid, 1.5, layout, rows, frames=3)
