"""lib_seg.unet.hooks on a random-weight UNet with the real ldm layout."""

import logging
import math
import types

import pytest
import torch

from lib_seg.core.layers import LayerKey, layer_from_module_name, resolve_layers
from lib_seg.unet.hooks import attn1_name, blurred_queries, spatial_transformer_name
from tests.support.unet import TINY_SD1, TINY_SDXL, build_unet


def has_hooks(module):
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def observe_queries(unet):
    """Observer hooks on every attn1.to_q, registered last so they see what attention will use."""
    seen, handles = {}, []
    for name, module in unet.named_modules():
        if name.endswith(".attn1"):
            handles.append(module.to_q.register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, out)))
    return seen, handles


def forward(unet, x):
    g = torch.Generator().manual_seed(5)
    context = torch.randn(x.shape[0], 3, unet.config.context_dim, generator=g)
    y = torch.randn(x.shape[0], unet.config.adm_in_channels, generator=g) if unet.config.adm_in_channels else None
    with torch.no_grad():
        return unet(x, torch.full((x.shape[0],), 300.0), context, y)


@pytest.mark.parametrize("config,spec", [(TINY_SD1, "d3,u4"), (TINY_SDXL, "m0.1,u1")])
def test_only_selected_layers_see_blurred_queries(config, spec):
    unet = build_unet(config)
    x = torch.randn(2, 4, 11, 6)
    order = [n for n, _ in unet.named_modules() if n.endswith(".attn1")]
    seen, handles = observe_queries(unet)
    forward(unet, x)
    plain = dict(seen)
    for h in handles:
        h.remove()
    selected = resolve_layers(spec, [layer_from_module_name(n) for n in order])
    selected_names = {attn1_name(k) for k in selected}
    with blurred_queries(unet, selected, math.inf):
        seen, handles = observe_queries(unet)
        forward(unet, x)
    for h in handles:
        h.remove()
    first = min(order.index(n) for n in selected_names)
    for index, name in enumerate(order):
        q = seen[name]
        constant = bool((q == q[:, :1]).all())  # infinite blur writes one mean query to every token
        assert constant == (name in selected_names), name
        if index < first:
            assert torch.equal(q, plain[name]), name  # upstream of the first blurred layer: untouched
    assert not has_hooks(unet)


def test_rows_limit_the_blur_to_those_batch_rows():
    unet = build_unet(TINY_SD1)
    key = LayerKey("middle", 0, 0)
    x = torch.randn(3, 4, 8, 8)
    with blurred_queries(unet, [key], math.inf, rows=slice(1, 2)):
        seen, handles = observe_queries(unet)
        forward(unet, x)
    for h in handles:
        h.remove()
    q = seen[attn1_name(key)]
    assert bool((q[1] == q[1][:1]).all())  # every token of the blurred row holds the same mean query
    assert not bool((q[0] == q[0][:1]).all())


def test_token_count_mismatch_is_skipped_and_reported():
    """HyperTile-like tiling: attn1 sees tiles, so N != H*W; the layer is left as it is."""
    unet = build_unet(TINY_SD1)
    attn = unet.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1")
    original = attn.forward

    def tiled(self, x, context=None):
        b, n, c = x.shape
        return original(x.reshape(b * 2, n // 2, c)).reshape(b, n, c)

    attn.forward = types.MethodType(tiled, attn)
    x = torch.randn(1, 4, 8, 8)
    baseline = forward(unet, x)
    skipped = []
    with blurred_queries(unet, [LayerKey("input", 1, 0)], 2.0, on_skip=lambda *a: skipped.append(a)):
        out = forward(unet, x)
    assert torch.equal(out, baseline)
    assert skipped == [(LayerKey("input", 1, 0), 32, (8, 8))]


def test_unknown_layer_and_cleanup_on_error():
    unet = build_unet(TINY_SD1)
    with pytest.raises(ValueError, match=r"no attention layer middle_block\.1\.transformer_blocks\.5\.attn1\.to_q"):
        with blurred_queries(unet, [LayerKey("input", 1, 0), LayerKey("middle", 0, 5)], 1.0):
            pass
    assert not has_hooks(unet)
    with pytest.raises(RuntimeError, match="inside"):
        with blurred_queries(unet, [LayerKey("middle", 0, 0)], 1.0):
            assert has_hooks(unet)
            raise RuntimeError("inside")
    assert not has_hooks(unet)


def test_names():
    assert spatial_transformer_name(LayerKey("middle", 0, 3)) == "middle_block.1"
    assert attn1_name(LayerKey("output", 2, 1)) == "output_blocks.2.1.transformer_blocks.1.attn1"


def test_skip_warner_warns_once_per_layer_with_the_grid(caplog):
    from lib_seg.unet.hooks import skip_warner

    on_skip = skip_warner()
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        on_skip(LayerKey("input", 1, 0), 32, (8, 8))
        on_skip(LayerKey("input", 1, 0), 32, (8, 8))
        on_skip(LayerKey("middle", 0, 0), 7)
    assert caplog.text.count("d1.0 sees 32 queries") == 1 and "its block's map is 8x8" in caplog.text
    assert caplog.text.count("m0.0 sees 7 queries") == 1 and caplog.text.count("left unblurred") == 2


def test_only_the_unet_layout_is_a_unet():
    from lib_seg.targets import DitTarget, UnetTarget, query_target
    from lib_seg.unet.hooks import as_ldm_unet

    unet = build_unet(TINY_SD1)
    assert as_ldm_unet(unet) is unet
    assert as_ldm_unet(torch.nn.Linear(2, 2)) is None
    assert as_ldm_unet(None) is None
    target = query_target(unet)
    assert isinstance(target, UnetTarget) and target.model is unet and not isinstance(target, DitTarget)
    assert query_target(torch.nn.Linear(2, 2)) is None and query_target(None) is None
