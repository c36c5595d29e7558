"""SEG on Krea 2: grid, text length and image place read from the model and the call, against a float64 logit blur.

The model is tests/support/dit_krea.py: Neo's ``SingleStreamDiT`` (patch 2, grouped-query attention, a
text-fusion transformer) in Neo 2.26's layout (``[txt | image | references]``, 3D context, 5D Wan latents
folded into the batch, a reference path that never calls the blocks) and Neo 2.27+'s (ba50f188: 4D context
``(B, L, layers, width)``, ``[txt | references | image]`` with every reference on the image's grid).  The
slow path never touches a query: the chosen blocks compute attention explicitly and blur the image rows of
their pre-softmax logits (tests/support/slow_seg.blur_logit_rows) on the true grid, at the true place.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.families import FAMILIES, family_of
from lib_seg.dit.families.flux import FLUX1, FLUX2
from lib_seg.dit.families.krea import KREA2, RELEASED, frame_rows, image_start
from lib_seg.dit.families.mmdit import MMDIT
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import shared_prefix
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support.dit_blocks import Hooks, token_ids
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_krea import TinyKrea2, grid_ids
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close

N_TXT, CHANNELS = 5, 4
LATENTS = [(6, 6), (9, 13), (5, 12), (1, 7)]  # square, odd sides, non-square, one patch row
LAYOUTS = ("2.26", "2.29")
REFERENCES = [(3, 5), (4, 4)]  # latent sizes of the reference images (2.29 resizes them to the image's)


def _build(layout: str = "2.26", **kwargs) -> TinyKrea2:
    return randomize(TinyKrea2(layout=layout, **kwargs), seed=11).double().eval()


def _inputs(latent, layout: str = "2.26", batch: int = 2, refs: int = 0, frames: int = 0, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    frames = frames or (1 if layout == "2.29" else 0)  # Neo >= 2.27 gets (B, C, 1, H, W)
    x = draw(batch, CHANNELS, frames, *latent) if frames else draw(batch, CHANNELS, *latent)
    inputs = {"x": x, "timesteps": torch.rand(batch, generator=g, dtype=torch.float64)}
    context = draw(batch, N_TXT, 3, 8)  # 3 tapped layers of width 8: 2.29's 4D context, 2.26's side by side
    inputs["context"] = context if layout == "2.29" else context.flatten(2)
    if refs:
        inputs["ref_latents"] = [draw(1, CHANNELS, *REFERENCES[i % 2]) for i in range(refs)]
    return inputs


def _image(model: TinyKrea2, inputs: dict) -> tuple[slice, tuple[int, int]]:
    """Where the test model puts the image: after the text (2.26), after the text and the references (2.29)."""
    grid = patch_grid(*inputs["x"].shape[-2:], model.real_patch, pad=True)
    n_image = grid[0] * grid[1]
    start = N_TXT + (n_image * len(inputs.get("ref_latents", [])) if model.layout == "2.29" else 0)
    return slice(start, start + n_image), grid


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{"transformer_options": {}, **inputs})  # as Neo's KModel calls it


@contextmanager
def _slow_reference(model, chosen, sigma, image: slice, grid, rows=None):
    attns = [model.blocks[layer.index].attn for layer in chosen]
    for attn in attns:
        attn.hooks = Hooks(logits=blur_logit_rows(image, grid, sigma, rows))
    try:
        yield
    finally:
        for attn in attns:
            attn.hooks = Hooks()


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    with _slow_reference(model, chosen, sigma, *_image(model, inputs), rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


CASES = [  # every latent without references, a square and an odd one with 1 and 2; 3 sigmas, then 2
    *[(layout, latent, 0, sigma) for layout in LAYOUTS for latent in LATENTS for sigma in (0.9, 3.0, math.inf)],
    *[
        (layout, latent, refs, sigma)
        for layout in LAYOUTS
        for latent in LATENTS[:2]
        for refs in (1, 2)
        for sigma in (0.9, math.inf)
    ],
]


@pytest.mark.parametrize(("layout", "latent", "refs", "sigma"), CASES, ids=str)
def test_krea2_queries_equal_blurred_logit_rows_on_the_true_grid(layout, latent, refs, sigma):
    model, inputs, skips = _build(layout), _inputs(latent, layout, refs=refs), []
    plain = _call(model, inputs)
    for spec in ["s1", "all"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma, on_skip=lambda *a: skips.append(a))
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"
    assert not skips


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("refs", [1, 2])
def test_a_reference_on_the_images_own_grid_is_never_blurred(layout, refs):
    """References of the image's size hold ids (i + 1, row, col), the same (row, col) as the image's
    (0, row, col); on 2.29 they come first.  Only the image's queries change, and exactly as the slow
    reference blurs them; text and reference queries, keys and values are bit-identical."""
    model, inputs = _build(layout), _inputs((5, 7), layout, refs=refs)
    inputs["ref_latents"] = [torch.randn_like(inputs["x"][:1].flatten(1, -3)) for _ in range(refs)]  # (1, C, H, W)
    image, grid = _image(model, inputs)
    chosen = resolve_layers("s1", available_layers(model))
    attn, plain, seen = model.blocks[1].attn, {}, {}
    try:
        attn.hooks = Hooks(seen=plain)
        _call(model, inputs)
        attn.hooks = Hooks(seen=seen)
        _seg(model, inputs, chosen, 2.0)
    finally:
        attn.hooks = Hooks()
    q, q0 = seen["q"], plain["q"]
    assert q.shape[2] == N_TXT + (refs + 1) * grid[0] * grid[1]  # every reference on the image's grid
    assert torch.equal(q[:, :, : image.start], q0[:, :, : image.start])  # text (and 2.29's references)
    assert torch.equal(q[:, :, image.stop :], q0[:, :, image.stop :])  # 2.26's references
    assert not torch.equal(q[:, :, image], q0[:, :, image])
    assert torch.equal(seen["k"], plain["k"]) and torch.equal(seen["v"], plain["v"])
    assert_network_close(_seg(model, inputs, chosen, 2.0), _slow(model, inputs, chosen, 2.0))


def test_the_image_is_found_by_every_axis_of_its_ids():
    ids = lambda *parts: torch.cat(parts, dim=1)  # noqa: E731
    text, image, same = torch.zeros(2, 4, 3), grid_ids(3, 4, 0, 2, None), grid_ids(3, 4, 1, 2, None)
    assert image_start(ids(text, same, image), 4, (3, 4)) == 16  # 2.29: a same-grid reference first
    assert image_start(ids(text, image, same), 4, (3, 4)) == 4  # 2.26: the image first
    assert image_start(ids(text, same), 4, (3, 4)) is None  # a reference is never the image
    assert image_start(ids(text, image), 4, (4, 3)) is None  # a grid its ids contradict
    assert image_start(token_ids(4, 3, 4, n_extra=6, batch=2), 4, (3, 4)) == 4


def test_5d_wan_latents_blur_each_frame_and_only_the_chosen_rows():
    """Neo 2.26 hands Krea 2 ``(B, C, T, H, W)`` latents (Wan layout) and folds the frames into the batch."""
    model, inputs = _build(), _inputs((7, 6), batch=2, frames=2)
    inputs["context"] = inputs["context"].repeat_interleave(2, dim=0)  # one text row per frame, as Neo needs
    inputs["timesteps"] = inputs["timesteps"].repeat_interleave(2)
    chosen = resolve_layers("s1", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, rows=[1])
    assert_network_close(got, _slow(model, inputs, chosen, 2.0, rows=[2, 3]))  # batch row 1 = sequences 2, 3
    assert torch.equal(got[0], _call(model, inputs)[0])
    assert frame_rows(slice(1, None), 3, 2) == [3, 4, 5] and frame_rows(slice(0, 1), 1, 4) == slice(0, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_rows_equal_separate_calls(layout):
    model, inputs = _build(layout), _inputs((7, 9), layout, refs=2)
    chosen = resolve_layers("s0,s2", available_layers(model))
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("patch_attr,grid", [(1, "9x13"), (4, "3x4")])
def test_a_grid_that_the_ids_contradict_is_skipped_with_a_warning(layout, patch_attr, grid):
    """A ``patch`` attribute that lies (1 or 4 on a patch-2 model): one grid has more tokens than the
    sequence holds, the other fits a part of it, but the model's own position ids say no; nothing is blurred."""
    model, inputs, skips = _build(layout, patch_attr=patch_attr), _inputs((9, 13), layout, refs=1), []
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    message = f"hold no {grid} image, ids (0, row, column) row-major, after its 5 text tokens"
    assert [s[0] for s in skips] == list(chosen) and all(message in s[3] for s in skips)


def test_a_block_called_outside_a_model_call_is_skipped():
    """No model call recorded a latent: the image tokens cannot be placed and q stays as it is."""
    model, skips = _build(), []
    x, vec = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 1, 192, dtype=torch.float64)
    chosen = resolve_layers("s1", available_layers(model))
    with torch.no_grad():
        plain = model.blocks[1](x, vec, None)
        with blurred_dit_queries(model, chosen, 2.0, on_skip=lambda *a: skips.append(a)):
            got = model.blocks[1](x, vec, None)
    assert torch.equal(got, plain)
    assert skips == [(DitLayer("single", 1), 9, None, "the model call passed no 4D or 5D latent")]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_attention_that_reaches_no_seam_is_reported_by_name(layout):
    """A kernel that attends by itself: every chosen block is reported once per call, nothing changes."""
    model, inputs, skips = _build(layout, kernel="private"), _inputs((6, 6), layout, refs=1), []
    chosen = resolve_layers("s0,s2", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [s[0] for s in skips] == list(chosen) and all("never reached SEG" in s[3] for s in skips)
    assert all(s[1] == N_TXT + 9 + (9 if layout == "2.29" else 2 * 3) for s in skips)  # text, image, reference


def test_family_detection_is_by_structure_and_claims_no_other_model():
    krea = _build()
    assert family_of(krea) is KREA2 and dit_family(krea) == "krea2" and dit_family(_build("2.29")) == "krea2"
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
    "layout,refs,options,slimmed",
    [
        ("2.26", 0, {}, True),
        ("2.26", 1, {}, False),
        ("2.26", 0, {"patches": object()}, False),
        ("2.29", 1, {}, True),
    ],
    ids=["slimmed", "2.26 reference path: blocks not called as modules", "opaque options", "2.29 references"],
)
def test_prefix_reuse_skips_the_seg_rows_or_safely_falls_back(layout, refs, options, slimmed):
    model = _build(layout, layers=4)
    inputs = {
        k: with_seg_rows(v, 2) if torch.is_tensor(v) else v for k, v in _inputs((6, 7), layout, refs=refs).items()
    }
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
