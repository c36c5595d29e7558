"""SEG on Flux.2 (Klein): what only Flux.2 has; its exactness, batched rows, prefix reuse, the patch read from
``img_in`` and the grid its position ids contradict are run by tests/dit/test_family_table.py (``flux2``).

The model is tests/support/dit_flux2.py (Neo 2.26's Flux.2 structure: patch 1, 4 RoPE axes, shared
modulation, reference images after the image).  The regression the table's case exists for: Flux.2 read as
Flux.1 (patch 2) put the first quarter of the image tokens on a wrong grid, silently.
"""

from __future__ import annotations

import torch

from lib_seg.dit.geometry import positions_fit_grid


def test_position_ids_check():
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    ids = torch.stack([rows, cols], dim=-1).reshape(1, 12, 2).double() + 7  # offsets allowed
    assert positions_fit_grid(ids, (3, 4))
    assert not positions_fit_grid(ids, (4, 3)) and not positions_fit_grid(ids[:, :6], (2, 3))
    assert not positions_fit_grid(ids, (2, 6)) and not positions_fit_grid(ids[..., :1], (3, 4))
