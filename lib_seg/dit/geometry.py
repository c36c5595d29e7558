"""Where a DiT's image tokens lie: the 2D patch grid of a latent and the image slice of a sequence.

The hosts patchify the latent into ``patch x patch`` squares, row-major: token ``r * w_len + c`` is
patch row ``r``, column ``c``.  The patch side is the model's, never a constant: 2 for Flux.1, Chroma
and SD3, 1 for Flux.2 (Neo ``backend/nn/flux.py``, built with the ``flux2`` config that
``huggingface_guess/detection.py`` derives; :func:`model_patch_size`).  They disagree on odd latent sides
(``docs/dit.md``; commits Forge ``dfdcbab``, reForge ``3b56b26``,
A1111 ``82a973c``):

* pad to a multiple of the patch, ``h_len = (H + 1) // 2``: Forge 2.x Flux/Chroma (circular pad,
  ``backend/nn/flux.py:404-415``, ``backend/nn/chroma.py:285-300``), reForge Flux/Chroma
  (``pad_to_patch_size``, ``flux/model.py:198-214``) and reForge's MMDiT (``PatchEmbed`` circular pad,
  ``mmdit.py:100-102, 885-931``);
* no pad, ``h_len = H // 2`` (the last odd row/column is dropped): Forge 2.x MMDiTX
  (``backend/nn/mmditx.py:867-906``) and A1111's SD3 (which forces 16-px multiples anyway,
  ``modules/models/sd3/sd3_model.py:83-84``).

Hence ``pad`` is an explicit argument: the host adapter knows which convention its host follows, and
a wrong guess would give a grid whose token count does not match the sequence (an error, not a
silently wrong blur).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def patched_side(side: int, patch: int = 2, pad: bool = True) -> int:
    """Patches along one latent side: ``ceil(side / patch)`` with padding, ``side // patch`` without."""
    side, patch = int(side), int(patch)
    if patch < 1:
        raise ValueError(f"patch size must be >= 1, got {patch}")
    if side < 1:
        raise ValueError(f"latent side must be >= 1, got {side}")
    patches = -(-side // patch) if pad else side // patch
    if patches < 1:
        raise ValueError(f"a latent side of {side} holds no {patch}x{patch} patch without padding")
    return patches


def patch_grid(latent_h: int, latent_w: int, patch: int = 2, pad: bool = True) -> tuple[int, int]:
    """``(h_len, w_len)`` of the image tokens of a ``latent_h x latent_w`` latent.

    ``pad=True``: Flux/Chroma (Forge 2.x, reForge) and reForge's MMDiT; ``pad=False``: Forge 2.x
    MMDiTX and A1111's SD3 (see the module docstring for the file/line evidence).
    """
    return patched_side(latent_h, patch, pad), patched_side(latent_w, patch, pad)


def image_token_slice(n_txt: int, h_len: int, w_len: int) -> slice:
    """The image tokens of a joint ``[txt | img | extra]`` sequence.

    Every host concatenates text first (Flux ``cat(txt, img)``, MMDiT context first); reForge's Flux
    appends Kontext reference-image tokens after the image (``flux/model.py:224-237``), which this
    slice leaves out: they are another image's tokens, not on this grid.  For MMDiT, ``n_txt``
    includes any register tokens (``context.shape[1] + register_length``).
    """
    n_txt, h_len, w_len = int(n_txt), int(h_len), int(w_len)
    if n_txt < 0:
        raise ValueError(f"text token count must be >= 0, got {n_txt}")
    if h_len < 1 or w_len < 1:
        raise ValueError(f"patch grid sides must be >= 1, got {h_len}x{w_len}")
    return slice(n_txt, n_txt + h_len * w_len)


def model_patch_size(model: Any, latent_channels: int) -> int | None:
    """The patch side of a patchifying DiT, read from the model: its ``patch_size`` attribute (Neo,
    Forge 2.x, reForge Flux/Chroma), else the width of its ``img_in`` projection, which takes
    ``channels * patch**2`` values per token.  None when neither tells (then SEG skips the model's
    blocks with a warning rather than guess)."""
    size = getattr(model, "patch_size", None)
    if isinstance(size, int) and size >= 1:
        return size
    if isinstance(size, tuple | list) and len(size) >= 2 and all(isinstance(s, int) for s in size):
        if len(set(size[-2:])) == 1:
            return int(size[-1])
    features = getattr(getattr(model, "img_in", None), "in_features", None)
    if isinstance(features, int) and latent_channels > 0 and features % latent_channels == 0:
        side = math.isqrt(features // latent_channels)
        if side * side * latent_channels == features:
            return side
    return None


def positions_fit_grid(positions: torch.Tensor, grid: tuple[int, int]) -> bool:
    """Whether the image tokens' own position ids say they lie row-major on ``grid``.

    ``positions``: (B, h_len * w_len, 2) the (row, column) position ids the model gave its image tokens
    (Flux's ``img_ids[..., 1:3]``), any common offset allowed.  This is the model's own statement of
    its grid; a grid guessed from the wrong patch size fails it even when the token count happens to
    fit a prefix of the sequence (Flux.2's patch 1 read as Flux.1's patch 2)."""
    h_len, w_len = grid
    if positions.dim() != 3 or positions.shape[1] != h_len * w_len or positions.shape[2] != 2:
        return False
    index = torch.arange(h_len * w_len, device=positions.device)
    expected = torch.stack([index // w_len, index % w_len], dim=-1).to(positions.dtype)
    offset = positions[:, :1]
    return bool(((positions - offset - expected).abs() < 0.5).all())
