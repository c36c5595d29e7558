"""The A1111 adapter on SD3: v1.10.1's CFGDenoiser imitation with an SD3Inferencer stand-in
(tests/support/a1111_host.py) over an MMDiT-layout model (tests/support/dit_models.py).

A1111's SD3 MMDiT has no q-norm (``ln_q`` is ``nn.Identity``, whose forward hooks still fire) and no
padding (sizes are multiples of 16 px).  The reference is independent of lib_seg.dit: the plain cond
prediction and one with the chosen blocks' image logit rows blurred (slow_seg.blurred_logits).
"""

from __future__ import annotations

import math

import pytest
import torch

from lib_seg.a1111 import adapter as a1111
from lib_seg.core.blocks import resolve_layers
from lib_seg.core.params import SegParams
from lib_seg.dit.hooks import available_layers
from tests.support.a1111_host import CFGDenoiser, DictWithShape, FakeSD3Model
from tests.support.dit_models import TinyMMDiT, randomize
from tests.support.slow_seg import blurred_logits
from tests.support.tolerance import assert_network_close

F64 = torch.float64
N_TXT, LATENT = 5, (8, 12)  # a non-square latent: a 4x6 patch grid


@pytest.fixture(scope="module")
def sd3():
    return FakeSD3Model(randomize(TinyMMDiT(depth=3, qk_norm=False), seed=5).to(F64).eval())


def make_inputs(images=2, and_weights=None, uncond_tokens=N_TXT, seed=0):
    g = torch.Generator().manual_seed(seed)
    conds_list = and_weights or [[(i, 1.0)] for i in range(images)]
    n_cond = sum(len(c) for c in conds_list)

    def text(rows, tokens):
        return DictWithShape(
            {
                "crossattn": torch.randn(rows, tokens, 12, generator=g, dtype=F64),
                "vector": torch.randn(rows, 8, generator=g, dtype=F64),
            }
        )

    return dict(
        x=torch.randn(images, 4, *LATENT, generator=g, dtype=F64),
        sigma=torch.full((images,), 0.6, dtype=F64),
        uncond=text(images, uncond_tokens),
        cond=(conds_list, text(n_cond, N_TXT)),
        cond_scale=5.0,
        image_cond=torch.zeros(images, 5, 1, 1, dtype=F64),
    )


def run(sd_model, inputs, run_=None, skip_uncond=False):
    denoiser = CFGDenoiser(sd_model, callbacks=[a1111.on_cfg_denoiser])
    calls = []
    inner = denoiser.inner_model.forward
    denoiser.inner_model.forward = lambda x, sigma, cond: (calls.append(x.shape[0]), inner(x, sigma, cond))[1]
    if run_ is not None:
        a1111.attach(denoiser, run_)
    with torch.no_grad():
        return denoiser(**inputs, skip_uncond=skip_uncond), calls


def expected(sd_model, inputs, baseline, spec, sigma, scale):
    """baseline + s * sum_w w (cond - cond_seg), per image, computed plainly."""
    conds_list, text_cond = inputs["cond"]
    repeats = [len(c) for c in conds_list]
    x = torch.cat([inputs["x"][i : i + 1].expand(n, -1, -1, -1) for i, n in enumerate(repeats)])
    sigma_t = torch.cat([inputs["sigma"][i : i + 1].expand(n) for i, n in enumerate(repeats)])
    denoiser = sd_model.create_denoiser()
    mmdit = sd_model.model.diffusion_model
    chosen = resolve_layers(spec, available_layers(mmdit))
    grid = (LATENT[0] // 2, LATENT[1] // 2)
    with torch.no_grad():
        plain = denoiser(x, sigma_t, text_cond)
        with blurred_logits(mmdit, chosen, sigma, N_TXT, grid):
            seg = denoiser(x, sigma_t, text_cond)
    out = baseline.clone()
    for i, conds in enumerate(conds_list):
        for row, weight in conds:
            out[i] += scale * weight * (plain[row] - seg[row])
    return out


@pytest.mark.parametrize("skip_uncond", [False, True], ids=["cfg", "uncond-skipped"])
@pytest.mark.parametrize("batch_rows", [False, True], ids=["separate", "batched"])
@pytest.mark.parametrize("sigma", [1.5, math.inf])
def test_sd3_guided_prediction_against_blurred_logits(sd3, sigma, batch_rows, skip_uncond):
    inputs = make_inputs(and_weights=[[(0, 0.7), (1, 0.3)], [(2, 1.0)]])
    baseline, _ = run(sd3, inputs, skip_uncond=skip_uncond)
    params = SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers="j1-2")
    out, calls = run(sd3, inputs, a1111.SegRun(params, batch_rows=batch_rows), skip_uncond=skip_uncond)
    assert_network_close(out, expected(sd3, inputs, baseline, "j1-2", sigma, 3.0))
    main = 3 if skip_uncond else 3 + 2  # the host's call: cond rows (+ uncond rows)
    assert calls == ([main + 3] if batch_rows else [main, 3])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in sd3.model.diffusion_model.modules())


def test_sd3_is_supported_and_names_its_blocks(sd3):
    assert a1111.unsupported_reason(sd3) is None
    assert a1111.layer_text(sd3, "middle") == "j1"  # no j7-9 on 3 blocks: the middle block
    assert a1111.layer_text(sd3, "j0-1, j2") == "j0-2"
    with pytest.raises(ValueError, match="'d3' names blocks this model does not have; it has j0-2"):
        a1111.layer_text(sd3, "d3")


def test_sd3_seg_off_is_bit_identical(sd3):
    inputs = make_inputs()
    baseline, _ = run(sd3, inputs)
    out, calls = run(sd3, inputs, a1111.SegRun(SegParams(enabled=False, layers="all"), batch_rows=True))
    assert torch.equal(out, baseline) and calls == [4]


def test_sd3_bad_layers_fail_inside_sampling(sd3):
    inputs = make_inputs()
    with pytest.raises(ValueError, match="'s0' names blocks this model does not have"):
        run(sd3, inputs, a1111.SegRun(SegParams(enabled=True, layers="s0"), batch_rows=True))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in sd3.model.diffusion_model.modules())
