"""Token-grid geometry: which (height, width) a self-attention layer's tokens lie on.

The UNet halves its feature map with stride-2 convolutions (kernel 3, padding 1), so each level is
``ceil(previous / 2)`` of the latent, never ``pixels / 8 / 2**level`` rounded some other way.  Peers
that guess the grid from the image's aspect ratio get odd sizes (e.g. 1000x600 px) wrong; walking the
real chain from the latent size is exact.  It is the fallback for hosts that tell no grid: where the
real map is known (A1111's SpatialTransformer input, reForge's ``activations_shape``, the Forge
block modifier) that is used, so resized maps (Deep Shrink) stay exact.  A token count that no level
has gives None, and the caller leaves that layer unblurred.
"""

from __future__ import annotations


def downsampled_side(side: int) -> int:
    """Side length after one stride-2, kernel-3, padding-1 convolution."""
    return (side + 1) // 2


def token_grid(n_tokens: int, latent_height: int, latent_width: int) -> tuple[int, int] | None:
    """(h, w) of the UNet level whose attention sees ``n_tokens`` tokens, or None if none does."""
    height, width = int(latent_height), int(latent_width)
    if height < 1 or width < 1:
        raise ValueError(f"latent size must be positive, got {height}x{width}")
    while True:
        if height * width == n_tokens:
            return height, width
        if height * width < n_tokens or (height == 1 and width == 1):
            return None
        height, width = downsampled_side(height), downsampled_side(width)
