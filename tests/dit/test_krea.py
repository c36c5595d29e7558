"""SEG on Krea 2: grid, text length and rotations read from the model and the call, against a float64 logit blur.

The model is tests/support/dit_krea.py (Neo 2.26's ``SingleStreamDiT``: patch 2, grouped-query attention,
a text-fusion transformer, ``[txt | image | references]``, 5D Wan-layout latents).  The slow path never
touches a query: the chosen blocks compute attention explicitly and blur the image rows of their pre-softmax
logits (tests/support/slow_seg.blur_logit_rows) on the true grid.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from lib_seg.core.batching import with_seg_rows, without_seg_rows
from lib_seg.core.targets import query_target
from lib_seg.dit.families import FAMILIES, family_of
from lib_seg.dit.families.flux import FLUX1, FLUX2
from lib_seg.dit.families.krea import KREA2, RELEASED, frame_rows
from lib_seg.dit.families.mmdit import MMDIT
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.layers import DitLayer, model_layers, resolve_layers
from lib_seg.dit.prefix import shared_prefix
from tests.support.dit_blocks import Hooks
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_krea import TinyKrea2
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close

N_TXT, CHANNELS = 5, 4
LATENTS = [(6, 6), (9, 13), (5, 12), (1, 7)]  # square, odd sides, non-square, one patch row


def _build(**kwargs) -> TinyKrea2:
    return randomize(TinyKrea2(**kwargs), seed=11).double().eval()


def _inputs(latent, batch: int = 2, refs: bool = False, frames: int = 0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = draw(batch, CHANNELS, frames, *latent) if frames else draw(batch, CHANNELS, *latent)
    inputs = {"x": x, "timesteps": torch.rand(batch, generator=g, dtype=torch.float64)}
    inputs["context"] = draw(batch, N_TXT, 3 * 8)  # 3 tapped layers of width 8, side by side
    if refs:
        inputs["ref_latents"] = [draw(1, CHANNELS, 3, 5), draw(1, CHANNELS, 4, 4)]
    return inputs


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@contextmanager
def _slow_reference(model, chosen, sigma, grid, rows=None):
    attns = [model.blocks[layer.index].attn for layer in chosen]
    n_image = grid[0] * grid[1]
    for attn in attns:
        attn.hooks = Hooks(logits=blur_logit_rows(slice(N_TXT, N_TXT + n_image), grid, sigma, rows))
    try:
        yield
    finally:
        for attn in attns:
            attn.hooks = Hooks()


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    grid = patch_grid(*inputs["x"].shape[-2:], model.real_patch, pad=True)
    with _slow_reference(model, chosen, sigma, grid, rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


@pytest.mark.parametrize("refs", [False, True], ids=["text-to-image", "with reference images"])
@pytest.mark.parametrize("sigma", [0.9, 3.0, math.inf])
@pytest.mark.parametrize("latent", LATENTS, ids=str)
def test_krea2_queries_equal_blurred_logit_rows_on_the_true_grid(latent, sigma, refs):
    model, inputs = _build(), _inputs(latent, refs=refs)
    plain = _call(model, inputs)
    for spec in ["s1", "all", "s0,s2"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


def test_5d_wan_latents_blur_each_frame_and_only_the_chosen_rows():
    """Neo hands Krea 2 ``(B, C, T, H, W)`` latents (Wan layout) and folds the frames into the batch."""
    model, inputs = _build(), _inputs((7, 6), batch=2, frames=2)
    inputs["context"] = inputs["context"].repeat_interleave(2, dim=0)  # one text row per frame, as Neo needs
    inputs["timesteps"] = inputs["timesteps"].repeat_interleave(2)
    chosen = resolve_layers("s1", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, rows=[1])
    assert_network_close(got, _slow(model, inputs, chosen, 2.0, rows=[2, 3]))  # batch row 1 = sequences 2, 3
    assert torch.equal(got[0], _call(model, inputs)[0])
    assert frame_rows(slice(1, None), 3, 2) == [3, 4, 5] and frame_rows(slice(0, 1), 1, 4) == slice(0, 1)


def test_text_and_reference_queries_and_all_keys_and_values_stay_bit_identical():
    model, inputs = _build(), _inputs((5, 7), refs=True)
    attn = model.blocks[1].attn
    n_image = 3 * 4
    attn.hooks = Hooks(seen={})
    _call(model, inputs)
    plain = dict(attn.hooks.seen)
    with blurred_dit_queries(model, resolve_layers("s1", available_layers(model)), 2.0):
        _call(model, inputs)
    seen = attn.hooks.seen
    image = slice(N_TXT, N_TXT + n_image)
    assert torch.equal(seen["q"][:, :, :N_TXT], plain["q"][:, :, :N_TXT])  # text
    assert torch.equal(seen["q"][:, :, image.stop :], plain["q"][:, :, image.stop :])  # reference images
    assert not torch.equal(seen["q"][:, :, image], plain["q"][:, :, image])
    assert torch.equal(seen["k"], plain["k"]) and torch.equal(seen["v"], plain["v"])


def test_batched_rows_equal_separate_calls():
    model, inputs = _build(), _inputs((7, 9), refs=True)
    chosen = resolve_layers("s0,s2", available_layers(model))
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))


@pytest.mark.parametrize(
    "patch_attr,message",
    [(1, "do not hold 5 text and 9x13 image tokens"), (4, "do not lay its image tokens on the 3x4 grid")],
)
def test_a_grid_that_the_sequence_or_the_ids_contradict_is_skipped_with_a_warning(patch_attr, message):
    """A ``patch`` attribute that lies (1 or 4 on a patch-2 model): one grid has more tokens than the sequence
    holds, the other fits a prefix of it, but the model's own position ids say no; nothing is blurred."""
    model, inputs, skips = _build(patch_attr=patch_attr), _inputs((9, 13)), []
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [s[0] for s in skips] == list(chosen) and all(message in s[3] for s in skips)


def test_a_block_called_outside_a_model_call_is_skipped():
    """No model call recorded a latent: the hook cannot place the image tokens and leaves q as it is."""
    model, skips = _build(), []
    x, vec = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 1, 192, dtype=torch.float64)
    chosen = resolve_layers("s1", available_layers(model))
    with torch.no_grad():
        plain = model.blocks[1](x, vec, None)
        with blurred_dit_queries(model, chosen, 2.0, on_skip=lambda *a: skips.append(a)):
            got = model.blocks[1](x, vec, None)
    assert torch.equal(got, plain)
    assert skips == [(DitLayer("single", 1), 9, None, "the model call passed no 4D or 5D latent")]


def test_family_detection_is_by_structure_and_claims_no_other_model():
    krea = _build()
    assert family_of(krea) is KREA2 and dit_family(krea) == "krea2"
    assert not any(family.matches(krea) for family in (FLUX1, FLUX2, MMDIT))  # no Flux / SD3 family claims it
    for other in (TinyFlux(), TinyFlux2(), TinyMMDiT()):
        assert not KREA2.matches(other)
    assert FAMILIES.index(KREA2) == 0
    del krea.txtfusion  # a single-stream ``blocks`` model without Krea's text fusion is not Krea 2
    assert not KREA2.matches(krea)


def test_block_names_and_the_middle_default_on_the_released_depth():
    released = TinyKrea2(features=16, heads=1, kvheads=1, layers=RELEASED["krea-2"])
    assert available_layers(released) == model_layers(single=28)
    assert default_spec(released) == "s14"
    target = query_target(released)
    assert target.resolve("middle") == (DitLayer("single", 14),) and target.canonical("middle") == "s14"
    with pytest.raises(ValueError, match="it has s0-27"):
        target.resolve("s28")


def _rows_entering_blocks(model) -> tuple[list[int], list]:
    seen: list[int] = []
    hook = lambda _m, args: seen.append(args[0].shape[0])  # noqa: E731
    return seen, [block.attn.wq.register_forward_pre_hook(hook) for block in model.blocks]


@pytest.mark.parametrize(
    "refs,options,slimmed",
    [(False, {}, True), (True, {}, False), (False, {"patches": object()}, False)],
    ids=["slimmed", "reference path: blocks not called as modules", "opaque transformer_options"],
)
def test_prefix_reuse_skips_the_seg_rows_or_safely_falls_back(refs, options, slimmed):
    model = _build(layers=4)
    inputs = {k: with_seg_rows(v, 2) if torch.is_tensor(v) else v for k, v in _inputs((6, 7), refs=refs).items()}
    inputs["transformer_options"] = options
    chosen = resolve_layers("s2", available_layers(model))
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4)):
        full = _call(model, inputs)
        with shared_prefix(model, chosen, 4, 2, drop, expand):
            seen, handles = _rows_entering_blocks(model)
            shared = _call(model, inputs)
    for handle in handles:
        handle.remove()
    assert seen == ([2, 2, 4, 4] if slimmed else [4, 4, 4, 4])
    assert_network_close(shared, full)
    assert not torch.equal(full[:2], full[2:])  # the SEG rows were blurred
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
