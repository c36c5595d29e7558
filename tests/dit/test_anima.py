"""SEG on Anima: the self-attention queries of the image blurred over its grid, against a float64 logit blur.

The model is tests/support/dit_anima.py: Neo's Anima (Cosmos-Predict2 blocks on 5-D latents, patches 1x2x2,
split-half 3D RoPE, cross-attention to the LLM adapter's output, reference latents appended as frames), in
Neo 2.26's layout (q-norm module, then RoPE) and 2.29's (``ck.rms_rope_split_half``: no q-norm module runs),
both calling the module-global ``attention_function``.  The slow path never touches a query: the chosen
blocks compute their self-attention explicitly and blur each image frame's logit rows with the dense
reference blur.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.families.anima import RELEASED
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import shared_prefix
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.core.test_blur import reference_blur
from tests.support.dit_anima import TinyAnima
from tests.support.dit_blocks import Hooks
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.dit_wan import blurred_frame_logits
from tests.support.tolerance import FLOAT64_NETWORK_REL, assert_network_close, assert_within, max_abs

N_TXT = 6
LATENTS = [(1, 6, 6), (1, 9, 13), (1, 5, 12), (2, 5, 7)]  # (T, H, W): square, odd sides, non-square, two frames
SIGMAS = [0.9, 3.0, math.inf]
VARIANTS = {"2.26": {}, "2.29": {"fused": True}}  # Neo 2.29: q-norm and RoPE one kernel, no q-norm module call


def _build(variant: str = "2.26", **kwargs) -> TinyAnima:
    return randomize(TinyAnima(**VARIANTS[variant], **kwargs), seed=11).double().eval()


def _inputs(latent, batch: int = 2, refs: int = 0, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, N_TXT, 12)}
    inputs["timesteps"] = torch.rand(batch, generator=generator, dtype=torch.float64)
    if refs:
        inputs["ref_latents"] = [draw(batch, 4, 1, *latent[1:]) for _ in range(refs)]
    return inputs


def _grid(latent) -> tuple[int, int]:
    return -(-latent[1] // 2), -(-latent[2] // 2)


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{"transformer_options": {}, **inputs})  # as Neo's KModel calls it


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    latent = tuple(inputs["x"].shape[2:])
    with blurred_frame_logits([model.blocks[layer.index] for layer in chosen], sigma, latent[0], _grid(latent), rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


CASES = [(v, latent) for v in VARIANTS for latent in LATENTS]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize(("variant", "latent"), CASES, ids=str)
def test_anima_queries_equal_blurred_logit_rows(variant, latent, sigma):
    model, inputs, skips = _build(variant), _inputs(latent), []
    plain = _call(model, inputs)
    for spec in ["b1", "all"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma, on_skip=lambda *a: skips.append(a))
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"
    assert not skips


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("refs", [1, 2])
@pytest.mark.parametrize(("latent", "sigma"), [((1, 7, 6), 2.0), ((2, 5, 6), math.inf)], ids=str)
def test_reference_latents_are_left_alone(variant, refs, latent, sigma):
    """Neo's Anima reference (edit) latents follow the image as frames; only the image frames are blurred."""
    model, inputs = _build(variant), _inputs(latent, refs=refs)
    chosen = resolve_layers("b0,b2", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, sigma), _slow(model, inputs, chosen, sigma))


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_image_queries_change_and_keys_values_and_the_cross_attention_stay(variant):
    """Entering the chosen block's self-attention: keys, values and the reference frame's queries are
    bit-identical, the image queries are the blur of the plain ones (after RoPE).  Its cross-attention (to
    the text, through the same attention function) gets the queries of its own input, unblurred."""
    model, inputs = _build(variant), _inputs((1, 5, 6), refs=1)
    layer, block = DitLayer("block", 1), model.blocks[1]
    plain, seg, cross, cross_input = {}, {}, {}, []
    handle = block.cross_attn.register_forward_pre_hook(lambda _m, args: cross_input.append(args[0]))
    try:
        block.hooks = Hooks(seen=plain)
        _call(model, inputs)
        block.hooks, block.cross_hooks = Hooks(seen=seg), Hooks(seen=cross)
        _seg(model, inputs, [layer], 2.0)
    finally:
        block.hooks, block.cross_hooks = Hooks(), Hooks()
        handle.remove()
    assert torch.equal(plain["k"], seg["k"]) and torch.equal(plain["v"], seg["v"])
    n_image = 3 * 3
    assert plain["q"].shape[2] == 2 * n_image  # the image frame, then the reference frame
    assert torch.equal(plain["q"][:, :, n_image:], seg["q"][:, :, n_image:])
    tokens = lambda q: q[:, :, :n_image].transpose(1, 2).flatten(2)  # noqa: E731
    expected = reference_blur(tokens(plain["q"]), 3, 3, 2.0)
    assert_within(tokens(seg["q"]), expected, FLOAT64_NETWORK_REL * max_abs(expected), "image queries")
    attention = block.cross_attn
    with torch.no_grad():
        own = attention.q_norm(attention.q_proj(cross_input[-1]).unflatten(-1, (attention.heads, -1)))
    assert torch.equal(cross["q"], own.transpose(1, 2))


def test_batched_rows_equal_separate_calls():
    model, inputs = _build("2.29"), _inputs((1, 7, 9), refs=1)
    chosen = resolve_layers("b0,b2", available_layers(model))
    doubled = {
        k: [torch.cat([r, r]) for r in v] if isinstance(v, list) else torch.cat([v, v]) for k, v in inputs.items()
    }
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))


def test_queries_that_are_not_the_blocks_grid_are_skipped_with_a_warning():
    """An attention call on other tokens than the block's grid (a tiling extension's sub-grid) is left as
    it is, with a warning."""
    model, inputs, skips = _build(), _inputs((1, 6, 8)), []
    attention, layer = model.blocks[1].self_attn, DitLayer("block", 1)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad(), blurred_dit_queries(model, [layer], 2.0, on_skip=lambda *a: skips.append(a)):
        _call(model, inputs)
        assert not skips
        got = attention(x, None, None, {})
    assert torch.equal(got, attention(x, None, None, {}))
    assert skips == [(layer, 5, None, "its 5 queries are not the block's 1x3x4 token grid")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_self_attention_that_reaches_no_seam_is_reported_not_silently_skipped(variant):
    """A kernel that attends by itself (neither the module global nor ``wrap_attn``'s override): every
    chosen block is reported once per call, and nothing changes."""
    model, inputs, skips = _build(variant, kernel="private"), _inputs((1, 6, 6)), []
    chosen = resolve_layers("b0,b2", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [s[0] for s in skips] == list(chosen) and all("never reached SEG" in s[3] for s in skips)
    assert all(s[1] == 3 * 3 for s in skips)  # the tokens the self-attention got


def test_prefix_reuse_skips_the_seg_rows_in_the_prefix_blocks():
    """The blocks' rotations are one row for all (left as they are); every per-row argument is slimmed."""
    model, inputs = _build("2.29"), _inputs((1, 5, 6), batch=2)
    chosen = resolve_layers("b2", available_layers(model))
    seg = {k: with_seg_rows(v, 2) for k, v in inputs.items()}  # (cond, SEG) rows, as Forge appends them
    seen: list[int] = []
    blocks = model.blocks[:2]
    handles = [b.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0])) for b in blocks]
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    try:
        with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4)):
            full = _call(model, seg)
            seen.clear()
            with shared_prefix(model, chosen, 4, 2, drop, expand):
                shared = _call(model, seg)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [2, 2]
    assert_network_close(shared, full)
    assert not torch.equal(full[2:], full[:2])  # the SEG rows were blurred
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_family_detection_tells_anima_from_the_others():
    assert dit_family(TinyAnima()) == "anima" and dit_family(TinyAnima(fused=True)) == "anima"
    for other in (TinyFlux(), TinyFlux2(), TinyMMDiT()):
        assert dit_family(other) != "anima"


@pytest.mark.parametrize(("released", "middle"), [("anima", "b14"), ("anima-2.9b", "b20"), ("anima-3.8b", "b26")])
def test_block_names_and_the_middle_default_at_the_released_depths(released, middle):
    depth = RELEASED[released]
    model = TinyAnima(model_channels=12, num_heads=1, num_blocks=depth, adaln_lora_dim=2)
    assert available_layers(model) == model_layers(block=depth)
    assert default_spec(model) == middle and query_target(model).canonical("middle") == middle
    assert query_target(model).resolve(f"b0,b{depth - 1}") == (DitLayer("block", 0), DitLayer("block", depth - 1))
    with pytest.raises(ValueError, match=f"it has b0-{depth - 1}"):
        query_target(model).resolve(f"b{depth}")
