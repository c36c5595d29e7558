"""lib_seg.dit.hooks on Flux.1 / Chroma and MMDiT (SD3, SD3.5): what the table does not run.

Their exactness against a float64 logit blur (Flux's QK-norm hook before RoPE, MMDiT's ``ln_q`` and SD3.5's
``attn2``, reForge's Kontext references), only the image queries changing, batched rows and the hooks an
interrupted block leaves are run by tests/dit/test_family_table.py (``flux``, ``mmdit``); here: a block called
outside a model call, the families' blocks and errors, and a q-norm that never runs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lib_seg.core.blocks import DitLayer, model_layers, resolve_layers
from lib_seg.dit.hooks import available_layers, blurred_dit_queries, dit_family
from tests.support.dit_cases import FLUX1_CASE, MMDIT_CASE, Setup, call

CASES = {"flux": (FLUX1_CASE, ""), "sd3_pad": (MMDIT_CASE, "sd3-pad"), "sd35_attn2": (MMDIT_CASE, "sd35-attn2")}


def _build(name: str) -> torch.nn.Module:
    case, variant = CASES.get(name, (MMDIT_CASE, "sd3-no-pad"))
    return case.build(**case.variants[variant])


def test_queries_that_fit_no_grid_are_left_alone_and_reported():
    """A block called outside a model call (no latent seen) cannot know its grid: skip and tell."""
    model, skipped = _build("sd3_no_pad"), []
    block = model.joint_blocks[1]
    context, tokens, c = (torch.randn(1, n, 32, dtype=torch.float64) for n in (5, 12, 1))
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
    case, variant = CASES[name]
    (model, inputs), skips = case.make(Setup((6, 6), variant)), []
    chosen = resolve_layers(spec, available_layers(model))
    plain = call(case, model, inputs)
    block = model.get_submodule(f"{'double_blocks' if name == 'flux' else 'joint_blocks'}.1")
    parent, attribute = block.get_submodule(norm.rsplit(".", 1)[0]), norm.rsplit(".", 1)[1]
    hooked = getattr(parent, attribute)
    with blurred_dit_queries(model, chosen, 2.0, on_skip=lambda *a: skips.append(a)):
        fused = copy.deepcopy(hooked)
        fused._forward_hooks.clear()  # the call now runs a module SEG never hooked
        setattr(parent, attribute, fused)
        got = call(case, model, inputs)
        setattr(parent, attribute, hooked)
    assert torch.equal(got, plain)
    assert [s[0] for s in skips] == list(chosen) and all("never ran" in s[3] for s in skips)
