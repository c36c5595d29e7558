"""The ``--host neo229`` cases of tools/dit_backend_smoke.py: the DiT classes of the Forge Neo 2.29 hybrid tree, tiny.

Not a script: a module that ``tools/dit_backend_smoke.py`` (and ``dit_adapter_smoke.py``) import for
``--host neo229``.  The tree is ``/work/hosts/neo229`` (NEO229_DIR): Neo 2.26 (exo101/sd-webui-forge-neo-v3
de2193d, ``webui/``) with these files taken verbatim from newer forks (its ``PROVENANCE.md``):

* youlijie/sd-webui-forge-classic (Neo 2.29.1) b3b8a1e5: ``backend/nn/anima.py``, ``backend/nn/qwen21.py``,
  ``backend/attention.py`` (``wrap_attn``: ``transformer_options["optimized_attention_override"]``),
  ``backend/args.py``; fdb9c164: ``backend/nn/lumina.py``, ``backend/quant_ops.py``;
* xxxqwerty337/sd-webui-forge-classic-1337 (>= 2.27) ba50f188: ``backend/nn/krea.py``, ``qwen.py``, ``wan.py``;
  8343ece9: ``backend/nn/flux.py``;
* 2.29's GQA SDPA, ``linear_input_act`` and ``ck_enabled`` merged by hand into 2.26's ``operations.py``,
  ``operations_mixed_precision.py``, ``memory_management.py``; comfy-kitchen 0.2.40 from ``/work/hosts/
  neo229-pylib`` (NEO229_PYLIB), first on the path.  ``sampling_function.py``, ``k_model.py`` and the
  patcher are still 2.26's.

Run with Neo 2.26's venv (the tool puts the pylib, the tree and ``modules_forge/packages`` on ``sys.path`` and
``--cpu --use-pytorch-cross-attention`` in argv, as ``/work/hosts/neo229/TINY_MODELS.md`` says):
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/forge-neo/venv/bin/python -m tools.dit_backend_smoke --host neo229

Every model is built as 2.29's ``backend/loader.py`` builds it, under ``using_forge_operations`` (Lumina,
Z-Image, Anima and Qwen-Image 2.1 cast their q/k-norm weights with ``weights_manual_cast``, which needs Forge's
``RMSNorm``), float32 (comfy-kitchen's fused kernels have no float64), random weights, 2-3 blocks.  Per family,
what changed on 2.27+ and what the reference (the tool's explicit attention, image rows of the logits blurred
in float64) is told:

* Z-Image, Lumina 2 (``lumina.py``): q-norm and RoPE fused (``ck.rms_rope``; Lumina 2's grouped k/v heads,
  4 over 2 here, take ``ck.rms_rope1`` for q and k apart, then k/v are repeated); ``[caption | pad | image |
  pad]`` as on 2.26.
* Anima (``anima.py``): ``ck.rms_rope_split_half`` in the self-attention, no q-norm module call; one frame,
  two frames, and one reference frame (``dynamic_args.ref_latents``, appended after the image frames).
* Krea 2 (``krea.py``, upstream with edit references): context ``(B, L, txtlayers, txtdim)``; references are
  resized to the target and put BEFORE the image, ``[txt | ref 1..N | image]`` (ids ``(i + 1, r, c)``, the
  image ``(0, r, c)``); 0, 1 and 2 references from ``dynamic_args.ref_latents``.
* Qwen-Image 2.1 (``qwen21.py``, new): latent ``(B, 64, H, W)`` not patchified; ``[txt | ref | txt | ... |
  image]`` attended segment by segment (``block_causal_attention``): each text segment with a causal bool
  mask, each image with none, q the segment's tokens, k everything up to its end.  Only the last call of a
  block (q the ``H * W`` target tokens, k the whole sequence) holds image queries; the reference blurs that
  call's logit rows and passes the others to the host.  0 references; 1 the size of the target
  (``image_slots=[2]``: it sits after text token 2); 2 (``image_slots=[1]``: the second one after the text).
* Flux.1 (Kontext), Chroma, Flux.2-Klein (``flux.py``: ``ck.apply_rope1``), Wan (``wan.py``), Qwen-Image
  (``qwen.py``: Edit references from ``dynamic_args.ref_latents`` only): the 2.26 cases, on the newer files.

Ernie-Image and PixelDiT/PiD are 2.26's files in this tree (``--host neo`` covers them).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from tools._neo_cases import GRID, LATENT, Draw, build, flux_cases, neo_globals, specs, wan_cases
from tools.dit_backend_smoke import BATCH, FLOAT32_REL, N_TXT, Case

N_GRID = GRID[0] * GRID[1]  # patch-2 image tokens of the 9 x 13 latent (5 x 7)


@contextmanager
def forge_operations():
    """Modules built as 2.29's loader builds them: Forge's ops, float32, on the CPU, no manual cast."""
    import torch
    from backend.operations import using_forge_operations

    with using_forge_operations(device=torch.device("cpu"), dtype=torch.float32, manual_cast_enabled=False):
        yield


def with_globals(**values) -> Callable:
    """A ``Case.context``: ``dynamic_args`` holding ``values`` during each call (references, image slots)."""
    return lambda: neo_globals(**values)


def nextdit_cases(draw: Draw) -> list[Case]:
    """Z-Image (width 256, 8 heads: ``ck.rms_rope``) and Lumina 2 (width 96, 4 heads over 2 k/v heads:
    ``ck.rms_rope1``), the sizes of the 2.26 cases."""
    from backend.nn.lumina import NextDiT

    common = dict(patch_size=2, in_channels=16, n_layers=3, multiple_of=16, qk_norm=True, cap_feat_dim=24)
    with forge_operations():
        zimage = NextDiT(
            dim=256, n_heads=8, n_kv_heads=8, axes_dims=[8, 12, 12], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
            z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32, **common,
        )  # fmt: skip
        lumina = NextDiT(dim=96, n_heads=4, n_kv_heads=2, axes_dims=[8, 8, 8], ffn_dim_multiplier=4.0, **common)
    layout = dict(blocks=(("layer", "layers"),), calls={"layer": ("joint",)}, rel=FLOAT32_REL)
    pad = lambda n: -n % 32  # noqa: E731  (Z-Image's pad tokens)
    attention = (("backend.nn.lumina", "attention_function"),)
    return [
        Case("Z-Image", build(zimage), draw.inputs(LATENT, (N_TXT, 24)), attention, specs("l"),
             n_ctx=N_TXT + pad(N_TXT), n_extra=pad(N_GRID), **layout),
        Case("Lumina 2", build(lumina), draw.inputs(LATENT, (N_TXT, 24)), attention, specs("l"), **layout),
    ]  # fmt: skip


def anima_cases(draw: Draw) -> list[Case]:
    """Anima at 3 blocks of width 64, 2 heads: one frame, two frames, one reference frame."""
    from backend.nn.anima import Anima

    with forge_operations():
        anima = build(Anima(
            in_channels=16, out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64,
            crossattn_emb_channels=24, adaln_lora_dim=16, num_blocks=3, num_heads=2, rope_h_extrapolation_ratio=4.0,
            rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
        ))  # fmt: skip
    layout = dict(n_ctx=0, blocks=(("block", "blocks"),), calls={"block": ("joint", "pass")}, rel=FLOAT32_REL)
    attention = (("backend.nn.anima", "attention_function"),)
    image, video = draw.inputs((1, *LATENT), (N_TXT, 24)), draw.inputs((2, *LATENT), (N_TXT, 24))
    reference = with_globals(ref_latents=[draw(1, 16, 1, *LATENT)])  # one row: the model doubles it
    return [
        Case("Anima", anima, image, attention, specs("b"), **layout),
        Case("Anima 2-frame", anima, video, attention, specs("b"), frames=2, **layout),
        Case("Anima+ref", anima, dict(image), attention, specs("b"), n_extra=N_GRID, context=reference, **layout),
    ]


def krea_cases(draw: Draw) -> list[Case]:
    """Krea 2 at 3 blocks of width 64, 4 heads of 16 over 2 k/v heads, 3 tapped text layers of 16; Neo's 5-D
    latent; references (4-D, one row, of other sizes: the model resizes them to the target) before the image."""
    from backend.nn.krea import SingleStreamDiT

    with forge_operations():
        krea = build(SingleStreamDiT(
            features=64, tdim=16, txtdim=16, heads=4, kvheads=2, multiplier=2, layers=3, patch=2, channels=16,
            theta=1000, txtlayers=3, txtheads=2, txtkvheads=2,
        ))  # fmt: skip
    layout = dict(blocks=(("single", "blocks"),), marker="attn", calls={"single": ("joint",)}, rel=FLOAT32_REL)
    attention = (("backend.nn.krea", "attention_function"),)
    inputs = draw.inputs((1, *LATENT), (N_TXT, 3, 16))
    one = with_globals(ref_latents=[draw(1, 16, 6, 8)])
    two = with_globals(ref_latents=[draw(1, 16, 6, 8), draw(1, 16, 12, 10)])
    return [
        Case("Krea 2", krea, inputs, attention, specs("s"), **layout),
        Case("Krea 2+ref", krea, dict(inputs), attention, specs("s"), n_ctx=N_TXT + N_GRID, context=one, **layout),
        Case("Krea 2+2 refs", krea, dict(inputs), attention, specs("s"), n_ctx=N_TXT + 2 * N_GRID, context=two,
             **layout),
    ]  # fmt: skip


def qwen21_cases(draw: Draw) -> list[Case]:
    """Qwen-Image 2.1 (32 blocks of 32 heads x 128, axes 16/56/56, text 4096) at 3 blocks of 2 heads x 32, axes
    8/12/12, text 24; the target's call is each block's last (``calls``: the text and reference segments pass)."""
    from backend.nn.qwen21 import QwenImage21Transformer2DModel

    with forge_operations():
        qwen21 = build(QwenImage21Transformer2DModel(
            in_channels=64, out_channels=64, num_layers=3, attention_head_dim=32, num_attention_heads=2,
            context_in_dim=24, mlp_ratio=3, axes_dims_rope=(8, 12, 12),
        ))  # fmt: skip
    layout = dict(patch=1, blocks=(("single", "transformer_blocks"),), rel=FLOAT32_REL)
    attention = (("backend.nn.qwen21", "attention_function"),)
    inputs = draw.inputs(LATENT, (N_TXT, 24), channels=64)
    same = with_globals(ref_latents=[draw(1, 64, *LATENT)], image_slots=[2])  # text[:2] | ref | text[2:] | image
    two = with_globals(ref_latents=[draw(1, 64, 5, 7), draw(1, 64, 6, 4)], image_slots=[1])  # text[:1] | ref |
    # text[1:] | ref | image: the second reference's slot defaults to the text's end

    def calls(n_pass: int) -> dict:
        return {"single": ("pass",) * n_pass + ("image",)}

    return [
        Case("Qwen-Image 2.1", qwen21, inputs, attention, specs("s"), calls=calls(1), **layout),
        Case("Qwen-Image 2.1+ref", qwen21, dict(inputs), attention, specs("s"), calls=calls(3), context=same,
             **layout),
        Case("Qwen-Image 2.1+2 refs", qwen21, dict(inputs), attention, specs("s"), calls=calls(4), context=two,
             **layout),
    ]  # fmt: skip


def qwen_cases(draw: Draw) -> list[Case]:
    """Qwen-Image as in the 2.26 cases; the Edit reference through ``dynamic_args.ref_latents`` (the newer
    ``qwen.py`` reads no ``ref_latents`` argument), one per batch row."""
    from backend.nn.qwen import QwenImageTransformer2DModel

    with forge_operations():
        qwen = build(QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=24, axes_dims_rope=(8, 12, 12),
        ))  # fmt: skip
    layout = dict(blocks=(("joint", "transformer_blocks"),), calls={"joint": ("joint",)}, rel=FLOAT32_REL)
    attention = (("backend.nn.qwen", "attention_function"),)
    inputs = draw.inputs((1, *LATENT), (N_TXT, 24))
    edit = with_globals(ref_latents=[draw(BATCH, 16, 1, 5, 7)])
    return [
        Case("Qwen-Image", qwen, inputs, attention, specs("j"), **layout),
        Case("Qwen-Image-Edit", qwen, dict(inputs), attention, specs("j"), n_extra=3 * 4, context=edit, **layout),
    ]


def neo229_cases() -> list[Case]:
    draw = Draw()
    with forge_operations():
        cases = flux_cases()
    for family in (nextdit_cases, anima_cases, krea_cases, qwen21_cases, qwen_cases):
        cases += family(draw)
    with forge_operations():
        cases += wan_cases(draw)
    return cases
