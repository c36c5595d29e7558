"""Paper, Proposition 3.1: blurring the queries equals blurring the pre-softmax logits along the
query axis.  This is why SEG can blur q and still use fused attention kernels."""

import math

import pytest
import torch

from lib_seg.core.blur import blur_queries
from tests.support.tolerance import assert_network_close


def attention(q, k, v, logits_transform=None):
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if logits_transform is not None:
        logits = logits_transform(logits)
    return logits.softmax(dim=-1) @ v


@pytest.mark.parametrize("height,width,sigma", [(8, 8, 1.0), (6, 10, 2.5), (5, 7, 10.0), (4, 4, math.inf)])
def test_blurred_queries_equal_blurred_logits(height, width, sigma):
    torch.manual_seed(7)
    n, d = height * width, 12
    q, k, v = (torch.randn(2, n, d, dtype=torch.float64) for _ in range(3))

    via_queries = attention(blur_queries(q, height, width, sigma), k, v)
    # logits are (B, N_query, N_key): blur each key's column of logits over the query grid.
    via_logits = attention(q, k, v, lambda logits: blur_queries(logits, height, width, sigma))

    assert_network_close(via_queries, via_logits)  # equal in exact arithmetic: float64 rounding only
    assert not torch.allclose(via_queries, attention(q, k, v))  # the blur did something
