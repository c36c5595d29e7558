"""SEG on NextDiT (Z-Image, Lumina Image 2): grid, caption padding and RoPE read from the model and the call.

The model is tests/support/dit_nextdit.py (Neo 2.26's ``backend/nn/lumina.py`` structure: caption and
noise refiners, then ``layers`` over ``[caption | caption pad | image | image pad]``, 3-axis RoPE as 2x2
rotations applied after the q-norm inside the attention).  The slow path never touches a query: the
chosen layers compute attention explicitly and blur the image rows of their pre-softmax logits on the
true grid (tests/support/slow_seg.py's ``blur_logit_rows``), at the image offset computed here from the
caption length and the pad multiple the test chose.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.families import FAMILIES, family_of
from lib_seg.dit.families.nextdit import LUMINA2, RELEASED, ZIMAGE
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import shared_prefix
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support.dit_blocks import OVERRIDE, Hooks
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_models import TinyFlux, TinyMMDiT
from tests.support.dit_nextdit import TinyNextDiT, build
from tests.support.slow_seg import blur_logit_rows
from tests.support.tolerance import assert_network_close

N_TXT = 5
LATENTS = [(6, 6), (9, 13), (5, 12), (1, 7)]  # square, odd sides, non-square, one patch row
VARIANTS = {
    "z-image": dict(z_image=True, pad_multiple=4),  # caption 5 -> 8 tokens, image padded to a multiple of 4
    "lumina2": dict(z_image=False, pad_multiple=None, kv_heads=1),  # grouped k/v heads, no pad tokens
    "no-qk-norm": dict(z_image=False, pad_multiple=4, qk_norm=False),  # q- and k-norm one shared Identity
    "z-image-2.29": dict(z_image=True, pad_multiple=4, fused=True),  # Neo >= 2.27: ck.rms_rope, no q-norm call
    "lumina2-2.29": dict(z_image=False, pad_multiple=None, kv_heads=1, fused=True),  # ck.rms_rope1 (grouped)
    "override-only": dict(z_image=True, pad_multiple=4, fused=True, kernel="attribute"),  # no module global
}


def _n_cap(model: TinyNextDiT) -> int:
    multiple = model.pad_tokens_multiple or 1
    return -(-N_TXT // multiple) * multiple


def _inputs(latent, batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, N_TXT, 12)}
    inputs["timesteps"] = torch.rand(batch, generator=generator, dtype=torch.float64)
    return inputs


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**{"transformer_options": {}, **inputs})  # as Neo's KModel calls it


@contextmanager
def _blurred_logits(model: TinyNextDiT, chosen, sigma: float, grid, rows=None):
    n_cap = _n_cap(model)
    attentions = [model.layers[layer.index].attention for layer in chosen]
    try:
        for attention in attentions:
            attention.hooks = Hooks(logits=blur_logit_rows(slice(n_cap, n_cap + grid[0] * grid[1]), grid, sigma, rows))
        yield
    finally:
        for attention in attentions:
            attention.hooks = Hooks()


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    grid = patch_grid(*inputs["x"].shape[-2:], model.patch, pad=True)
    with _blurred_logits(model, chosen, sigma, grid, rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


NEO_229 = ("z-image-2.29", "lumina2-2.29", "override-only")  # the same seam: an odd and a square latent do
CASES = [(v, latent) for v in VARIANTS for latent in (LATENTS[:2] if v in NEO_229 else LATENTS)]


@pytest.mark.parametrize("sigma", [0.9, 3.0, math.inf])
@pytest.mark.parametrize(("variant", "latent"), CASES, ids=str)
def test_nextdit_queries_equal_blurred_logit_rows_on_the_true_grid(variant, latent, sigma):
    model, inputs = build(seed=3, **VARIANTS[variant]), _inputs(latent)
    plain = _call(model, inputs)
    for spec in ["l1", "all", "l0,l2"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_image_queries_change_as_they_enter_attention(variant):
    """Caption, caption pad and image pad queries, all keys and values: bit-identical (also where one
    Identity is both q- and k-norm, whose second call is the keys')."""
    model, inputs = build(seed=4, **VARIANTS[variant]), _inputs((9, 13))
    n_cap, n_image = _n_cap(model), 5 * 7
    attention = model.layers[1].attention
    chosen = resolve_layers("l1", available_layers(model))
    plain, seg = {}, {}
    attention.hooks = Hooks(seen=plain)
    _call(model, inputs)
    attention.hooks = Hooks(seen=seg)
    _seg(model, inputs, chosen, 2.0)
    attention.hooks = Hooks()
    assert torch.equal(seg["k"], plain["k"]) and torch.equal(seg["v"], plain["v"])
    q, q0 = seg["q"], plain["q"]  # (B, heads, L, D) after RoPE
    assert torch.equal(q[:, :, :n_cap], q0[:, :, :n_cap])
    assert torch.equal(q[:, :, n_cap + n_image :], q0[:, :, n_cap + n_image :])
    assert q.shape[2] > n_cap + n_image or model.pad_tokens_multiple is None  # there are image pad tokens
    assert not torch.equal(q[:, :, n_cap : n_cap + n_image], q0[:, :, n_cap : n_cap + n_image])


def test_batched_rows_equal_separate_calls():
    model, inputs = build(seed=5), _inputs((7, 9))
    chosen = resolve_layers("l0,l2", available_layers(model))
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))
    picked = _seg(model, doubled, chosen, 3.0, rows=[1])
    assert_network_close(picked[0], together[0])
    assert_network_close(picked[2:], together[:2])
    assert_network_close(picked[1], together[3])


def test_the_patch_is_read_from_x_embedder_when_the_model_has_no_patch_size():
    model, inputs = build(seed=6), _inputs((7, 10))
    del model.patch_size
    chosen = resolve_layers("all", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, 2.0), _slow(model, inputs, chosen, 2.0))


def test_a_grid_the_position_ids_contradict_is_never_blurred():
    """A ``patch_size`` of 1 on a model that patchifies by 2: the model's ids put 5x7 tokens where the
    9x13 grid would be; every chosen layer is skipped with a warning and the output is untouched."""
    model, inputs, skips = build(seed=7, patch_attr=1), _inputs((9, 13)), []
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [s[0] for s in skips] == list(chosen)
    assert all("position ids" in s[3] and "9x13" in s[3] for s in skips)


def test_a_query_count_that_holds_no_grid_is_skipped():
    """Without position ids to check (no ``rope_embedder`` module), the image slice must still fit."""
    model, inputs, skips = build(seed=7, patch_attr=1), _inputs((9, 13)), []
    rotations = model.rope_embedder
    del model.rope_embedder
    model.rope_embedder = lambda ids: rotations(ids)  # a plain function: no module hook sees the ids
    chosen = resolve_layers("l0,l2", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [(s[0], s[1], s[2]) for s in skips] == [(layer, 8 + 36, (9, 13)) for layer in chosen]


def test_an_attention_that_reaches_no_seam_is_reported_by_name():
    """A kernel that attends by itself (neither the module global nor ``wrap_attn``): no blur can reach
    its queries, so every chosen layer is reported when its attention returns, and nothing changes."""
    model, inputs, skips = build(seed=8, fused=True, kernel="private"), _inputs((6, 6)), []
    chosen = resolve_layers("l1-2", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert [s[0] for s in skips] == list(chosen) and all("never reached SEG" in s[3] for s in skips)


def test_the_override_chains_in_front_of_another_extensions_and_leaves_the_callers_options_alone():
    """Another extension's ``optimized_attention_override`` still runs, on SEG's blurred queries, and the
    caller's ``transformer_options`` dict is the same object with the same keys afterwards."""
    model, inputs = build(seed=10, fused=True, kernel="attribute"), _inputs((6, 7))
    chosen = resolve_layers("l1", available_layers(model))
    seen = []

    def other(func, *args, **kwargs):
        seen.append(args[0].shape)
        return func(*args, **kwargs)

    options = {OVERRIDE: other}
    with torch.no_grad(), blurred_dit_queries(model, chosen, 2.0):
        got = model(**inputs, transformer_options=options)
    assert options == {OVERRIDE: other} and len(seen) == 3 + 2 * 2  # every attention call reached it
    assert_network_close(got, _slow(model, inputs, chosen, 2.0))


def test_prefix_reuse_skips_the_seg_rows_of_the_layers_before_the_first_blurred_one():
    model, inputs = build(seed=9, layers=4), _inputs((6, 7))
    chosen = resolve_layers("l2", available_layers(model))
    seg = {k: with_seg_rows(v, 2) for k, v in inputs.items()}  # (cond, seg) rows, as Forge appends them
    seg["transformer_options"] = {"cond_or_uncond": [0, 0], "sigmas": torch.ones(4, dtype=torch.float64)}
    seen: dict[str, list[int]] = {"layers": [], "refiners": []}
    handles = [
        block.attention.qkv.register_forward_pre_hook(lambda _m, a, key=key: seen[key].append(a[0].shape[0]))
        for key, blocks in (("layers", model.layers[:3]), ("refiners", model.noise_refiner))
        for block in blocks
    ]
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4)):
        full = _call(model, seg)
        seen.update(layers=[], refiners=[])
        with shared_prefix(model, chosen, 4, 2, drop, expand):
            shared = _call(model, seg)
    for handle in handles:
        handle.remove()
    assert seen == {"layers": [2, 2, 4], "refiners": [2, 2]}  # refiners, l0, l1 on the main rows only; l2 all
    assert_network_close(shared, full)
    assert not torch.equal(full[2:], full[:2])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("spec", ["l0", "l1"])
def test_prefix_reuse_skips_both_refiner_streams_and_puts_the_rows_back_where_they_join(spec):
    """With ``l0`` chosen the prefix is the two refiner streams alone, and each must be whole again before
    the host joins them; with ``l1`` the slim streams are joined and widened after ``l0``."""
    model, inputs = build(seed=12), _inputs((5, 7))
    chosen = resolve_layers(spec, available_layers(model))
    seg = {k: with_seg_rows(v, 2) for k, v in inputs.items()}
    seg["transformer_options"] = {"cond_or_uncond": [0, 0], "sigmas": torch.ones(4, dtype=torch.float64)}
    rows: list[int] = []
    handles = [
        block.attention.qkv.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
        for block in (*model.context_refiner, *model.noise_refiner, *model.layers)
    ]
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4)):
        full = _call(model, seg)
        rows.clear()
        with shared_prefix(model, chosen, 4, 2, drop, expand):
            shared = _call(model, seg)
    for handle in handles:
        handle.remove()
    skipped = 4 + (1 if spec == "l1" else 0)  # 2 + 2 refiners, and l0 when l1 is the first chosen
    assert rows == [2] * skipped + [4] * (3 - skipped + 4)
    assert_network_close(shared, full)


def _sized(layers: int, **kwargs) -> TinyNextDiT:
    return TinyNextDiT(hidden=8, heads=1, axes=(2, 2, 4), layers=layers, adaln_dim=4, **kwargs)


def test_family_detection_by_structure():
    zimage, lumina = _sized(2), _sized(2, z_image=False, pad_multiple=None)
    assert dit_family(zimage) == "zimage" and dit_family(lumina) == "lumina2"
    assert not LUMINA2.matches(TinyFlux()) and not LUMINA2.matches(TinyFlux2()) and not LUMINA2.matches(TinyMMDiT())
    for model, family in ((zimage, ZIMAGE), (lumina, LUMINA2)):  # exactly one registered family claims each
        assert [f for f in FAMILIES if f.matches(model)] == [family] and family_of(model) is family
    assert (
        dit_family(TinyFlux()) == "flux" and dit_family(TinyFlux2()) == "flux2" and dit_family(TinyMMDiT()) == "mmdit"
    )
    zimage.noise_refiner = None  # a module with ``layers`` but no refiners is no NextDiT
    assert dit_family(zimage) is None


@pytest.mark.parametrize(
    ("released", "kwargs", "middle"),
    [("z-image-turbo", {}, "l15"), ("neta-lumina", {"z_image": False, "pad_multiple": None}, "l13")],
)
def test_block_names_and_middle_on_the_released_depths(released, kwargs, middle):
    model = _sized(RELEASED[released], **kwargs)
    assert available_layers(model) == model_layers(layer=RELEASED[released])
    assert default_spec(model) == middle
    target = query_target(model)
    assert target.resolve("middle") == (DitLayer("layer", int(middle[1:])),)
    assert target.canonical("middle") == middle  # infotext names the resolved layer
    assert target.canonical("l3-5,l7") == "l3-5,l7"
    with pytest.raises(ValueError, match=f"it has l0-{RELEASED[released] - 1}"):
        target.resolve(f"l{RELEASED[released]}")
