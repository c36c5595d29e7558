import math

import pytest
import torch

from lib_seg.core.schedule import check_window, in_window, progress, progress_from_sigma


def test_progress_of_counter():
    assert [progress(i, 4) for i in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert progress(0, 0) == 0.0 and progress(9, 4) == 1.0


def test_window_is_inclusive():
    total = 20
    active = [i for i in range(total) if in_window(progress(i, total), 0.0, 0.5)]
    assert active == list(range(11))
    assert [i for i in range(total) if in_window(progress(i, total), 0.0, 0.0)] == [0]
    assert [i for i in range(10) if in_window(progress(i, 10), 0.3, 0.3)] == [3]  # 3/10 exactly


def test_progress_from_sigma_matches_counter():
    sigmas = torch.tensor([14.6, 7.0, 3.1, 1.2, 0.4, 0.0])
    assert [progress_from_sigma(float(s), sigmas) for s in sigmas[:-1]] == [progress(i, 5) for i in range(5)]
    assert progress_from_sigma(6.5, sigmas) == progress(1, 5)  # a second-order evaluation between steps
    assert progress_from_sigma(1.0, torch.tensor([1.0])) == 0.0


@pytest.mark.parametrize(
    "start,end,match",
    [
        (-0.1, 1, "start.*\\[0, 1\\]"),
        (0, 1.5, "end.*\\[0, 1\\]"),
        (0.7, 0.2, "start .* after SEG end"),
        (math.nan, 1, "start"),
    ],
)
def test_window_errors(start, end, match):
    with pytest.raises(ValueError, match=match):
        check_window(start, end)
