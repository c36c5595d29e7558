"""lib_seg.dit.hooks on whole small DiTs (tests/support/dit_models.py), against a float64 logit blur.

The slow path never touches a query: the chosen blocks compute attention explicitly and blur the image
rows of their pre-softmax logits with the dense reference blur (tests/dit/test_attention_blocks.py).
The hooks blur the queries at the hosts' hook points (Flux's QK-norm before RoPE, MMDiT's ``ln_q``);
both must give the same model output to FLOAT64_NETWORK_REL (tests/support/tolerance.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, dit_family
from tests.support.dit_blocks import Hooks
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.slow_seg import blurred_logits
from tests.support.tolerance import assert_network_close

N_TXT = 5
LATENTS = [(6, 6), (7, 9), (5, 12)]  # square, odd sides, non-square
SIGMAS = [0.9, 3.0, math.inf]
MODELS = {
    "flux": lambda: TinyFlux(depth=2, single=3),
    "sd3_no_pad": lambda: TinyMMDiT(depth=3, pad=False),  # Forge 2.x MMDiTX, A1111
    "sd3_pad": lambda: TinyMMDiT(depth=3, pad=True),  # reForge
    "sd3_identity_ln": lambda: TinyMMDiT(depth=3, qk_norm=False),  # A1111's SD3 Medium
    "sd35_attn2": lambda: TinyMMDiT(depth=3, attn2_blocks=(0, 1)),  # SD3.5 Medium's dual attention
}
SPECS = {"flux": ["d1,s0", "all", "s2"], "sd3": ["j1", "all"]}


def _build(name: str) -> torch.nn.Module:
    return randomize(MODELS[name](), seed=3).double().eval()


def _inputs(latent: tuple[int, int], batch: int = 2, seed: int = 0, ref: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, N_TXT, 12), "y": draw(batch, 8)}
    inputs["t"] = torch.rand(batch, generator=generator, dtype=torch.float64)
    if ref:
        inputs["ref_latents"] = draw(batch, 4, 4, 6)
    return inputs


def _call(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    extra = {"ref_latents": inputs["ref_latents"]} if "ref_latents" in inputs else {}
    if dit_family(model) == "flux":
        return model(inputs["x"], inputs["t"], inputs["context"], inputs["y"], **extra)
    return model(inputs["x"], inputs["t"], y=inputs["y"], context=inputs["context"])


def _grid(model: torch.nn.Module, latent: tuple[int, int]) -> tuple[int, int]:
    return patch_grid(*latent, pad=dit_family(model) == "flux" or model.pad)


def _slow(model, inputs, chosen, sigma, rows=None) -> torch.Tensor:
    """The model with the chosen blocks' image logit rows blurred (no query is blurred)."""
    grid = _grid(model, tuple(inputs["x"].shape[-2:]))
    with torch.no_grad(), blurred_logits(model, chosen, sigma, N_TXT, grid, rows):
        return _call(model, inputs)


def _seg(model, inputs, chosen, sigma, rows=None, on_skip=None) -> torch.Tensor:
    with torch.no_grad(), blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return _call(model, inputs)


def _specs(name: str) -> list[str]:
    return SPECS["flux" if name == "flux" else "sd3"]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("latent", LATENTS, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_hooked_queries_equal_blurred_logit_rows(name, latent, sigma):
    model, inputs = _build(name), _inputs(latent)
    plain = _call(model, inputs)
    for spec in _specs(name):
        chosen = resolve_layers(spec, available_layers(model))
        expected = _slow(model, inputs, chosen, sigma)
        got = _seg(model, inputs, chosen, sigma)
        assert_network_close(got, expected)
        assert not torch.equal(got, plain), f"{spec}: the blur changed nothing"


@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_kontext_reference_tokens_are_left_alone(sigma):
    """reForge's Flux Kontext: reference tokens follow the image in both streams; only the image is blurred."""
    model, inputs = _build("flux"), _inputs((7, 6), ref=True)
    chosen = resolve_layers("all", available_layers(model))
    assert_network_close(_seg(model, inputs, chosen, sigma), _slow(model, inputs, chosen, sigma))


@pytest.mark.parametrize("name", ["flux", "sd35_attn2"])
def test_batched_rows_equal_separate_calls(name):
    """Blurring only the SEG rows of a batched call gives what the two separate calls give."""
    model, inputs = _build(name), _inputs((7, 9), batch=2)
    chosen = resolve_layers("all", available_layers(model))
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
    together = _seg(model, doubled, chosen, 3.0, rows=slice(2, 4))
    with torch.no_grad():
        plain = _call(model, inputs)
    seg = _seg(model, inputs, chosen, 3.0)
    assert_network_close(together[:2], plain)  # batch size changes only the rounding
    assert_network_close(together[2:], seg)


@pytest.mark.parametrize("name", ["flux", "sd3_no_pad", "sd35_attn2"])
def test_only_image_queries_change_and_keys_values_stay(name):
    """Entering attention, the text queries and every key and value are bit-identical to the plain call."""
    model, inputs = _build(name), _inputs((5, 6))
    layer = available_layers(model)[1]
    block = getattr(model, f"{layer.kind}_blocks")[layer.index]
    block.hooks = Hooks(seen={})

    def seen_by_attention() -> dict:
        _call(model, inputs)
        return dict(block.hooks.seen)

    with torch.no_grad():
        plain = seen_by_attention()
        with blurred_dit_queries(model, [layer], 2.0):
            seg = seen_by_attention()
    assert torch.equal(plain["k"], seg["k"]) and torch.equal(plain["v"], seg["v"])
    n_image = 3 * 3 if name == "flux" else 2 * 3
    image = slice(N_TXT, N_TXT + n_image)
    assert torch.equal(plain["q"][:, :, :N_TXT], seg["q"][:, :, :N_TXT])
    assert torch.equal(plain["q"][:, :, image.stop :], seg["q"][:, :, image.stop :])
    assert not torch.equal(plain["q"][:, :, image], seg["q"][:, :, image])


@pytest.mark.parametrize("name", ["flux", "sd35_attn2"])
def test_hooks_are_removed_even_when_the_call_fails(name):
    model = _build(name)
    modules = list(model.modules())
    with pytest.raises(RuntimeError, match="boom"), blurred_dit_queries(model, available_layers(model), 2.0):
        assert any(m._forward_hooks or m._forward_pre_hooks for m in modules)
        raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def test_queries_that_fit_no_grid_are_left_alone_and_reported():
    """A block called outside a model call (no latent seen) cannot know its grid: skip and tell."""
    model, skipped = _build("sd3_no_pad"), []
    block = model.joint_blocks[1]
    context, tokens, c = (torch.randn(1, n, 32, dtype=torch.float64) for n in (N_TXT, 12, 1))
    with torch.no_grad():
        plain = block(context, tokens, c=c[:, 0])
        with blurred_dit_queries(model, [DitLayer("joint", 1)], 2.0, on_skip=lambda *a: skipped.append(a)):
            hooked = block(context, tokens, c=c[:, 0])
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))
    assert skipped == [(DitLayer("joint", 1), 12, None)]


def test_families_and_their_blocks():
    assert dit_family(_build("flux")) == "flux" and dit_family(_build("sd3_pad")) == "mmdit"
    assert dit_family(torch.nn.Linear(2, 2)) is None and dit_family(object()) is None
    assert available_layers(_build("flux")) == model_layers(double=2, single=3)
    assert available_layers(_build("sd35_attn2")) == model_layers(joint=3)
    with (
        pytest.raises(ValueError, match="no joint block 7"),
        blurred_dit_queries(_build("sd3_pad"), [DitLayer("joint", 7)], 2.0),
    ):
        pass
    with (
        pytest.raises(ValueError, match="not a diffusion transformer SEG knows"),
        blurred_dit_queries(torch.nn.Linear(2, 2), [], 2.0),
    ):
        pass


@pytest.mark.parametrize(
    ("name", "spec", "norm"), [("flux", "d1", "img_attn.norm"), ("sd3_pad", "j1", "x_block.attn.ln_q")]
)
def test_a_chosen_block_whose_q_norm_never_runs_is_reported_not_silently_skipped(name, spec, norm):
    """A fused kernel that normalises q without calling the hooked q-norm module (what Neo 2.27 did to
    Anima, Z-Image and Lumina 2): the block is reported after the call, and the output is the plain one."""
    model, inputs, skips = _build(name), _inputs((6, 6)), []
    chosen = resolve_layers(spec, available_layers(model))
    plain = _call(model, inputs)
    block = model.get_submodule(f"{'double_blocks' if name == 'flux' else 'joint_blocks'}.1")
    parent, attribute = block.get_submodule(norm.rsplit(".", 1)[0]), norm.rsplit(".", 1)[1]
    hooked = getattr(parent, attribute)
    with blurred_dit_queries(model, chosen, 2.0, on_skip=lambda *a: skips.append(a)):
        fused = copy.deepcopy(hooked)
        fused._forward_hooks.clear()  # the call now runs a module SEG never hooked
        setattr(parent, attribute, fused)
        got = _call(model, inputs)
        setattr(parent, attribute, hooked)
    assert torch.equal(got, plain)
    assert [s[0] for s in skips] == list(chosen) and all("never ran" in s[3] for s in skips)
