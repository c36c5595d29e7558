"""SEG on PixelDiT / PiD: patch and pixel blocks, grid and rotations read from the model, against a logit blur.

The model is tests/support/dit_pixeldit.py (Neo 2.26's ``PixDiT_T2I`` / ``PidNet``: RGB pixels padded to 16-px
patches, here 4-px; MMDiT ``patch_blocks`` over ``[text | image]``; ``pixel_blocks`` whose attention runs over
the patch tokens alone; interleaved 2D RoPE; PiD's LQ gate).  The slow path never touches a query: the chosen
blocks' attention blurs the image rows of its pre-softmax logits (tests/support/slow_seg.blur_logit_rows).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.families import FAMILIES, family_of
from lib_seg.dit.families.pixeldit import PIXELDIT, RELEASED, rotations_fit_grid
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import prefix_plan, shared_prefix
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support.dit_blocks import Hooks
from tests.support.dit_ernie import TinyErnie
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_krea import TinyKrea2
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.dit_pixeldit import TinyPixelDiT, rope_2d
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close

N_TXT = 5
IMAGES = [(12, 12), (13, 22), (8, 20), (3, 9)]  # 3x3 patches, padded odd sides 4x6, non-square 2x5, one row 1x3


def _build(**kwargs) -> TinyPixelDiT:
    model = randomize(TinyPixelDiT(**kwargs), seed=2).double().eval()
    if hasattr(model, "lq_proj"):
        model.lq_latent = torch.randn(1, 3, 2, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return model


def _inputs(size, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *size, generator=g, dtype=torch.float64)
    context = torch.randn(batch, N_TXT, 12, generator=g, dtype=torch.float64)
    return {"x": x, "timesteps": torch.rand(batch, generator=g, dtype=torch.float64), "context": context}


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@contextmanager
def _slow_reference(model, chosen, sigma, grid, rows=None):
    n_image = grid[0] * grid[1]
    attns = [PIXELDIT.block(model, layer).attn for layer in chosen]
    for layer, attn in zip(chosen, attns, strict=True):  # patch blocks: [text | image]; pixel blocks: the image
        image = slice(N_TXT, N_TXT + n_image) if layer.kind == "joint" else slice(0, n_image)
        attn.hooks = Hooks(logits=blur_logit_rows(image, grid, sigma, rows))
    try:
        yield
    finally:
        for attn in attns:
            attn.hooks = Hooks()


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    grid = patch_grid(*inputs["x"].shape[-2:], model.patch, pad=True)
    with _slow_reference(model, chosen, sigma, grid, rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


@pytest.mark.parametrize("lq", [False, True], ids=["PixelDiT", "PiD"])
@pytest.mark.parametrize("sigma", [0.9, 3.0, math.inf])
@pytest.mark.parametrize("size", IMAGES, ids=str)
def test_pixeldit_queries_equal_blurred_logit_rows_on_the_true_grid(size, sigma, lq):
    model = _build(lq=lq)
    inputs = _inputs(size, batch=1 if lq else 2)  # PiD: one row per LQ image, as Neo runs it
    plain = _call(model, inputs)
    for spec in ["j1", "b0", "all", "j0,b1"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


def _seen(model, attn, layers) -> dict:
    attn.hooks = Hooks(seen={})
    with blurred_dit_queries(model, layers, 2.0):
        _call(model, _inputs((13, 22)))
    seen, attn.hooks = attn.hooks.seen, Hooks()
    return seen


@pytest.mark.parametrize("kind", ["joint", "block"])
def test_text_queries_and_all_keys_and_values_stay_bit_identical(kind):
    model = _build()
    layer = DitLayer(kind, 1 if kind == "joint" else 0)
    attn = PIXELDIT.block(model, layer).attn
    plain, blurred = _seen(model, attn, []), _seen(model, attn, [layer])
    text = N_TXT if kind == "joint" else 0  # patch blocks: [text | image]; pixel blocks: the image alone
    assert torch.equal(blurred["q"][:, :, :text], plain["q"][:, :, :text])
    assert not torch.equal(blurred["q"][:, :, text:], plain["q"][:, :, text:])
    assert torch.equal(blurred["k"], plain["k"]) and torch.equal(blurred["v"], plain["v"])


@pytest.mark.parametrize("lq", [False, True], ids=["PixelDiT", "PiD"])
def test_batched_rows_equal_separate_calls(lq):
    """PiD: the SEG rows ride with the cond rows; the LQ features (one row per image) are tiled to them."""
    model, inputs = _build(lq=lq), _inputs((13, 10), batch=1)
    chosen = resolve_layers("j0,b1", available_layers(model))
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(1, 2))
    assert_network_close(together[:1], _call(model, inputs))
    assert_network_close(together[1:], _seg(model, inputs, chosen, 3.0))
    if lq:  # the host alone cannot run that batch: its gate joins features of one row with image rows of two
        with pytest.raises(RuntimeError):
            _call(model, doubled)


@pytest.mark.parametrize(
    "build,size,message",
    [
        (lambda: _build(patch_attr=2), (13, 22), None),  # a lying patch_size: 7x11 patches for a 4x6 sequence
        (lambda: _build(swap_rope=True), (8, 20), "rotations do not lay its image tokens on the 2x5 grid"),
    ],
    ids=["count", "rotations"],
)
def test_a_grid_the_queries_or_rotations_contradict_is_skipped_with_a_warning(build, size, message):
    model, inputs, skips = build(), _inputs(size), []
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [s[0] for s in skips] == list(chosen)
    assert all((len(s) == 3 if message is None else message in s[3]) for s in skips)


def test_rotations_check():
    pe = rope_2d(8, 3, 4)[None, None]
    assert rotations_fit_grid(pe, (3, 4)) and not rotations_fit_grid(pe, (4, 3)) and not rotations_fit_grid(pe, (2, 6))
    assert rotations_fit_grid(rope_2d(8, 5, 5)[None, None], (5, 5))
    assert not rotations_fit_grid(rope_2d(8, 4, 3)[None, None], (3, 4))  # same count, transposed grid


def test_family_detection_is_by_structure_and_claims_no_other_model():
    model = _build(lq=True)
    assert family_of(model) is PIXELDIT and dit_family(model) == "pixeldit"
    assert not any(family.matches(model) for family in FAMILIES if family is not PIXELDIT)
    for other in (TinyFlux(), TinyFlux2(), TinyMMDiT(), TinyKrea2(), TinyErnie()):
        assert not PIXELDIT.matches(other)
    del model.s_embedder
    assert not PIXELDIT.matches(model)


def test_block_names_and_the_middle_default_on_the_released_depths():
    joint, pixel = RELEASED["pid"]
    released = TinyPixelDiT(hidden_size=8, num_groups=1, patch_depth=joint, pixel_depth=pixel, lq=True)
    assert available_layers(released) == model_layers(joint=14, block=2)
    assert default_spec(released) == "j7"
    target = query_target(released)
    assert target.resolve("middle") == (DitLayer("joint", 7),) and target.canonical("middle") == "j7"
    assert target.resolve("block") == (DitLayer("block", 0), DitLayer("block", 1))
    with pytest.raises(ValueError, match="it has j0-13,b0-1"):
        target.resolve("b2")


@pytest.mark.parametrize("lq", [False, True], ids=["PixelDiT", "PiD"])
def test_prefix_reuse_falls_back_to_full_rows(lq):
    """The host mixes rows between blocks (PiD's LQ gate, ``t_emb`` between the streams; the pixel blocks see
    B * Hs * Ws rows): no block is slimmed, and the batched output is that of the plain batched call."""
    model = _build(lq=lq)
    inputs = {k: with_seg_rows(v, 1) for k, v in _inputs((8, 12), batch=1).items()}
    chosen = resolve_layers("j2,b1", available_layers(model))
    assert prefix_plan(model, chosen)[0] == []
    drop, expand = partial(without_seg_rows, n_cond=1), partial(with_seg_rows, n_cond=1)
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(1, 2)):
        full = _call(model, inputs)
        with shared_prefix(model, chosen, 2, 1, drop, expand):
            shared = _call(model, inputs)
    assert torch.equal(shared, full) and not torch.equal(full[:1], full[1:])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
