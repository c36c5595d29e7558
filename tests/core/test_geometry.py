"""token_grid against a simulation of the real UNet downsampling chain (Conv2d stride 2, pad 1)."""

import random

import pytest
import torch

from lib_seg.core.geometry import downsampled_side, token_grid


def simulated_levels(latent_h: int, latent_w: int, levels: int) -> list[tuple[int, int]]:
    """Token grids the UNet's attention sees: run a real stride-2 conv chain on a dummy latent."""
    conv = torch.nn.Conv2d(1, 1, kernel_size=3, stride=2, padding=1)
    x = torch.zeros(1, 1, latent_h, latent_w)
    grids = [(latent_h, latent_w)]
    with torch.no_grad():
        for _ in range(levels - 1):
            x = conv(x)
            grids.append(tuple(x.shape[-2:]))
    return grids


SIDES_PX = list(range(256, 2049, 8))


@pytest.mark.parametrize("levels", [4, 3], ids=["sd1-4-levels", "sdxl-3-levels"])
def test_every_8px_size_matches_the_conv_chain(levels):
    rng = random.Random(levels)
    pairs = [(h, w) for h in SIDES_PX for w in rng.sample(SIDES_PX, 6)] + [(w, w) for w in SIDES_PX]
    for height_px, width_px in pairs:
        latent = (height_px // 8, width_px // 8)
        for grid in simulated_levels(*latent, levels):
            assert token_grid(grid[0] * grid[1], *latent) == grid, (height_px, width_px, grid)


@pytest.mark.parametrize("factor", [1.5, 2.0])
def test_hires_sizes(factor):
    rng = random.Random(int(factor * 10))
    for _ in range(60):
        height_px, width_px = rng.choice(SIDES_PX[:60]), rng.choice(SIDES_PX[:60])
        latent = (int(height_px * factor) // 8, int(width_px * factor) // 8)
        for grid in simulated_levels(*latent, 4):
            assert token_grid(grid[0] * grid[1], *latent) == grid


def test_odd_latents_round_up():
    assert downsampled_side(125) == 63 and downsampled_side(63) == 32 and downsampled_side(1) == 1
    assert token_grid(63 * 32, 125, 63) == (63, 32)


def test_unmatched_token_count_is_none():
    latent = (128, 128)
    assert token_grid(128 * 128 // 4 * 3, *latent) is None  # e.g. ToMe removed a quarter
    assert token_grid(128 * 128 * 4, *latent) is None  # more tokens than the latent (Deep Shrink)
    assert token_grid(7, 1, 1) is None
    assert token_grid(1, 1, 1) == (1, 1)


def test_bad_latent_size():
    with pytest.raises(ValueError, match="latent size"):
        token_grid(4, 0, 3)
