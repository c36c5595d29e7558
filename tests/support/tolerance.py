"""Test tolerances derived from the dtype and the size of the values, never from one CPU's results.

Other CPUs (and other thread counts) sum in other orders, so a tolerance that merely passed here can
fail there.  Two kinds of comparison are used in the tests, each with its own bound:

* One linear map computed in two ways (the blur as matrix products vs. the dense reference, an
  operator vs. a convolution): a sum of ``n`` products rounds to within
  ``gamma_n * sum |w_i x_i|`` of the exact value, ``gamma_n = n u / (1 - n u)`` with the unit
  roundoff ``u = eps / 2`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
  eq. 3.5), whatever the order of the additions.  Blur weights are convex (non-negative, sum 1), so
  ``sum |w_i x_i| <= max |x|``.  :func:`sum_rounding_bound` is that bound.
* A whole random-weight UNet evaluated twice (batched vs. separate rows, prefix reuse, the adapter
  vs. the slow reference): each layer's rounding is amplified by the layers after it, with no closed
  form.  Those comparisons run in float64 and allow :data:`FLOAT64_NETWORK_REL` of the output's
  magnitude: ``2**20`` float64 epsilons (about 2.3e-10), room for depth and summation order, yet
  500x below float32's epsilon, so a float32 leak or any real difference (>= 1e-7) still fails.
"""

from __future__ import annotations

import torch

FLOAT64_NETWORK_REL = 2.0**20 * torch.finfo(torch.float64).eps


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2.0


def sum_rounding_bound(dtype: torch.dtype, terms: int, magnitude: float) -> float:
    """Worst-case rounding of a ``terms``-term sum in ``dtype`` whose sum of |addends| is ``magnitude``."""
    nu = terms * unit_roundoff(dtype)
    if nu >= 1.0:
        raise ValueError(f"{terms} terms are too many for a rounding bound in {dtype}")
    return nu / (1.0 - nu) * float(magnitude)


def max_abs(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().max()) if t.numel() else 0.0


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: float, what: str = "values") -> None:
    """``max |actual - expected| <= bound`` (compared in float64), with a message naming both."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = max_abs(actual.double() - expected.double())
    assert difference <= bound, f"{what}: max |difference| {difference:.3g} exceeds the bound {bound:.3g}"


def assert_network_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "outputs") -> None:
    """Two float64 evaluations of one network function agree to :data:`FLOAT64_NETWORK_REL` of the
    output's magnitude (taken as at least 1: the outputs here are x0/eps predictions of order 1)."""
    for name, tensor in (("actual", actual), ("expected", expected)):
        assert tensor.dtype == torch.float64, f"{what}: {name} is {tensor.dtype}; network comparisons run in float64"
    assert_within(actual, expected, FLOAT64_NETWORK_REL * max(max_abs(expected), 1.0), what)
