"""The ``--host comfyui`` cases of tools/dit_backend_smoke.py: ComfyUI's own DiT classes, tiny.

Not a script: a module that ``tools/dit_backend_smoke.py`` imports for ``--host comfyui`` (it needs a ComfyUI tree
and its venv; the tool's ``--host imitation``, run by tests/tools, checks the reference, comparison and report
these cases go through).  The tree is ``/work/hosts/comfyui/src`` (COMFYUI_DIR: hiddenswitch/pip-and-uv-installable-
ComfyUI 87606c5f, upstream master merged 2026-02-03, package ``comfy``), run with its venv:
    HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 /work/hosts/comfyui/venv/bin/python -m tools.dit_backend_smoke \\
        --host comfyui

Every model is the class ``comfy/model_base.py`` builds (``BaseModel.__init__``: ``unet_model(**unet_config,
device=..., operations=...)``, lines 150-160) with the config keys ``comfy/model_detection.py`` derives, shrunk to
2-3 blocks and small widths, ``comfy.ops.disable_weight_init`` operations (what ``pick_operations`` gives float
weights without a cast), random weights (torch norms' weights around 1), and called as ``BaseModel._apply_model``
calls it (line 228): ``diffusion_model(x, t, context=..., control=None, transformer_options={}, **extra_conds)``.
SD3 runs in float64; every other family in float32: ComfyUI's RoPE is comfy-kitchen's ``apply_rope`` /
``apply_rope1`` (``comfy/ldm/flux/math.py:35-39``), which has no float64 kernel, and Cosmos' rotation casts to
float32 (``cosmos/predict2.py:20-27``).  Per family, the attention seam the reference swaps (the module global of
the file whose code calls it at call time) and what the reference blurs:

* Flux.1 (Kontext), Chroma, Flux.2-Klein (``comfy/ldm/flux/model.py``, ``chroma/model.py``): the blocks call
  ``flux.math.attention``, which calls ``comfy.ldm.flux.math.optimized_attention`` (math.py:16) after RoPE; joint
  ``[txt | image | references]``.  Kontext's references (``ref_latents``, method ``offset``) and Klein's (``index``).
* SD3 / SD3.5 (``modules/diffusionmodules/mmdit.py``): ``mmdit.optimized_attention`` (joint, line 319; SD3.5's
  ``attn2`` blocks attend to the image alone); float64.
* Z-Image, Lumina 2 (``lumina/model.py`` ``NextDiT``): ``lumina.model.optimized_attention_masked`` (line 169);
  ``[caption (+ pad to 32) | image (+ pad)]``, the refiners attend outside the blocks.  Z-Image Omni: one reference
  latent (``ref_latents``): ``[reference caption pad | caption | reference image | image]``, the image still last.
* Qwen-Image (``qwen_image/model.py``): ``qwen_image.model.optimized_attention_masked`` (line 182); ``[txt |
  image | Edit references]``; the latent 5-D ``(B, 16, T, H, W)``: one frame, and two (Qwen-Image-Layered's
  frames, each blurred over its own grid).
* Wan 2.1 / 2.2 (``wan/model.py`` ``WanModel``): ``wan.model.optimized_attention`` (self-attention line 87,
  cross-attention 119, i2v's image cross-attention 159); each frame of the video blurred over its own grid, the
  cross-attentions pass.  One frame, three frames, ``time_dim_concat`` frames after the video, 2.1 i2v (CLIP
  features, concatenated image channels), and a reference frame BEFORE the video (``ref_conv``,
  ``reference_latent``, lines 596-597, 691-692; an even latent: ``ref_conv`` does not pad).
* Anima (``anima/model.py`` ``Anima(MiniTrainDIT)``): ``cosmos.predict2.optimized_attention`` (line 77); the
  self-attention's frames blurred, the cross-attention passes; one frame, three frames.  Its ``llm_adapter`` runs
  in ``model_base.Anima.extra_conds``, never in the model call, so it is built tiny (a 1-layer ``LLMAdapter``).

Before the cases, the ComfyUI models SEG must leave alone are built tiny and checked to match no family:
HunyuanVideo, HunyuanImage 2.1 (the same class, 4-D, 2-entry patch), Hunyuan3D, Chroma Radiance and plain
Cosmos-Predict2 (``MiniTrainDIT`` without the LLM adapter).
"""

from __future__ import annotations

import weakref

from tools._neo_cases import GRID, LATENT, Draw, specs
from tools._neo_cases import build as build_random
from tools.dit_backend_smoke import (
    BATCH,
    FLOAT32_REL,
    FLUX_SPECS,
    MMDIT_SIZES,
    MMDIT_SPECS,
    N_TXT,
    SD3_CTX,
    Case,
    draw_inputs,
)

N_GRID = GRID[0] * GRID[1]  # patch-2 image tokens of the 9 x 13 latent (5 x 7)
T01, T1000 = (0.7, 0.4), (700.0, 400.0)


def ops():
    from comfy.ops import disable_weight_init

    return disable_weight_init


def tiny(model, dtype, seed: int = 0):
    """The tool's random weights in ``dtype``, the model's own buffers kept (RoPE tables; pad tokens are
    parameters and get random values), every torch norm's weight around 1 (:func:`tools._neo_cases.build`)."""
    return build_random(model, seed, dtype)


# model -> (the ``comfy.supported_models`` class that builds it, its unet_config): how tools/dit_adapter_smoke.py
# wraps the case's model in the ``model_base`` class ComfyUI would load it into
CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def build(cls, supported: str, dtype, **config):
    """``cls(**config)`` as ``BaseModel.__init__`` builds it (``operations``, ``dtype``), :func:`tiny`; its config
    kept in :data:`CONFIGS`."""
    model = tiny(cls(operations=ops(), dtype=dtype, **config), dtype)
    CONFIGS[model] = (supported, config)
    return model


def cast(inputs: dict, dtype) -> dict:
    import torch

    def to(value):
        if torch.is_tensor(value):
            return value.to(dtype) if value.is_floating_point() else value
        return [to(item) for item in value] if isinstance(value, list) else value

    return {key: to(value) for key, value in inputs.items()}


FLUX_SIZES = dict(context_in_dim=48, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2)


def flux_cases() -> list[Case]:
    """Flux.1 (``model_detection.py:217-225``: patch 2, axes 16/56/56, theta 10000, qkv bias) with Kontext references,
    Chroma (``chroma/model.py``, approximator 64 -> 64), Flux.2-Klein (``model_detection.py:200-214``: patch 1, 4 axes,
    theta 2000, shared modulation, SiLU MLP, no biases, text ids on axis 3, references by ``index`` x 10)."""
    import torch
    from comfy.ldm.chroma.model import Chroma
    from comfy.ldm.flux.model import Flux

    f32 = torch.float32
    flux = build(
        Flux, "Flux", f32, image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, mlp_ratio=4.0,
        axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
        **FLUX_SIZES,
    )  # fmt: skip
    klein = build(
        Flux, "Flux2", f32, image_model="flux2", in_channels=16, out_channels=16, vec_in_dim=None, mlp_ratio=3.0,
        axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False, txt_ids_dims=[3],
        global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
        **FLUX_SIZES,
    )  # fmt: skip
    chroma = build(
        Chroma, "Chroma", f32, image_model="chroma", in_channels=64, out_channels=64, mlp_ratio=4.0,
        axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=96,
        n_layers=2, txt_ids_dims=[], vec_in_dim=None, **FLUX_SIZES,
    )  # fmt: skip
    attention = (("comfy.ldm.flux.math", "optimized_attention"),)  # flux and chroma blocks call math.attention
    plain, kontext = cast(draw_inputs(LATENT), f32), cast(draw_inputs(LATENT, ref=(6, 8)), f32)
    chroma_inputs = cast(draw_inputs(LATENT, ("y",)), f32)  # Chroma's forward takes guidance (unused by it)
    klein_plain = cast(draw_inputs(LATENT, ("y", "guidance")), f32)
    klein_edit = cast(draw_inputs(LATENT, ("y", "guidance"), ref=(5, 7)), f32)
    klein_square = cast(draw_inputs((8, 8), ("y", "guidance")), f32)
    common = dict(rel=FLOAT32_REL)
    return [
        Case("Flux", flux, plain, attention, FLUX_SPECS, **common),
        Case("Flux+Kontext", flux, kontext, attention, FLUX_SPECS, n_extra=3 * 4, **common),
        Case("Chroma", chroma, chroma_inputs, attention, FLUX_SPECS, **common),
        Case("Flux.2-Klein", klein, klein_plain, attention, FLUX_SPECS, patch=1, **common),
        Case("Flux.2-Klein+ref", klein, klein_edit, attention, FLUX_SPECS, patch=1, n_extra=5 * 7, **common),
        Case("Flux.2-Klein 8x8", klein, klein_square, attention, FLUX_SPECS, patch=1, **common),
    ]


def mmdit_cases() -> list[Case]:
    """SD3 (``OpenAISignatureMMDITWrapper``) and SD3.5 with ``attn2`` in block 0, as the reForge cases, float64."""
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    f64 = torch.float64
    mmdit = build(OpenAISignatureMMDITWrapper, "SD3", f64, out_channels=16, **MMDIT_SIZES)
    sd35 = build(OpenAISignatureMMDITWrapper, "SD3", f64, out_channels=16, x_block_self_attn_layers=[0], **MMDIT_SIZES)
    attention = (("comfy.ldm.modules.diffusionmodules.mmdit", "optimized_attention"),)
    inputs = draw_inputs(LATENT, ("guidance",))
    return [
        Case("MMDiT", mmdit, inputs, attention, MMDIT_SPECS, n_ctx=SD3_CTX),
        Case("MMDiT+attn2", sd35, inputs, attention, MMDIT_SPECS, n_ctx=SD3_CTX),
    ]


def nextdit_cases(draw: Draw) -> list[Case]:
    """Z-Image (``model_detection.py:447-461``: ``z_image_modulation``, theta 256, 8/3 FFN, time scale 1000, pad tokens
    to 32) at width 256, 8 heads; Lumina 2 (width 96, 4 heads over 2 k/v heads, no pad tokens); Z-Image Omni with one
    reference latent (``ref_latents``; divisible by the patch: ``embed_all`` does not pad it)."""
    import torch
    from comfy.ldm.lumina.model import NextDiT

    f32 = torch.float32
    common = dict(patch_size=2, in_channels=16, n_layers=3, multiple_of=16, qk_norm=True, cap_feat_dim=24)
    zimage = build(
        NextDiT, "ZImage", f32, dim=256, n_heads=8, n_kv_heads=8, axes_dims=[8, 12, 12], rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32, **common,
    )  # fmt: skip
    lumina = build(
        NextDiT, "Lumina2", f32, dim=96, n_heads=4, n_kv_heads=2, axes_dims=[8, 8, 8], ffn_dim_multiplier=4.0, **common
    )
    layout = dict(blocks=(("layer", "layers"),), calls={"layer": ("joint",)}, rel=FLOAT32_REL)
    pad = lambda n: -n % 32  # noqa: E731  (Z-Image's pad tokens)
    attention = (("comfy.ldm.lumina.model", "optimized_attention_masked"),)
    inputs = draw.inputs(LATENT, (N_TXT, 24), num_tokens=N_TXT)
    omni = dict(inputs, ref_latents=[draw(1, 16, 6, 8)])  # [ref caption pad (32) | caption | ref (12 + 20) | image]
    omni_ctx = 32 + N_TXT + pad(N_TXT) + 32
    return [
        Case("Z-Image", zimage, inputs, attention, specs("l"), n_ctx=N_TXT + pad(N_TXT), n_extra=pad(N_GRID),
             **layout),
        Case("Z-Image Omni+ref", zimage, omni, attention, specs("l"), n_ctx=omni_ctx, n_extra=pad(N_GRID), **layout),
        Case("Lumina 2", lumina, dict(inputs), attention, specs("l"), **layout),
    ]  # fmt: skip


def qwen_cases(draw: Draw) -> list[Case]:
    """Qwen-Image at 3 blocks of 2 heads x 32, axes 8/12/12 (the Neo cases' sizes), ComfyUI's 5-D latent: one frame,
    with one Edit reference (``ref_latents``, method ``index``), and two frames (Qwen-Image-Layered)."""
    import torch
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    f32 = torch.float32
    qwen = build(
        QwenImageTransformer2DModel, "QwenImage", f32, patch_size=2, in_channels=64, out_channels=16, num_layers=3,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(8, 12, 12),
    )  # fmt: skip
    layout = dict(blocks=(("joint", "transformer_blocks"),), calls={"joint": ("joint",)}, rel=FLOAT32_REL)
    attention = (("comfy.ldm.qwen_image.model", "optimized_attention_masked"),)
    plain = draw.inputs((1, *LATENT), (N_TXT, 24))
    edit = dict(plain, ref_latents=[draw(BATCH, 16, 1, 5, 7)])
    layered = draw.inputs((2, *LATENT), (N_TXT, 24))
    return [
        Case("Qwen-Image", qwen, plain, attention, specs("j"), **layout),
        Case("Qwen-Image-Edit", qwen, edit, attention, specs("j"), n_extra=3 * 4, **layout),
        Case("Qwen-Image-Layered 2-frame", qwen, layered, attention, specs("j"), frames=2, **layout),
    ]


def wan_cases(draw: Draw) -> list[Case]:
    """Wan 2.1 / 2.2 at dim 64, 2 heads of 32, 3 blocks (the Neo cases' sizes): t2v (one frame, three frames,
    ``time_dim_concat``), 2.1 i2v (CLIP features; ComfyUI concatenates the image latent's 20 channels to ``x`` before
    the call, ``in_dim`` 36), and a reference frame before three video frames (``in_dim_ref_conv`` 16)."""
    import torch
    from comfy.ldm.wan.model import WanModel

    f32 = torch.float32
    sizes = dict(patch_size=(1, 2, 2), dim=64, ffn_dim=96, freq_dim=32, text_dim=24, out_dim=16, num_heads=2)
    sizes.update(num_layers=3)
    t2v = build(WanModel, "WAN21_T2V", f32, model_type="t2v", in_dim=16, **sizes)
    i2v = build(WanModel, "WAN21_I2V", f32, model_type="i2v", in_dim=36, **sizes)
    ref = build(WanModel, "WAN21_T2V", f32, model_type="t2v", in_dim=16, in_dim_ref_conv=16, **sizes)
    layout = dict(n_ctx=0, blocks=(("block", "blocks"),), calls={"block": ("joint", "pass")}, rel=FLOAT32_REL)
    i2v_layout = {**layout, "calls": {"block": ("joint", "pass", "pass")}}
    attention = (("comfy.ldm.wan.model", "optimized_attention"),)
    image, video = draw.inputs((1, *LATENT), (N_TXT, 24), T1000), draw.inputs((3, *LATENT), (N_TXT, 24), T1000)
    concat = draw.inputs((2, *LATENT), (N_TXT, 24), T1000, time_dim_concat=draw(BATCH, 16, 1, *LATENT))
    i2v_inputs = draw.inputs((3, *LATENT), (N_TXT, 24), T1000, channels=36, clip_fea=draw(BATCH, 4, 1280))
    even = (10, 14)
    ref_inputs = draw.inputs((3, *even), (N_TXT, 24), T1000, reference_latent=draw(BATCH, 16, *even))
    ref_frame = (even[0] // 2) * (even[1] // 2)
    return [
        Case("Wan", t2v, image, attention, specs("b"), **layout),
        Case("Wan 3-frame", t2v, video, attention, specs("b"), frames=3, **layout),
        Case("Wan+time_dim_concat", t2v, concat, attention, specs("b"), frames=2, n_extra=N_GRID, **layout),
        Case("Wan 2.1 i2v 3-frame", i2v, i2v_inputs, attention, specs("b"), frames=3, **i2v_layout),
        Case("Wan+reference 3-frame", ref, ref_inputs, attention, specs("b"), frames=3,
             **{**layout, "n_ctx": ref_frame}),
    ]  # fmt: skip


# model_detection.py:563-600 (Anima / Cosmos-Predict2 2B), widths shrunk
ANIMA_SIZES = dict(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16, patch_spatial=2)
ANIMA_SIZES.update(patch_temporal=1, concat_padding_mask=True, model_channels=64, num_blocks=3, num_heads=2)
ANIMA_SIZES.update(crossattn_emb_channels=24, pos_emb_cls="rope3d", pos_emb_learnable=True, min_fps=1, max_fps=30)
ANIMA_SIZES.update(pos_emb_interpolation="crop", use_adaln_lora=True, adaln_lora_dim=16)
ANIMA_SIZES.update(extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0)
ANIMA_SIZES.update(rope_t_extrapolation_ratio=1.0)


def anima(dtype):
    """ComfyUI's Anima, its (unused here) LLM adapter replaced by a 1-layer one of the same class."""
    from comfy.ldm.anima.model import Anima, LLMAdapter

    o = ops()
    model = Anima(operations=o, dtype=dtype, **ANIMA_SIZES)
    model.llm_adapter = LLMAdapter(source_dim=24, target_dim=24, model_dim=32, num_layers=1, num_heads=2,
                                   operations=o, dtype=dtype)  # fmt: skip
    model = tiny(model, dtype)
    CONFIGS[model] = ("Anima", ANIMA_SIZES)
    return model


def anima_cases(draw: Draw) -> list[Case]:
    """Anima at 3 blocks of width 64, 2 heads (the Neo cases' sizes): one frame, three frames."""
    import torch

    model = anima(torch.float32)
    layout = dict(n_ctx=0, blocks=(("block", "blocks"),), calls={"block": ("joint", "pass")}, rel=FLOAT32_REL)
    attention = (("comfy.ldm.cosmos.predict2", "optimized_attention"),)
    image, video = draw.inputs((1, *LATENT), (N_TXT, 24)), draw.inputs((3, *LATENT), (N_TXT, 24))
    return [
        Case("Anima", model, image, attention, specs("b"), **layout),
        Case("Anima 3-frame", model, video, attention, specs("b"), frames=3, **layout),
    ]


def left_alone() -> list[tuple[str, object]]:
    """ComfyUI models built from Flux's or Anima's parts that SEG must not claim, tiny and random."""
    import torch
    from comfy.ldm.chroma_radiance.model import ChromaRadiance
    from comfy.ldm.cosmos.predict2 import MiniTrainDIT
    from comfy.ldm.hunyuan3d.model import Hunyuan3Dv2
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    f32, o = torch.float32, ops()
    video = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64, mlp_ratio=4.0,
                 num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=256, qkv_bias=True,
                 guidance_embed=False, byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None,
                 meanflow_sum=False)  # fmt: skip
    radiance = dict(in_channels=3, out_channels=3, context_in_dim=48, hidden_size=64, mlp_ratio=4.0, num_heads=2,
                    depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, patch_size=16, qkv_bias=True,
                    in_dim=64, out_dim=64, hidden_dim=96, n_layers=1, txt_ids_dims=[], vec_in_dim=None,
                    nerf_hidden_size=16, nerf_mlp_ratio=2, nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=16,
                    nerf_final_head_type="linear", nerf_embedder_dtype=f32, use_x0=False)  # fmt: skip
    return [
        ("HunyuanVideo", HunyuanVideo(patch_size=[1, 2, 2], operations=o, dtype=f32, **video)),
        ("HunyuanImage 2.1", HunyuanVideo(patch_size=[2, 2], operations=o, dtype=f32, **video)),
        ("Hunyuan3D", Hunyuan3Dv2(in_channels=16, context_in_dim=48, hidden_size=64, num_heads=2, depth=1,
                                   depth_single_blocks=1, operations=o, dtype=f32)),
        ("Chroma Radiance", ChromaRadiance(operations=o, dtype=f32, **radiance)),
        ("Cosmos-Predict2", MiniTrainDIT(operations=o, dtype=f32, **ANIMA_SIZES)),
    ]  # fmt: skip


def check_left_alone() -> None:
    """Each model of :func:`left_alone` matches no family (printed as the tool reports; raises on a claim)."""
    from lib_seg.dit.families import family_of

    claimed = []
    for name, model in left_alone():
        family = family_of(model)
        ok = family is None
        print(("PASS " if ok else "FAIL ") + f"comfyui {name}: left alone (no family claims it)", flush=True)
        if not ok:
            claimed.append(f"{name} claimed by {family.name}")
    assert not claimed, "; ".join(claimed)


def comfyui_cases() -> list[Case]:
    check_left_alone()
    draw = Draw()
    cases = flux_cases() + mmdit_cases()
    for family in (nextdit_cases, qwen_cases, wan_cases, anima_cases):
        cases += family(draw)
    return cases
