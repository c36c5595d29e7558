"""SEG on Flux.2 (Klein): grid, RoPE and token layout read from the model, against a float64 logit blur.

The model is tests/support/dit_flux2.py (Neo 2.26's Flux.2 structure: patch 1, 4 RoPE axes, shared
modulation, reference images after the image).  The slow path never touches a query: the chosen blocks
compute attention explicitly and blur the image rows of their pre-softmax logits on the true grid
(tests/support/slow_seg.py).  The regression this file exists for: Flux.2 read as Flux.1 (patch 2) put
the first quarter of the image tokens on a wrong grid, silently.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.geometry import model_patch_size, patch_grid, positions_fit_grid
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, default_spec, dit_family
from lib_seg.dit.prefix import shared_prefix
from lib_seg.targets import query_target
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_models import TinyFlux, randomize
from tests.support.slow_seg import blurred_logits
from tests.support.tolerance import assert_network_close

N_TXT = 5
LATENTS = [(6, 6), (9, 13), (5, 12), (1, 7)]  # square, odd sides (Neo's 9x13 check), non-square, one row


def _build(**kwargs) -> TinyFlux2:
    return randomize(TinyFlux2(**kwargs), seed=5).double().eval()


def _inputs(latent, batch: int = 2, ref: bool = False, channels: int = 8, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = {"x": draw(batch, channels, *latent), "context": draw(batch, N_TXT, 12)}
    inputs["timestep"] = torch.rand(batch, generator=generator, dtype=torch.float64)
    if ref:
        inputs["ref_latents"] = draw(batch, channels, 3, 5)
    return inputs


def _call(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    grid = patch_grid(*inputs["x"].shape[-2:], model.patch, pad=True)
    with blurred_logits(model, chosen, sigma, N_TXT, grid, rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


@pytest.mark.parametrize("ref", [False, True], ids=["text-to-image", "with reference image"])
@pytest.mark.parametrize("sigma", [0.9, 3.0, math.inf])
@pytest.mark.parametrize("latent", LATENTS, ids=str)
def test_flux2_queries_equal_blurred_logit_rows_on_the_true_grid(latent, sigma, ref):
    model, inputs = _build(), _inputs(latent, ref=ref)
    plain = _call(model, inputs)
    for spec in ["d1,s0", "all", "s2"]:
        chosen = resolve_layers(spec, available_layers(model))
        got = _seg(model, inputs, chosen, sigma)
        assert_network_close(got, _slow(model, inputs, chosen, sigma))
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


@pytest.mark.parametrize("patch", [1, 2])
def test_the_patch_is_read_from_img_in_when_the_model_has_no_patch_size(patch):
    model, inputs = _build(patch=patch, expose_patch=False), _inputs((7, 10))
    assert not hasattr(model, "patch_size") and model_patch_size(model, 8) == patch
    chosen = resolve_layers("all", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, 2.0), _slow(model, inputs, chosen, 2.0))


def test_a_grid_the_position_ids_contradict_is_never_blurred():
    """A model claiming patch 2 while it patchifies by 1 (Flux.2 read as Flux.1): the token count fits a
    prefix of the image, but the model's own ids do not; the block is skipped with a warning."""
    model, inputs, skips = _build(patch_attr=2), _inputs((9, 13)), []
    chosen = resolve_layers("all", available_layers(model))
    got = _seg(model, inputs, chosen, 2.0, on_skip=lambda *a: skips.append(a))
    assert torch.equal(got, _call(model, inputs))
    assert {s[0] for s in skips} == set(chosen)
    assert all("position ids" in s[3] and "5x7" in s[3] for s in skips)


def test_position_ids_check():
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    ids = torch.stack([rows, cols], dim=-1).reshape(1, 12, 2).double() + 7  # offsets allowed
    assert positions_fit_grid(ids, (3, 4))
    assert not positions_fit_grid(ids, (4, 3)) and not positions_fit_grid(ids[:, :6], (2, 3))
    assert not positions_fit_grid(ids, (2, 6)) and not positions_fit_grid(ids[..., :1], (3, 4))


def test_batched_rows_equal_separate_calls():
    model, inputs = _build(), _inputs((7, 9), ref=True)
    chosen = resolve_layers("d1,s1", available_layers(model))
    doubled = {k: torch.cat([v, v]) for k, v in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    assert_network_close(together[:2], _call(model, inputs))
    assert_network_close(together[2:], _seg(model, inputs, chosen, 3.0))


def test_prefix_reuse_slims_the_shared_modulation():
    """Flux.2 passes its blocks tuples of ModulationOut dataclasses; the SEG rows still skip the prefix."""
    model, inputs = _build(), _inputs((6, 7), batch=2)
    chosen = resolve_layers("s1", available_layers(model))
    seg = {k: with_seg_rows(v, 2) for k, v in inputs.items()}  # (cond, seg) rows, as Forge appends them
    seen: list[int] = []
    handles = [
        b.img_attn.qkv.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0])) for b in model.double_blocks
    ]
    drop, expand = partial(without_seg_rows, n_cond=2), partial(with_seg_rows, n_cond=2)
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(2, 4)):
        full = _call(model, seg)
        seen.clear()
        with shared_prefix(model, chosen, 4, 2, drop, expand):
            shared = _call(model, seg)
    for handle in handles:
        handle.remove()
    assert seen == [2, 2]  # inside the prefix blocks, only the main rows are computed
    assert_network_close(shared, full)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_family_blocks_and_defaults():
    klein4b, klein9b = TinyFlux2(hidden=8, heads=1, depth=5, single=20, axes=(2, 2, 2, 2)), None
    klein9b = TinyFlux2(hidden=8, heads=1, depth=8, single=24, axes=(2, 2, 2, 2))
    assert dit_family(klein4b) == "flux2" and dit_family(TinyFlux()) == "flux"
    assert available_layers(klein4b) == model_layers(double=5, single=20)
    assert default_spec(klein4b) == "d2,s10" and default_spec(klein9b) == "d4,s12"
    target = query_target(klein4b)
    assert target.resolve("middle") == (DitLayer("double", 2), DitLayer("single", 10))
    assert target.canonical("middle") == "d2,s10"  # infotext names the resolved blocks
    flux1 = TinyFlux(hidden=8, heads=1, depth=19, single=38, axes=(2, 2, 4))
    assert query_target(flux1).canonical("middle") == "d7-9,s7-9"
    with pytest.raises(ValueError, match="it has d0-4,s0-19"):
        target.resolve("d7-9")
