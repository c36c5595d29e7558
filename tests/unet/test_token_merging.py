"""SEG on layers whose tokens the real tomesd 0.1.3 merged, patched as A1111 1.10 patches the model
(``modules/sd_models.py`` ``apply_token_merging``), on the test UNet (tests/support/unet.py)."""

import logging
import math
import subprocess
import sys

import pytest
import tomesd
import torch
from tomesd.patch import compute_merge
from torch import nn

from lib_seg.a1111 import adapter as a1111
from lib_seg.core.blur import kernel_size
from lib_seg.core.layers import LayerKey, resolve_layers, unet_layers
from lib_seg.core.params import SegParams
from lib_seg.unet import token_merging
from lib_seg.unet.hooks import attn1_name, blurred_queries, skip_warner, transformer_block_name
from tests.a1111.test_a1111_adapter import make_inputs, to_dtype
from tests.core.test_blur import reference_blur
from tests.support.a1111_host import CFGDenoiser, FakeSDModel
from tests.support.unet import UNetConfig, build_unet

# SD1.5's block layout (attention at levels 0-2, two res blocks per level) at small widths: at ratio
# 0.5 and 128 px (a 16x16 latent) tomesd merges exactly SD1.5's level-0 layers d1, d2, u9, u10, u11.
SD15_LAYOUT = UNetConfig(32, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, 8, 16, None, False, 8)
MERGED = (*(LayerKey("input", i, 0) for i in (1, 2)), *(LayerKey("output", i, 0) for i in (9, 10, 11)))
EPS64 = torch.finfo(torch.float64).eps
TOL64 = 1e4 * EPS64  # ~2e-12: float64 sums of a few hundred terms in other orders, far below any real change


def tome(unet: nn.Module, use_rand: bool = False) -> nn.Module:
    """Patch ``unet`` in place as A1111 1.10 does; returns the sd_model-like holder tomesd wants."""
    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.diffusion_model = unet
    tomesd.apply_patch(holder, ratio=0.5, use_rand=use_rand, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    return holder


def hooks(module: nn.Module) -> dict:
    """Every hook on ``module`` and its children (tomesd keeps one of its own on the UNet)."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        for name, m in module.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=TOL64, atol=TOL64 * scale)


@pytest.fixture(scope="module")
def unet64():
    unet = build_unet(SD15_LAYOUT, seed=3, dtype=torch.float64)
    holder = tome(unet)
    yield unet
    tomesd.remove_patch(holder)


def call(unet: nn.Module, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    context = torch.randn(x.shape[0], 3, unet.config.context_dim, generator=g, dtype=x.dtype)
    with torch.no_grad():
        return unet(x, torch.full((x.shape[0],), 300.0), context)


def record(unet: nn.Module, keys) -> tuple[dict, list]:
    """Observer hooks (registered after SEG's, so they see what attention gets): each layer's block
    input and its to_q output."""
    seen: dict = {key: {} for key in keys}
    handles = []
    for key in keys:
        block = unet.get_submodule(transformer_block_name(key))
        handles.append(block.register_forward_pre_hook(lambda m, a, k=key: seen[k].__setitem__("x", a[0])))
        to_q = block.attn1.to_q
        handles.append(to_q.register_forward_hook(lambda m, a, out, k=key: seen[k].__setitem__("q", out.clone())))
    return seen, handles


def reference(unet: nn.Module, key: LayerKey, x: torch.Tensor, height: int, width: int, sigma: float):
    """m_a(blur(to_q(norm1(x)))), written out: tomesd's own merge of the dense float64 reference blur."""
    block = unet.get_submodule(transformer_block_name(key))
    full = torch.nn.functional.linear(block.norm1(x), block.attn1.to_q.weight)
    if math.isinf(sigma):
        blurred = full.mean(dim=1, keepdim=True).expand_as(full)
    else:
        blurred = reference_blur(full, height, width, sigma)
    merge = compute_merge(x, block._tome_info)[0]
    return merge(blurred)


@pytest.mark.parametrize("height,width", [(16, 16), (13, 9)])
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_merged_layers_get_the_blurred_queries_merged_as_the_host_merges(unet64, caplog, height, width, sigma):
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    every = resolve_layers("all", unet_layers(unet64))
    plain, handles = record(unet64, MERGED)
    call(unet64, x)
    for handle in handles:
        handle.remove()
    skipped = []
    warn = skip_warner()
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        with blurred_queries(unet64, every, sigma, on_skip=lambda *a: skipped.append(a) or warn(*a)):
            seen, handles = record(unet64, MERGED)
            call(unet64, x)
    for handle in handles:
        handle.remove()
    assert skipped == [] and "left unblurred" not in caplog.text
    tokens = height * width
    for key in MERGED:
        q, block_input = seen[key]["q"], seen[key]["x"]
        assert block_input.shape[1] == tokens and q.shape[1] == tokens - tokens // 2, key  # ratio 0.5 merged
        expected = reference(unet64, key, block_input, height, width, sigma)
        close(q, expected)
        assert (q - plain[key]["q"]).abs().max() > 1e6 * TOL64 * q.abs().max()  # the blur did change them
        if math.isinf(sigma):  # the full grid's mean query, exactly, in every merged token
            assert torch.equal(q, q[:, :1].expand_as(q))


def test_merging_a_constant_row_gives_the_constant():
    """Why infinite sigma may skip the merge: tomesd's 'mean' merge keeps a constant row (to rounding)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13 * 9, 6, generator=g, dtype=torch.float64)
    args = {"ratio": 0.5, "max_downsample": 1, "sx": 2, "sy": 2, "use_rand": False, "generator": None}
    merge = compute_merge(
        x, {"size": (13, 9), "args": {**args, "merge_attn": True, "merge_crossattn": False, "merge_mlp": False}}
    )
    constant = torch.randn(2, 1, 6, generator=g, dtype=torch.float64).expand(2, 13 * 9, 6)
    merged = merge[0](constant)
    assert merged.shape[1] == 117 - 58  # int(117 * 0.5) tokens merged away
    close(merged, constant[:, : merged.shape[1]])


# --- through the A1111 adapter (tests/support/a1111_host.py) ----------------------------------------


def sample(model: FakeSDModel, inputs: dict, run: a1111.SegRun | None, **kwargs) -> torch.Tensor:
    denoiser = CFGDenoiser(model, callbacks=[a1111.on_cfg_denoiser])
    if run is not None:
        a1111.attach(denoiser, run)
    try:
        with torch.no_grad():
            return denoiser(**inputs, **kwargs)
    finally:
        a1111.detach(denoiser)


@pytest.fixture(scope="module")
def sd15_tome(unet64):
    return FakeSDModel(unet64)


def counting_merges(monkeypatch) -> list:
    """Counts the merged layers SEG really blurred (merged_blurred_queries returned queries)."""
    done = []
    original = token_merging.merged_blurred_queries

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        done.append(out is not None)
        return out

    monkeypatch.setattr(token_merging, "merged_blurred_queries", spy)
    return done


@pytest.mark.parametrize(
    "height,width,spec,sigma",
    [(16, 16, "all", 2.0), (13, 9, "all", 2.0), (13, 9, "d2,u10", math.inf)],
)
@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_batched_seg_rows_equal_the_separate_pass_with_tome(
    sd15_tome, monkeypatch, height, width, spec, sigma, prefix_reuse
):
    """SEG rows between cond and uncond are merged from their own block input, as a separate SEG call
    merges them, so both paths compute the same function (float64: to rounding)."""
    unet = sd15_tome.model.diffusion_model
    before = hooks(unet)
    inputs = to_dtype(make_inputs(SD15_LAYOUT, height=height, width=width), torch.float64)
    params = SegParams(enabled=True, layers=spec, blur_sigma=sigma)
    done = counting_merges(monkeypatch)
    skipped = []
    baseline = sample(sd15_tome, inputs, None)
    separate = sample(sd15_tome, inputs, a1111.SegRun(params, on_skip=lambda *a: skipped.append(a)))
    merged_layers = sum(key in MERGED for key in resolve_layers(spec, unet_layers(unet)))
    assert done == [True] * merged_layers
    run = a1111.SegRun(params, batch_rows=True, prefix_reuse=prefix_reuse, on_skip=lambda *a: skipped.append(a))
    batched = sample(sd15_tome, inputs, run)
    assert done == [True] * (2 * merged_layers) and skipped == []
    assert hooks(unet) == before
    close(batched, separate)
    assert (separate - baseline).abs().max() > 1e6 * TOL64 * separate.abs().max()


@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_a_seg_row_is_merged_like_its_cond_row(sd15_tome, monkeypatch, prefix_reuse):
    """sigma 0.1 makes a 1-tap kernel: the blur is the identity, so a SEG row must be its cond row
    unchanged through every layer, merged ones included: the queries SEG builds for it,
    m_a(to_q(norm1(x))), are the host's to_q(m_a(norm1(x))) of the cond row, token for token."""
    assert kernel_size(0.1, 16) == 1
    unet = sd15_tome.model.diffusion_model
    inputs = to_dtype(make_inputs(SD15_LAYOUT, height=16, width=16), torch.float64)
    done = counting_merges(monkeypatch)
    seen, handles = record(unet, MERGED)
    try:
        params = SegParams(enabled=True, layers="all", blur_sigma=0.1)
        run = a1111.SegRun(params, batch_rows=True, prefix_reuse=prefix_reuse)
        out = sample(sd15_tome, inputs, run)
    finally:
        for handle in handles:
            handle.remove()
    baseline = sample(sd15_tome, inputs, None)
    assert done == [True] * len(MERGED)
    for key in MERGED:
        q = seen[key]["q"]
        assert q.shape[0] == 6  # [cond, cond, seg, seg, uncond, uncond]
        close(q[2:4], q[0:2])
    close(out, baseline)


def test_seg_off_is_bit_identical_with_tome_and_no_hooks_remain(sd15_tome):
    unet = sd15_tome.model.diffusion_model
    before = hooks(unet)
    assert before  # tomesd's own pre-hook on the UNet
    inputs = to_dtype(make_inputs(SD15_LAYOUT, height=16, width=16), torch.float64)
    baseline = sample(sd15_tome, inputs, None)
    for params in (SegParams(enabled=False), SegParams(enabled=True, scale=0.0)):
        for batch_rows in (False, True):
            out = sample(sd15_tome, inputs, a1111.SegRun(params, batch_rows=batch_rows))
            assert torch.equal(out, baseline), (params, batch_rows)
    assert hooks(unet) == before


@pytest.mark.parametrize("batch_rows", [False, True])
def test_no_hooks_remain_when_a_merged_layer_raises(sd15_tome, batch_rows):
    unet = sd15_tome.model.diffusion_model
    before = hooks(unet)
    inputs = to_dtype(make_inputs(SD15_LAYOUT, height=16, width=16), torch.float64)
    attn1 = unet.get_submodule(attn1_name(LayerKey("output", 10, 0)))

    def explode(module, args):
        if args[0].shape[0] != 4:  # not the plain [cond, cond, uncond, uncond] call: the SEG rows are in it
            raise RuntimeError("boom in a merged layer")

    handle = attn1.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            sample(sd15_tome, inputs, a1111.SegRun(SegParams(enabled=True, layers="all"), batch_rows=batch_rows))
    finally:
        handle.remove()
    assert hooks(unet) == before


@pytest.fixture
def random_tome_unet():
    unet = build_unet(SD15_LAYOUT, seed=3, dtype=torch.float64)
    holder = tome(unet, use_rand=True)
    yield unet
    tomesd.remove_patch(holder)


def test_random_merges_are_skipped_with_the_warning_but_infinite_sigma_is_exact(random_tome_unet, caplog):
    """use_rand (not A1111's setting) draws the merge from a generator: not reproduced, so a finite
    sigma leaves those layers unblurred with the usual warning; infinite sigma needs no merge."""
    unet = random_tome_unet
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    layers = resolve_layers("d1,d4,u10", unet_layers(unet))
    skipped = []
    warn = skip_warner()
    with caplog.at_level(logging.WARNING, logger="sd_webui_seg"):
        with blurred_queries(unet, layers, 2.0, on_skip=lambda *a: skipped.append(a) or warn(*a)):
            call(unet, x)
    assert [key for key, *_ in skipped] == [LayerKey("input", 1, 0), LayerKey("output", 10, 0)]
    assert caplog.text.count("left unblurred") == 2 and "d1.0 sees 128 queries" in caplog.text
    skipped.clear()
    with blurred_queries(unet, layers, math.inf, on_skip=lambda *a: skipped.append(a)):
        seen, handles = record(unet, [LayerKey("input", 1, 0)])
        call(unet, x)
    for handle in handles:
        handle.remove()
    assert skipped == []
    q, block_input = seen[LayerKey("input", 1, 0)]["q"], seen[LayerKey("input", 1, 0)]["x"]
    block = unet.get_submodule(transformer_block_name(LayerKey("input", 1, 0)))
    mean = torch.nn.functional.linear(block.norm1(block_input), block.attn1.to_q.weight).mean(dim=1, keepdim=True)
    assert q.shape[1] == 128
    close(q, mean.expand_as(q))


def test_only_blocks_tomesd_patches_now_count_as_merged():
    unet = build_unet(SD15_LAYOUT)
    block = unet.get_submodule(transformer_block_name(MERGED[0]))
    assert token_merging.tome_info(block) is None
    holder = tome(unet)
    assert token_merging.tome_info(block)["args"]["use_rand"] is False
    tomesd.remove_patch(holder)  # A1111 does this when the ratio goes back to 0; _tome_info stays behind
    assert hasattr(block, "_tome_info") and token_merging.tome_info(block) is None


def test_lib_seg_imports_without_tomesd():
    modules = "lib_seg.unet.hooks, lib_seg.a1111.adapter, lib_seg.unet.token_merging"
    code = f"import sys; sys.modules['tomesd'] = None; import {modules}"
    subprocess.run([sys.executable, "-c", code], check=True)
