"""The Forge-family tests' shared fixtures: the tiny SD1 and SDXL UNets in float64 (the adapter is compared with
the slow path to float64 rounding, tests/support/tolerance.py, which no CPU's summation order can upset), built
once per module, and no autograd."""

from __future__ import annotations

import pytest
import torch

from tests.support.unet import TINY_SD1, TINY_SDXL, build_unet


@pytest.fixture(scope="module")
def sd1():
    return build_unet(TINY_SD1, seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def sdxl():
    return build_unet(TINY_SDXL, seed=2, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
