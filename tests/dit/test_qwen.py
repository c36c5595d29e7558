"""SEG on Qwen-Image / Qwen-Image-Edit: MSRoPE, centred ids and reference tokens read from the model and the call.

The model is tests/support/dit_qwen.py (Neo 2.26's ``backend/nn/qwen.py`` structure: 5D latent, 2x2 patches
padded circularly, ``norm_q`` before the joint RoPE, reference images after the image).  The slow path
never touches a query: the chosen blocks compute attention explicitly and blur the image rows of their
pre-softmax logits on the true grid (tests/support/slow_seg.blur_logit_rows).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.families import FAMILIES, family_of
from lib_seg.dit.families.qwen import OFFLOADED, QWEN_IMAGE, RELEASED
from lib_seg.dit.geometry import model_patch_size
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import shared_prefix
from lib_seg.dit.queries import blur_image_queries
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support.dit_blocks import Hooks
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.dit_qwen import TinyQwen
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close
from tests.support.unet import SpatialTransformer

N_TXT, N_PAD = 6, 2  # text tokens, the last N_PAD of them the same pad embedding (Neo pads to min_length)
LATENTS = [(6, 6), (9, 13), (5, 12), (1, 7)]  # square, odd sides, non-square, one row
REFS = [(3, 5), (4, 4)]  # Qwen-Image-Edit reference latents (other sizes than the image)


def _build(**kwargs) -> TinyQwen:
    return randomize(TinyQwen(**kwargs), seed=7).double().eval()


def _grid(latent) -> tuple[int, int]:
    return (latent[0] + 1) // 2, (latent[1] + 1) // 2  # the host pads odd sides to the 2x2 patch


def _inputs(latent, batch: int = 2, refs=(), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    context = draw(batch, N_TXT, 12)
    context[:, N_TXT - N_PAD :] = draw(1, 1, 12)
    inputs = {"x": draw(batch, 4, 1, *latent), "context": context}
    inputs["timesteps"] = torch.rand(batch, generator=generator, dtype=torch.float64)
    if refs:
        inputs["ref_latents"] = [draw(batch, 4, 1, *ref) for ref in refs]
    return inputs


def _no_skip(*skip) -> None:
    pytest.fail(f"a block was skipped: {skip}")


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@contextmanager
def _blocks_hooks(model, layers, make):
    attns = [model.transformer_blocks[layer.index].attn for layer in layers]
    try:
        for attn in attns:
            attn.hooks = make()
        yield attns
    finally:
        for attn in attns:
            attn.hooks = Hooks()


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    grid = _grid(inputs["x"].shape[-2:])
    image = slice(N_TXT, N_TXT + grid[0] * grid[1])
    with _blocks_hooks(model, chosen, lambda: Hooks(logits=blur_logit_rows(image, grid, sigma, rows))):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


@pytest.mark.parametrize("refs", [(), REFS[:1]], ids=["text-to-image", "edit with a reference"])
@pytest.mark.parametrize("sigma", [0.9, 3.0, math.inf])
@pytest.mark.parametrize("latent", LATENTS, ids=str)
def test_qwen_queries_equal_blurred_logit_rows_on_the_true_grid(latent, sigma, refs):
    model, inputs = _build(), _inputs(latent, refs=refs)
    plain = _call(model, inputs)
    for spec in ["j1", "all", "j0,j2"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma, on_skip=_no_skip)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


def test_two_references_of_other_sizes_stay_out_of_the_blur():
    model, inputs = _build(), _inputs((7, 10), refs=REFS)
    chosen = resolve_layers("all", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, 2.0, on_skip=_no_skip), _slow(model, inputs, chosen, 2.0))


@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_only_image_queries_change_as_they_enter_attention(sigma):
    """In the blurred block (its inputs are the plain call's): the post-RoPE image queries are the blur of
    the plain ones; text (pad tokens included) and reference queries, every key and value are bit-identical."""
    model, inputs = _build(), _inputs((7, 9), refs=REFS[:1])
    grid, chosen = _grid((7, 9)), (DitLayer("joint", 1),)
    image = slice(N_TXT, N_TXT + grid[0] * grid[1])
    with torch.no_grad(), _blocks_hooks(model, chosen, lambda: Hooks(seen={})) as (attn,):
        model(**inputs)
        plain = dict(attn.hooks.seen)
        with blurred_dit_queries(model, chosen, sigma, on_skip=_no_skip):
            model(**inputs)
        seen = attn.hooks.seen
    for name in ("k", "v"):
        assert torch.equal(seen[name], plain[name]), name
    q, q0 = seen["q"], plain["q"]  # (B, heads, L, D), L = text + image + reference
    assert q.shape[2] > image.stop, "the reference tokens reached the attention"
    assert torch.equal(q[:, :, : image.start], q0[:, :, : image.start])  # text, pad tokens included
    assert torch.equal(q[:, :, image.stop :], q0[:, :, image.stop :])  # the reference image
    expected = blur_image_queries(q0, image, grid, sigma, "bhld")
    assert_network_close(q[:, :, image], expected[:, :, image], "image queries")
    assert not torch.allclose(q[:, :, image], q0[:, :, image])


def test_the_patch_is_read_from_img_in_when_the_model_has_no_patch_size():
    model, inputs = _build(), _inputs((7, 10))
    del model.patch_size
    assert model_patch_size(model, 4) == 2
    chosen = resolve_layers("all", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, 2.0, on_skip=_no_skip), _slow(model, inputs, chosen, 2.0))


def test_a_grid_the_position_ids_contradict_is_never_blurred():
    """A model claiming patch 4 while it patchifies by 2: the 3x4 grid fits into the image stream, but
    the model's centred ids do not lay those tokens on it; every block is skipped with a warning."""
    model, inputs, skips = _build(patch_attr=4), _inputs((9, 13), refs=REFS[:1]), []
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert {s[0] for s in skips} == set(chosen)
    assert all("position ids" in s[3] and "3x4" in s[3] for s in skips)


def test_a_query_count_that_holds_no_grid_is_skipped():
    """Patch 1 claimed and no position ids to check (no ``pe_embedder`` module): the 9x13 grid needs more
    image queries than the block has, so the block is left as it is, with the usual warning."""
    model, inputs, skips = _build(patch_attr=1), _inputs((9, 13)), []
    embedder = model.pe_embedder
    del model.pe_embedder
    model.pe_embedder = embedder.forward  # a plain callable: no module hook can record the ids
    chosen = resolve_layers("j1", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert skips == [(DitLayer("joint", 1), 5 * 7, (9, 13))]


def test_blocks_run_as_offloaded_copies_are_reported_not_silently_skipped():
    """Nunchaku's CPU offload runs buffer copies of the blocks: the hooks on j1, j2 never fire, which is
    reported; j0 (kept on the GPU) is still blurred exactly."""
    model, skips = _build(), []
    model.offload(on_gpu=1)
    inputs = _inputs((6, 7))
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert [s[0] for s in skips] == [DitLayer("joint", 1), DitLayer("joint", 2)]
    assert all(s[3] == OFFLOADED for s in skips)
    assert_network_close(got, _slow(model, inputs, chosen[:1], 2.0))


def test_batched_rows_equal_separate_calls():
    model, inputs = _build(), _inputs((7, 9), refs=REFS[:1])
    chosen = resolve_layers("j1,j2", available_layers(model))
    doubled = {
        k: [torch.cat([r, r]) for r in v] if isinstance(v, list) else torch.cat([v, v]) for k, v in inputs.items()
    }
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))
    assert_network_close(together[2:], _slow(model, inputs, chosen, 3.0))


def test_prefix_reuse_skips_the_seg_rows_in_the_blocks_before_the_first_blurred_one():
    model, inputs = _build(), _inputs((6, 7), batch=2)
    chosen = resolve_layers("j2", available_layers(model))
    seg = {k: with_seg_rows(v, 2) for k, v in inputs.items()}  # (cond, seg) rows, as Forge appends them
    seen: list[int] = []
    handles = [
        b.attn.to_q.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
        for b in model.transformer_blocks
    ]
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4)):
        full = _call(model, seg)
        seen.clear()
        with shared_prefix(model, chosen, 4, 2, drop, expand):
            shared = _call(model, seg)
    for handle in handles:
        handle.remove()
    assert seen == [2, 2, 4]  # the prefix blocks j0, j1 compute the main rows only
    assert_network_close(shared, full)
    assert_network_close(shared[2:], _slow(model, inputs, chosen, 2.0))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_family_detection_claims_qwen_only():
    qwen = TinyQwen()
    others = {"flux": TinyFlux(), "flux2": TinyFlux2(), "mmdit": TinyMMDiT()}
    assert [family.name for family in FAMILIES if family.matches(qwen)] == ["qwen"]
    assert dit_family(qwen) == "qwen" and family_of(qwen) is QWEN_IMAGE
    for name, model in others.items():
        assert not QWEN_IMAGE.matches(model) and dit_family(model) == name
    diffusers_flux = TinyQwen()  # transformer_blocks beside single-stream blocks: diffusers' Flux layout
    diffusers_flux.single_transformer_blocks = torch.nn.ModuleList()
    assert not QWEN_IMAGE.matches(diffusers_flux)
    unet_part = SpatialTransformer(8, 2, 4, depth=1, context_dim=6, use_linear=True, groups=2)  # has transformer_blocks
    assert not QWEN_IMAGE.matches(unet_part) and dit_family(unet_part) is None


def test_block_names_and_the_middle_default_on_the_released_depth():
    released = TinyQwen(hidden=8, heads=1, depth=RELEASED["qwen-image"], axes=(2, 2, 4))
    assert available_layers(released) == model_layers(joint=60)
    assert QWEN_IMAGE.default is None and default_spec(released) == "j30"
    target = query_target(released)
    assert target.resolve("middle") == (DitLayer("joint", 30),)
    assert target.canonical("middle") == "j30"  # infotext names the resolved block
    assert target.resolve("j7-9") == tuple(DitLayer("joint", i) for i in (7, 8, 9))
    with pytest.raises(ValueError, match="it has j0-59"):
        target.resolve("j60")
    assert default_spec(_build()) == "j1"  # a 3-block model: its middle block
