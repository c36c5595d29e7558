"""lib_seg.dit.geometry: patch grids under both padding conventions, the image slice."""

import pytest
import torch
import torch.nn.functional as F

from lib_seg.dit.geometry import image_token_slice, patch_grid, patched_side


@pytest.mark.parametrize(
    "latent,padded,unpadded",
    [
        ((128, 128), (64, 64), (64, 64)),  # 1024x1024 px
        ((128, 96), (64, 48), (64, 48)),  # non-square
        ((75, 125), (38, 63), (37, 62)),  # 600x1000 px: odd latent sides
        ((1, 1), (1, 1), None),
        ((3, 2), (2, 1), (1, 1)),
    ],
)
def test_patch_grid_conventions(latent, padded, unpadded):
    assert patch_grid(*latent) == padded
    assert patch_grid(*latent, pad=True) == padded
    if unpadded is None:
        with pytest.raises(ValueError, match="holds no 2x2 patch"):
            patch_grid(*latent, pad=False)
    else:
        assert patch_grid(*latent, pad=False) == unpadded


@pytest.mark.parametrize("h,w", [(7, 10), (75, 125), (8, 8), (5, 3)])
@pytest.mark.parametrize("pad", [True, False])
def test_grid_counts_the_tokens_a_patchifier_makes(h, w, pad):
    """Independent check: pad (circularly, as Flux does) or crop, then unfold 2x2 patches."""
    latent = torch.randn(1, 4, h, w)
    if pad:
        latent = F.pad(latent, (0, (-w) % 2, 0, (-h) % 2), mode="circular")
    else:
        latent = latent[:, :, : h // 2 * 2, : w // 2 * 2]
    tokens = F.unfold(latent, kernel_size=2, stride=2)  # (1, C*4, h_len*w_len), row-major
    h_len, w_len = patch_grid(h, w, pad=pad)
    assert tokens.shape[-1] == h_len * w_len
    assert (h_len, w_len) == (latent.shape[2] // 2, latent.shape[3] // 2)


def test_other_patch_sizes_and_errors():
    assert patched_side(9, patch=4) == 3 and patched_side(9, patch=4, pad=False) == 2
    assert patch_grid(6, 9, patch=1) == (6, 9)
    for bad in ((0, 4), (4, -1)):
        with pytest.raises(ValueError, match="latent side"):
            patch_grid(*bad)
    with pytest.raises(ValueError, match="patch size"):
        patch_grid(4, 4, patch=0)


def test_image_token_slice():
    assert image_token_slice(512, 64, 48) == slice(512, 512 + 64 * 48)
    assert image_token_slice(0, 3, 5) == slice(0, 15)  # a double block's image-only q
    tokens = torch.arange(7 + 6 + 4)  # [txt | img | Kontext reference tokens]
    assert tokens[image_token_slice(7, 2, 3)].tolist() == list(range(7, 13))
    with pytest.raises(ValueError, match="text token count"):
        image_token_slice(-1, 2, 2)
    with pytest.raises(ValueError, match="patch grid sides"):
        image_token_slice(3, 0, 2)
