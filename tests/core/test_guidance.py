import pytest
import torch

from lib_seg.core.guidance import apply_seg, apply_seg_composable, cfg_with_seg, composable_weights
from tests.support.tolerance import assert_within, max_abs, sum_rounding_bound


def test_apply_seg_formula_and_no_mutation():
    torch.manual_seed(0)
    denoised, cond, seg = (torch.randn(2, 4, 8, 8) for _ in range(3))
    before = denoised.clone()
    out = apply_seg(denoised, cond, seg, 3.0)
    assert torch.equal(denoised, before)
    torch.testing.assert_close(out, before + 3.0 * (cond - seg))


def test_cfg_with_seg_reduces_to_seg_only_at_cfg_1():
    uncond, cond, seg = (torch.randn(1, 4, 4, 4) for _ in range(3))
    torch.testing.assert_close(cfg_with_seg(uncond, cond, seg, 1.0, 2.0), cond + 2.0 * (cond - seg))
    torch.testing.assert_close(cfg_with_seg(uncond, cond, seg, 7.0, 0.0), uncond + 7.0 * (cond - uncond))


def test_composable_prompts_use_and_weights():
    torch.manual_seed(1)
    cond, seg = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    denoised = torch.randn(2, 4, 2, 2)
    conds_list = [[(0, 0.7), (1, 0.3)], [(2, 1.0)]]
    out = apply_seg_composable(denoised, cond, seg, conds_list, 2.0)
    expected = denoised.clone()
    expected[0] += 2.0 * (0.7 * (cond[0] - seg[0]) + 0.3 * (cond[1] - seg[1]))
    expected[1] += 2.0 * (cond[2] - seg[2])
    torch.testing.assert_close(out, expected)


def test_composable_identity_layout_equals_apply_seg():
    denoised, cond, seg = (torch.randn(3, 4, 5, 5) for _ in range(3))
    out = apply_seg_composable(denoised, cond, seg, [[(i, 1.0)] for i in range(3)], 3.0)
    torch.testing.assert_close(out, apply_seg(denoised, cond, seg, 3.0))


def test_composable_errors():
    with pytest.raises(ValueError, match="outside"):
        composable_weights([[(3, 1.0)]], 2)
    with pytest.raises(ValueError, match="2 images"):
        apply_seg_composable(torch.zeros(2, 1), torch.zeros(1, 1), torch.zeros(1, 1), [[(0, 1.0)]], 1.0)


def test_half_precision_keeps_dtype():
    d, c, s = (torch.randn(1, 4, 3, 3, dtype=torch.float16) for _ in range(3))
    assert apply_seg_composable(d, c, s, [[(0, 1.0)]], 3.0).dtype == torch.float16


def test_float64_is_combined_in_float64():
    """The SEG term keeps the model's precision (promoted to at least float32): a float64 run is not
    rounded through float32, which would differ from the exact sum by ~1e-8 of its size."""
    g = torch.Generator().manual_seed(2)
    cond, seg = (torch.randn(3, 4, 6, 6, dtype=torch.float64, generator=g) for _ in range(2))
    denoised = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=g)
    conds_list = [[(0, 0.1), (1, 0.9)], [(2, 1.0 / 3.0)]]
    out = apply_seg_composable(denoised, cond, seg, conds_list, 3.0)
    expected = denoised.clone()
    expected[0] += 3.0 * (0.1 * (cond[0] - seg[0]) + 0.9 * (cond[1] - seg[1]))
    expected[1] += 3.0 * (1.0 / 3.0) * (cond[2] - seg[2])
    assert out.dtype == torch.float64
    # |d| + 3 (|c| + |s|) <= 7 max|.|, summed in a handful of float64 operations
    assert_within(out, expected, sum_rounding_bound(torch.float64, 8, 7 * max_abs(torch.cat([cond, seg, denoised]))))
