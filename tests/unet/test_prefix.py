"""lib_seg.unet.prefix on the test UNet: prefix reuse equals full recomputation."""

import torch

from lib_seg.core.layers import LayerKey
from lib_seg.unet.prefix import blocks_in_order, prefix_blocks, shared_prefix, with_seg_rows, without_seg_rows
from tests.support.tolerance import assert_network_close
from tests.support.unet import TINY_SDXL, build_unet


def test_row_layout():
    t = torch.arange(5)
    assert with_seg_rows(t, 2).tolist() == [0, 1, 0, 1, 2, 3, 4]
    assert without_seg_rows(with_seg_rows(t, 2), 2).tolist() == t.tolist()


def test_prefix_blocks_are_those_before_the_first_selected_block():
    unet = build_unet(TINY_SDXL)
    order = [key for key, _ in blocks_in_order(unet)]
    assert order[: len(unet.input_blocks)] == [("input", i) for i in range(len(unet.input_blocks))]
    assert len(prefix_blocks(unet, [LayerKey("middle", 0, 1), LayerKey("output", 1, 0)])) == len(unet.input_blocks)
    assert len(prefix_blocks(unet, [LayerKey("output", 2, 0)])) == len(unet.input_blocks) + 3
    assert prefix_blocks(unet, [LayerKey("input", 0, 0)]) == []


def test_shared_prefix_matches_full_recomputation_and_saves_rows():
    unet = build_unet(TINY_SDXL, dtype=torch.float64)
    n, uncond = 2, 2
    g = torch.Generator().manual_seed(0)
    x = with_seg_rows(torch.randn(n + uncond, 4, 9, 7, generator=g, dtype=torch.float64), n)
    context = with_seg_rows(torch.randn(n + uncond, 3, 16, generator=g, dtype=torch.float64), n)
    y = with_seg_rows(torch.randn(n + uncond, 12, generator=g, dtype=torch.float64), n)
    t = torch.full((x.shape[0],), 500.0, dtype=torch.float64)
    seen = []
    handle = unet.middle_block.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    with torch.no_grad():
        full = unet(x, t, context, y)
        first_input_rows = []
        drop, expand = (lambda t: without_seg_rows(t, n)), (lambda t: with_seg_rows(t, n))
        with shared_prefix(unet, [LayerKey("middle", 0, 0)], x.shape[0], x.shape[0] - n, drop, expand):
            # registered after the prefix hooks, so it sees what the layer really computes on
            first_layer = unet.input_blocks[1][0]
            h2 = first_layer.register_forward_pre_hook(lambda m, a: first_input_rows.append(a[0].shape[0]))
            shared = unet(x, t, context, y)
            h2.remove()
    handle.remove()
    assert first_input_rows == [n + uncond]  # the down path ran without the SEG rows
    assert seen == [6, 6]  # the middle block got every row both times
    assert_network_close(shared, full)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
