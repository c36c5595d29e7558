"""lib_seg.core.blur against a slow, obvious float64 reference (dense 2D kernel, explicit reflect pad)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lib_seg.core import blur
from lib_seg.core.blur import blur_operator, blur_queries, is_infinite_sigma, kernel_size
from tests.support.tolerance import assert_within, max_abs, sum_rounding_bound, unit_roundoff

SIGMAS = [0.3, 1.0, 2.5, 5.4, 10.0, 100.0, 9999.0, 10000.0, 1e7, math.inf]
GRIDS = [
    (1, 1),
    (1, 7),
    (7, 1),
    (2, 2),
    (3, 3),
    (5, 8),
    (8, 5),
    (16, 16),
    (17, 9),
    (32, 64),
    (24, 56),
    (13, 29),
    (64, 64),
    (128, 128),
    (9, 21),
]


def _reflect_index(i: int, side: int) -> int:
    if i < 0:
        return -i
    if i >= side:
        return 2 * (side - 1) - i
    return i


def reference_blur(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Official SEG-SDXL semantics, spelled out: dense k_h x k_w kernel over a reflect-padded map."""
    q = q.double()
    if sigma > 9999:
        return q.mean(dim=1, keepdim=True).expand_as(q)
    sizes = []
    for side in (height, width):
        k = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        sizes.append(min(k, side + 1 if side % 2 == 0 else side))
    kernels = []
    for k in sizes:
        offsets = [i - (k - 1) / 2 for i in range(k)]
        g = torch.tensor([math.exp(-0.5 * (o / sigma) ** 2) for o in offsets], dtype=torch.float64)
        kernels.append(g / g.sum())
    dense = torch.outer(kernels[0], kernels[1])
    kh, kw = sizes
    batch, _, channels = q.shape
    grid = q.reshape(batch, height, width, channels)
    rows = torch.tensor([_reflect_index(i, height) for i in range(-(kh // 2), height + kh // 2)])
    cols = torch.tensor([_reflect_index(j, width) for j in range(-(kw // 2), width + kw // 2)])
    padded = grid[:, rows][:, :, cols]
    out = torch.zeros_like(grid)
    for a in range(kh):
        for b in range(kw):
            out += dense[a, b] * padded[:, a : a + height, b : b + width]
    return out.reshape(batch, height * width, channels)


def official_conv_blur(q: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """The official code path (square maps): F.pad reflect + dense depthwise conv2d, in float64."""
    batch, n, channels = q.shape
    side = math.isqrt(n)
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(channels, 1, size, size)
    img = q.double().permute(0, 2, 1).reshape(batch, channels, side, side)
    img = F.pad(img, [size // 2] * 4, mode="reflect")
    img = F.conv2d(img, k2, groups=channels)
    return img.reshape(batch, channels, n).permute(0, 2, 1)


def blur_bound(q: torch.Tensor, height: int, width: int, sigma: float, dtype: torch.dtype) -> float:
    """Rounding bound of ``blur_queries`` against the exact blur of ``q`` (tests/support/tolerance.py).

    Every output is a convex combination of inputs: the mean sums N terms, the one-product grid path
    N, the axis path h then w (plus the rounding of the weights, one term per product).  Half
    precision is computed in float32 on the CPU and rounded once more to ``dtype`` at the end.
    """
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if is_infinite_sigma(sigma) or blur.use_grid_operator(q, height, width):
        terms = height * width + 1
    else:
        terms = height + width + 2
    magnitude = max_abs(q)
    bound = sum_rounding_bound(work, terms, magnitude)
    return bound + (unit_roundoff(dtype) * (magnitude + bound) if work != dtype else 0.0)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("height,width", GRIDS)
def test_matches_reference_fp32(height, width, sigma):
    if height * width > 4096 and not (math.isinf(sigma) or sigma > 9999 or sigma in (1.0, 10.0)):
        pytest.skip("the python reference is slow on the largest maps; covered by the conv check")
    torch.manual_seed(height * 131 + width)
    q = torch.randn(2, height * width, 5)
    out = blur_queries(q, height, width, sigma)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_within(out, reference_blur(q, height, width, sigma), blur_bound(q, height, width, sigma, q.dtype))


@pytest.mark.parametrize("side", [1, 2, 3, 8, 9, 32, 33, 64, 128])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5, 5.4, 10.0, 100.0, 9999.0])
def test_square_maps_equal_official_conv(side, sigma):
    """For square maps our definition is the official one: same kernel size and same numbers."""
    torch.manual_seed(side)
    q = torch.randn(1, side * side, 2)
    size = kernel_size(sigma, side)
    assert size % 2 == 1
    if size == 1:
        expected = q.double()
    else:
        expected = official_conv_blur(q, size, sigma)
    assert_within(blur_queries(q, side, side, sigma), expected, blur_bound(q, side, side, sigma, q.dtype))
    if size > 1:
        assert max_abs(expected - q.double()) > 1e3 * blur_bound(q, side, side, sigma, q.dtype)  # a real blur


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sigma", [1.0, 10.0, math.inf])
def test_half_precision_within_rounding(dtype, sigma):
    """Accumulated in float32, rounded to half once: within half a half-precision ulp of the value."""
    torch.manual_seed(0)
    q = torch.randn(2, 24 * 40, 16).to(dtype)
    out = blur_queries(q, 24, 40, sigma)
    assert out.dtype == dtype and out.shape == q.shape
    assert_within(out, reference_blur(q, 24, 40, sigma), blur_bound(q, 24, 40, sigma, dtype))


def test_infinite_blur_is_the_spatial_mean_everywhere():
    torch.manual_seed(1)
    q = torch.randn(3, 6 * 10, 4, dtype=torch.float64)
    out = blur_queries(q, 6, 10, math.inf)
    mean = q.mean(dim=1, keepdim=True)
    assert torch.equal(out, mean.expand_as(q))
    assert_within(out.mean(dim=1), q.mean(dim=1), 2 * sum_rounding_bound(q.dtype, 6 * 10 + 1, max_abs(q)))
    assert out.is_contiguous()


def test_finite_blur_preserves_the_mean_on_periodic_free_maps():
    """A normalised kernel with reflect padding keeps constants constant (a property, not a value)."""
    q = torch.full((1, 9 * 12, 3), 2.5)
    assert_within(blur_queries(q, 9, 12, 3.0), q, blur_bound(q, 9, 12, 3.0, q.dtype))


def test_sigma_9999_is_finite_and_above_is_infinite():
    assert not is_infinite_sigma(9999.0) and is_infinite_sigma(9999.5) and is_infinite_sigma(math.inf)
    q = torch.randn(1, 16 * 16, 2)
    assert not torch.allclose(blur_queries(q, 16, 16, 9999.0), blur_queries(q, 16, 16, 10000.0))


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, -math.inf])
def test_invalid_sigma_is_rejected(sigma):
    with pytest.raises(ValueError, match="sigma"):
        blur_queries(torch.randn(1, 4, 2), 2, 2, sigma)


def test_token_count_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"\(1, 10, 2\).*3x4"):
        blur_queries(torch.randn(1, 10, 2), 3, 4, 1.0)


def test_kernel_size_rule():
    assert kernel_size(1.0, 100) == 7
    assert kernel_size(0.3, 100) == 3  # ceil(1.8)=2 -> 3
    assert kernel_size(2.5, 100) == 15
    assert kernel_size(10.0, 64) == 61
    assert kernel_size(10.0, 32) == 33  # even side: side + 1
    assert kernel_size(10.0, 31) == 31  # odd side: side
    assert kernel_size(10.0, 1) == 1


def test_operator_is_cached_and_rows_sum_to_one():
    a = blur_operator(33, 4.0)
    assert a is blur_operator(33, 4.0)
    assert_within(a.sum(dim=1), torch.ones(33), sum_rounding_bound(a.dtype, 2 * 33, 1.0))  # weights rounded, summed


def test_input_is_not_modified():
    q = torch.randn(2, 64, 3)
    before = q.clone()
    blur_queries(q, 8, 8, math.inf)
    blur_queries(q, 8, 8, 2.0)
    assert torch.equal(q, before)


@pytest.mark.parametrize("sigma", [0.3, 2.5, 10.0])
@pytest.mark.parametrize("height, width", [(1, 1), (1, 7), (5, 8), (17, 9), (32, 32)])
def test_grid_operator_path_matches_reference(monkeypatch, height, width, sigma):
    """The one-product path GPUs take for small grids, forced on the CPU."""
    monkeypatch.setattr(blur, "use_grid_operator", lambda q, h, w: True)
    q = torch.randn(2, height * width, 6, generator=torch.Generator().manual_seed(3))
    expected = reference_blur(q.double(), height, width, sigma)
    assert_within(blur_queries(q, height, width, sigma), expected, blur_bound(q, height, width, sigma, q.dtype))
    operator = blur.grid_operator(height, width, sigma, dtype=torch.float64)
    terms = (height + 1) * (width + 1) + height * width + 2  # the dense reference's sum and the operator's
    assert_within(operator @ q.double(), expected, sum_rounding_bound(torch.float64, terms, max_abs(q)))


def test_grid_operator_only_for_small_grids_off_the_cpu():
    assert not blur.use_grid_operator(torch.zeros(1, 1024, 4), 32, 32)
    meta = torch.zeros(1, 1024, 4, device="meta")
    assert blur.use_grid_operator(meta, 32, 32) and not blur.use_grid_operator(meta, 32, 33)
