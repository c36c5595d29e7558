"""The Forge adapter on Flux/Chroma and SD3 layouts (tests/support/dit_models.py), through the Forge 2.x and
reForge sampling imitation (tests/support/forge_host.py, ``DitModel`` as ``KModel`` calls a DiT).

The reference is independent of lib_seg.dit: the plain cond prediction and one with the chosen blocks'
image logit rows blurred (tests/support/slow_seg.py ``blurred_logits``), combined as
``denoised + s * (cond - cond_seg)``; float64, compared to FLOAT64_NETWORK_REL.
"""

from __future__ import annotations

import math

import pytest
import torch

from lib_seg.core.blocks import resolve_layers
from lib_seg.core.params import SegParams
from lib_seg.dit.hooks import available_layers
from lib_seg.forge import adapter as forge
from lib_seg.webui import infotext
from tests.support import forge_host as host
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.slow_seg import blurred_logits
from tests.support.tolerance import assert_network_close

F64 = torch.float64
N_TXT, SIGMA_T = 5, 0.7
# odd sides where the host pads them (Flux/Chroma, reForge's MMDiT); Forge 2.x's MMDiTX fails on odd
# sizes by itself (its output is cropped to even sides), so its layout gets a non-square even latent
LATENTS = {"flux": (7, 9), "sd3": (8, 10), "sd35": (7, 9)}
DIT_KINDS = ("forge", "neo", "reforge")  # classic Forge runs no DiT
MODELS = {
    "flux": lambda: TinyFlux(depth=2, single=3),
    "sd3": lambda: TinyMMDiT(depth=3, pad=False),
    "sd35": lambda: TinyMMDiT(depth=3, pad=True, attn2_blocks=(0, 1)),
}


@pytest.fixture(scope="module")
def models():
    return {name: randomize(build(), seed=4).to(F64).eval() for name, build in MODELS.items()}


def make_inputs(name: str, images: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def entry():
        conds = {"c_crossattn": torch.randn(images, N_TXT, 12, generator=g, dtype=F64)}
        conds["y"] = torch.randn(images, 8, generator=g, dtype=F64)
        if name == "flux":
            conds["guidance"] = torch.full((images,), 3.5, dtype=F64)
        return {"model_conds": conds, "strength": 1.0}

    return torch.randn(images, 4, *LATENTS[name], generator=g, dtype=F64), [entry()], [entry()]


def sample(p, inputs, cond_scale):
    x, cond, uncond = inputs
    (out,) = p.sampler.sample(x, torch.tensor([SIGMA_T, 0.0], dtype=F64), cond, uncond, cond_scale)
    return out


def grid_of(name: str) -> tuple[int, int]:
    pad = name != "sd3"
    return tuple((side + 1) // 2 if pad else side // 2 for side in LATENTS[name])


def expected(name, model, inputs, baseline, spec, sigma, scale):
    """baseline + s (cond - cond_seg), the SEG cond from blurred logits (no lib_seg.dit code)."""
    x, cond, _ = inputs
    dit, t = host.DitModel(model), torch.full((x.shape[0],), SIGMA_T, dtype=F64)
    plain = dit.apply_model(x, t, **cond[0]["model_conds"])
    chosen = resolve_layers(spec, available_layers(model))
    with blurred_logits(model, chosen, sigma, N_TXT, grid_of(name)):
        seg = dit.apply_model(x, t, **cond[0]["model_conds"])
    return baseline + scale * (plain - seg)


def hooks_left(model) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("batch_rows", [True, False], ids=["batched", "separate"])
@pytest.mark.parametrize("cond_scale", [1.0, 4.0], ids=["cfg1", "cfg4"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", DIT_KINDS)
def test_guided_prediction_against_blurred_logits(monkeypatch, models, kind, name, cond_scale, batch_rows):
    host.install(monkeypatch, kind)
    model, inputs = models[name], make_inputs(name)
    spec, sigma = ("d1,s0-1", 2.0) if name == "flux" else ("j0-1", math.inf)
    baseline = sample(host.make_processing(kind, model), inputs, cond_scale)
    p = host.make_processing(kind, model)
    params = SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers=spec)
    assert forge.patch_unet(p, params, batch_rows=batch_rows) == spec
    first_block = (model.double_blocks if name == "flux" else model.joint_blocks)[0]
    first_rows = []
    # rows of the block's own result (its output hook runs before the prefix's re-widening hook)
    handle = first_block.register_forward_hook(lambda _b, _a, out: first_rows.append(out[0].shape[0]))
    try:
        out = sample(p, inputs, cond_scale)
    finally:
        handle.remove()
    assert_network_close(out, expected(name, model, inputs, baseline, spec, sigma, 3.0))
    images, main_rows = 2, 2 if cond_scale == 1.0 else 4  # CFG 1: the hosts skip the uncond pass
    calls = p.sd_model.forge_objects.unet.model.rows
    assert calls == ([main_rows + images] if batch_rows else [main_rows, images])
    if batch_rows and name == "flux":  # d0 precedes the first blurred block: the SEG rows skip it
        assert first_rows == [main_rows]
    assert not hooks_left(model)


@pytest.mark.parametrize("name,default", [("flux", "d1,s1"), ("sd3", "j1")])
def test_default_layers_and_infotext_on_small_models(monkeypatch, models, name, default):
    """'middle' means the DiT's default blocks (here the middle block of each stream: no d7-9 on 2 blocks)."""
    host.install(monkeypatch, "forge")
    p = host.make_processing("forge", models[name])
    params = SegParams(enabled=True)
    text = forge.patch_unet(p, params)
    assert text == default
    assert infotext.to_infotext(params, text)[infotext.KEYS["layers"]] == default


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_seg_off_is_bit_identical_and_leaves_nothing(monkeypatch, models, kind):
    host.install(monkeypatch, kind)
    model, inputs = models["flux"], make_inputs("flux")
    baseline = sample(host.make_processing(kind, model), inputs, 1.0)
    for params in (SegParams(enabled=False, layers="all"), SegParams(enabled=True, scale=0.0)):
        p = host.make_processing(kind, model)
        assert forge.patch_unet(p, params) is None
        assert not forge.has_seg(p.sd_model.forge_objects.unet)
        assert torch.equal(sample(p, inputs, 1.0), baseline)
    assert not hooks_left(model)


@pytest.mark.parametrize(
    "name,spec,message",
    [
        ("flux", "j3", r"'j3' names blocks this model does not have; it has d0-1,s0-2"),
        ("sd3", "d0", r"'d0' names blocks this model does not have; it has j0-2"),
        ("flux", "u3", r"cannot read 'u3'; use presets double, single, joint, layer, block, all"),
        ("sd3", "input", r"cannot read 'input'"),
    ],
)
def test_layers_the_model_lacks_fail_sampling_with_its_blocks(monkeypatch, models, name, spec, message):
    host.install(monkeypatch, "forge")
    model, inputs = models[name], make_inputs(name)
    p = host.make_processing("forge", model)
    assert forge.patch_unet(p, SegParams(enabled=True, layers=spec)) is None
    with pytest.raises(ValueError, match=message):
        sample(p, inputs, 4.0)
    assert not hooks_left(model)


def test_batched_falls_back_to_the_separate_call_when_memory_is_short(monkeypatch, models):
    host.install(monkeypatch, "forge")
    monkeypatch.setattr(host.get_free_memory, "free", 4.5 * 2**20)  # 4 rows fit, 6 do not
    model, inputs = models["flux"], make_inputs("flux")
    baseline = sample(host.make_processing("forge", model), inputs, 4.0)
    p = host.make_processing("forge", model)
    forge.patch_unet(p, SegParams(enabled=True, scale=3.0, blur_sigma=2.0, layers="d1,s0-1"))
    out = sample(p, inputs, 4.0)
    assert p.sd_model.forge_objects.unet.model.rows == [4, 2]
    assert_network_close(out, expected("flux", model, inputs, baseline, "d1,s0-1", 2.0, 3.0))
