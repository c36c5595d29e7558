"""The ``--host neo`` cases of tools/dit_backend_smoke.py: Forge Neo 2.26's own DiT classes (de2193d), tiny.

Not a script: a module that ``tools/dit_backend_smoke.py`` imports for ``--host neo`` (it needs Neo's tree and
venv, so it has no CI tiny mode of its own; the tool's ``--host imitation``, run by tests/tools, checks the
reference, comparison and report these cases go through).  Run it as the tool:
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/forge-neo/venv/bin/python -m tools.dit_backend_smoke --host neo

Every model is the class Neo's ``backend/loader.py`` builds (lines 380-420), with the config keys Neo's
``modules_forge/packages/huggingface_guess/detection.py`` derives (lines 43-260), shrunk to 2-3 blocks and
small widths that keep each class's constraints (head width = sum of the RoPE axes, Z-Image's width >= 256, ...),
random weights (torch norms' weights around 1), float32 (Neo's RoPE kernels, comfy_kitchen, are float32-only),
called as ``KModel.apply_model`` calls it (``backend/modules/k_model.py:57``), with Neo's 5-D latents where it
uses them.  Per family, the attention seam the reference swaps (the module-global ``attention_function`` each
file imports from ``backend.attention`` and calls at call time), and what the reference blurs:

* Flux.1 (Kontext), Chroma, Flux.2-Klein: ``backend/nn/flux.py``; joint ``[txt | image | references]``.
* Z-Image, Lumina 2 (``NextDiT``, ``lumina.py:215``): ``lumina.attention_function`` (line 95, (B, heads, L, D));
  main ``layers`` over ``[caption | caption pad | image | image pad]`` (pads to ``pad_tokens_multiple``, lines
  351-372); the ``context_refiner`` / ``noise_refiner`` layers are no blocks and attend as the host does.
* Qwen-Image (``qwen.py:335``): ``qwen.attention_function`` (line 234, mask positional); ``[txt | image |
  Edit references]``; the Edit references come in through the model's ``ref_latents`` argument (line 399), so
  Neo's global ``dynamic_args.ref_latents`` stays untouched.
* Wan 2.1 / 2.2 (``WanModel``, ``wan.py:266``): ``wan.attention_function``, which the self-attention reaches
  through ``wan.attention`` (line 18) and the cross-attention(s) directly (lines 99, 130-132); each frame of
  the video's self-attention is blurred over its own h x w grid, the cross-attentions pass.  Cases: one frame
  (a Wan image), three frames, ``time_dim_concat`` frames after the video (lines 407-410, not blurred), and
  Wan 2.1 i2v (CLIP image tokens: two cross-attentions, ``dynamic_args.concat_latent`` channels, lines 392-397).
* Anima (``anima.py:370``): ``anima.attention_function`` (line 146, (B, heads, L, D)); the self-attention's
  frames blurred, the cross-attention passes; reference frames (``dynamic_args.ref_latents``, line 462) after
  the image frames are not blurred.
* Krea 2 (``SingleStreamDiT``, ``krea.py:304``): ``krea.attention_function`` (line 211); ``[txt | image |
  references]``; the blocks' ``attn`` marks them, since the reference path calls ``block.attn`` without the
  block (lines 45-72); the text-fusion transformer's attention is no block's.
* Ernie-Image (``ErnieImageModel``, ``ernie.py:190``): ``ernie.attention_function`` (line 133); ``[image |
  txt]``, patch 1.
* PixelDiT / PiD (``pixeldit/model.py:114``, ``pid.py:126``): two seams, ``pixeldit.model.attention_function``
  (the joint ``patch_blocks``, ``[txt | image]``, line 66; ``model.py`` binds the name from ``modules``) and
  ``pixeldit.modules.attention_function`` (the ``pixel_blocks``' self-attention over the patch tokens, line 63);
  PiD's LQ latent is ``dynamic_args.lq_latent`` (``pid.py:184``), set only during the case's calls.
"""

from __future__ import annotations

from contextlib import contextmanager

from tools.dit_backend_smoke import BATCH, FLOAT32_REL, FLUX_SPECS, N_TXT, Case, draw_inputs, randomize

LATENT = (9, 13)  # odd, non-square: every family pads (or, patch 1, needs no pad)
GRID = ((LATENT[0] + 1) // 2, (LATENT[1] + 1) // 2)  # patch 2: 5 x 7
T01, T1000 = (0.7, 0.4), (700.0, 400.0)  # timesteps as the families' predictors give them


def build(model, seed: int = 0, dtype=None):
    """The tool's random weights in float32 (or ``dtype``), the host's own buffers kept (Anima's RoPE ranges), and
    every torch norm's weight around 1 (so that q and k stay of order 1 and the blur has something to move)."""
    import torch
    from torch import nn

    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    randomize(model, seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
        for module in model.modules():
            if isinstance(module, nn.RMSNorm | nn.LayerNorm | nn.GroupNorm) and module.weight is not None:
                module.weight.add_(1.0)
    return model.to(dtype or torch.float32).eval()


class Draw:
    """Seeded float32 inputs."""

    def __init__(self, seed: int = 1):
        import torch

        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape):
        import torch

        return torch.randn(*shape, generator=self.generator, dtype=torch.float32)

    def inputs(self, latent: tuple[int, ...], context: tuple[int, ...], t=T01, channels: int = 16, **extra) -> dict:
        import torch

        x = self(BATCH, channels, *latent)
        return {"x": x, "t": torch.tensor(t, dtype=torch.float32), "context": self(BATCH, *context), **extra}


@contextmanager
def neo_globals(**values):
    """Neo's ``backend.args.dynamic_args`` holding ``values`` (as Neo's processing sets them), restored after."""
    from backend.args import dynamic_args

    saved = {name: getattr(dynamic_args, name) for name in values}
    for name, value in values.items():
        setattr(dynamic_args, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(dynamic_args, name, value)


def specs(letter: str) -> tuple[str, ...]:
    return ("all", f"{letter}1", f"{letter}0,{letter}2")  # every block, the middle one, the outer two


def flux_cases() -> list[Case]:
    """Neo's ``backend/nn/flux.py`` / ``chroma.py`` classes: Flux.1 (with Kontext references), Chroma, and
    Flux.2-Klein with the ``flux2`` config Neo's detection derives (patch 1, 4 RoPE axes, theta 2000, shared
    modulation, SiLU MLP, no biases, text ids on axis 3), with and without reference images (Klein's edit
    mode, ``index`` method)."""
    import torch
    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    def make(cls, **sizes):
        return randomize(cls(**sizes)).float()

    def f32(inputs: dict) -> dict:
        cast = lambda v: v.float() if torch.is_tensor(v) else [t.float() for t in v]  # noqa: E731
        return {key: cast(value) for key, value in inputs.items()}

    sizes = dict(context_in_dim=48, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2)
    flux = make(
        IntegratedFluxTransformer2DModel, in_channels=16, out_channels=16, vec_in_dim=32, mlp_ratio=4.0,
        axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, **sizes,
    )  # fmt: skip
    klein = make(
        IntegratedFluxTransformer2DModel, in_channels=16, out_channels=16, vec_in_dim=None, mlp_ratio=3.0,
        axes_dim=[8, 8, 8, 8], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
        txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
        default_ref_method="index", ref_index_scale=10.0, **sizes,
    )  # fmt: skip
    chroma = make(
        IntegratedChromaTransformer2DModel, in_channels=64, out_channels=64, mlp_ratio=4.0, axes_dim=[8, 12, 12],
        theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=96, n_layers=2,
        txt_ids_dims=[], vec_in_dim=None, **sizes,
    )  # fmt: skip
    attention = (("backend.nn.flux", "attention_function"),)  # flux.attention(); Chroma's blocks are flux's
    kontext = f32(draw_inputs((9, 13), ref=(6, 8)))
    klein_inputs = f32(draw_inputs((9, 13), ("y", "guidance")))
    klein_edit = f32(draw_inputs((9, 13), ("y", "guidance"), ref=(5, 7)))
    return [
        Case("Flux", flux, f32(draw_inputs((9, 13))), attention, FLUX_SPECS, rel=FLOAT32_REL),
        Case("Flux+Kontext", flux, kontext, attention, FLUX_SPECS, n_extra=3 * 4, rel=FLOAT32_REL),
        Case("Chroma", chroma, f32(draw_inputs((9, 13), ("y", "guidance"))), attention, FLUX_SPECS, rel=FLOAT32_REL),
        Case("Flux.2-Klein", klein, klein_inputs, attention, FLUX_SPECS, patch=1, rel=FLOAT32_REL),
        Case("Flux.2-Klein+ref", klein, klein_edit, attention, FLUX_SPECS, n_extra=5 * 7, patch=1, rel=FLOAT32_REL),
        Case("Flux.2-Klein 8x8", klein, f32(draw_inputs((8, 8), ("y", "guidance"))), attention, FLUX_SPECS, patch=1,
             rel=FLOAT32_REL),
    ]  # fmt: skip


def nextdit_cases(draw: Draw) -> list[Case]:
    """Z-Image (width 3840 in Neo's detection: ``z_image_modulation``, theta 256, 8/3 FFN, time scale 1000, pad
    tokens to a multiple of 32) at width 256, the least whose ``min(dim, 256)`` modulation input fits the
    timestep embedding's 256 outputs (``lumina.py:139-142, 283``); Lumina 2 (width 2304: 24 heads over 8 k/v
    heads, equal RoPE axes) at width 96, 4 heads over 2 k/v heads."""
    from backend.nn.lumina import NextDiT

    common = dict(patch_size=2, in_channels=16, n_layers=3, multiple_of=16, qk_norm=True, cap_feat_dim=24)
    zimage = build(NextDiT(
        dim=256, n_heads=8, n_kv_heads=8, axes_dims=[8, 12, 12], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
        z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32, **common,
    ))  # fmt: skip
    lumina = build(NextDiT(dim=96, n_heads=4, n_kv_heads=2, axes_dims=[8, 8, 8], ffn_dim_multiplier=4.0, **common))
    layout = dict(blocks=(("layer", "layers"),), calls={"layer": ("joint",)}, rel=FLOAT32_REL)
    n_image = GRID[0] * GRID[1]
    pad = lambda n: -n % 32  # noqa: E731  (Z-Image's pad tokens)
    zimage_rows = dict(n_ctx=N_TXT + pad(N_TXT), n_extra=pad(n_image))
    attention = (("backend.nn.lumina", "attention_function"),)
    return [
        Case("Z-Image", zimage, draw.inputs(LATENT, (N_TXT, 24)), attention, specs("l"), **zimage_rows, **layout),
        Case("Lumina 2", lumina, draw.inputs(LATENT, (N_TXT, 24)), attention, specs("l"), **layout),
    ]


def qwen_cases(draw: Draw) -> list[Case]:
    """Qwen-Image (60 blocks of 24 heads x 128, text 3584, axes 16/56/56) at 3 blocks of 2 heads x 32, axes
    8/12/12; the latent is Neo's 5-D Wan-VAE ``(B, 16, 1, H, W)``; Qwen-Image-Edit: one reference latent."""
    from backend.nn.qwen import QwenImageTransformer2DModel

    qwen = build(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=3, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(8, 12, 12),
    ))  # fmt: skip
    layout = dict(blocks=(("joint", "transformer_blocks"),), calls={"joint": ("joint",)}, rel=FLOAT32_REL)
    attention = (("backend.nn.qwen", "attention_function"),)
    plain = draw.inputs((1, *LATENT), (N_TXT, 24))
    edit = draw.inputs((1, *LATENT), (N_TXT, 24), ref_latents=[draw(BATCH, 16, 1, 5, 7)])
    return [
        Case("Qwen-Image", qwen, plain, attention, specs("j"), **layout),
        Case("Qwen-Image-Edit", qwen, edit, attention, specs("j"), n_extra=3 * 4, **layout),
    ]


def wan_cases(draw: Draw) -> list[Case]:
    """Wan 2.1 / 2.2 (dim 5120 or 1536 or 3072, head 128, patch (1, 2, 2)) at dim 64, 2 heads of 32 (RoPE axes
    12/10/10 by the class's own split), 3 blocks; t2v, and a Wan 2.1 i2v with CLIP image features (its blocks
    make three attention calls) and the image latent's channels concatenated (``in_dim`` 36)."""
    from backend.nn.wan import WanModel

    sizes = dict(patch_size=(1, 2, 2), dim=64, ffn_dim=96, freq_dim=32, text_dim=24, out_dim=16, num_heads=2)
    t2v = build(WanModel(model_type="t2v", in_dim=16, num_layers=3, **sizes))
    i2v = build(WanModel(model_type="i2v", in_dim=36, num_layers=3, **sizes))
    layout = dict(n_ctx=0, blocks=(("block", "blocks"),), calls={"block": ("joint", "pass")}, rel=FLOAT32_REL)
    i2v_layout = {**layout, "calls": {"block": ("joint", "pass", "pass")}}
    attention = (("backend.nn.wan", "attention_function"),)
    n_frame = GRID[0] * GRID[1]
    image, video = draw.inputs((1, *LATENT), (N_TXT, 24), T1000), draw.inputs((3, *LATENT), (N_TXT, 24), T1000)
    concat = draw.inputs((2, *LATENT), (N_TXT, 24), T1000, time_dim_concat=draw(BATCH, 16, 1, *LATENT))
    i2v_inputs = draw.inputs((3, *LATENT), (N_TXT, 24), T1000, clip_fea=draw(BATCH, 4, 1280))
    start = draw(1, 20, 3, *LATENT)  # Neo's i2v conditioning latent, one row: the model doubles it for cond+uncond

    def with_start():
        return neo_globals(concat_latent=start)

    return [
        Case("Wan", t2v, image, attention, specs("b"), **layout),
        Case("Wan 3-frame", t2v, video, attention, specs("b"), frames=3, **layout),
        Case("Wan+time_dim_concat", t2v, concat, attention, specs("b"), frames=2, n_extra=n_frame, **layout),
        Case("Wan 2.1 i2v 3-frame", i2v, i2v_inputs, attention, specs("b"), frames=3, context=with_start, **i2v_layout),
    ]


def anima_cases(draw: Draw) -> list[Case]:
    """Anima (28 blocks, width 2048, 16 heads, patch 2 x 1 frame, text 1024, RoPE extrapolation 4/4/1) at 3
    blocks of width 64, 2 heads (RoPE 12/10/10 by the class's split); one image frame, three frames, and one
    reference frame (Neo's Anima edit, ``dynamic_args.ref_latents``, one row that the model doubles)."""
    from backend.nn.anima import Anima

    anima = build(Anima(
        in_channels=16, out_channels=16, patch_spatial=2, patch_temporal=1, model_channels=64,
        crossattn_emb_channels=24, adaln_lora_dim=16, num_blocks=3, num_heads=2, rope_h_extrapolation_ratio=4.0,
        rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
    ))  # fmt: skip
    layout = dict(n_ctx=0, blocks=(("block", "blocks"),), calls={"block": ("joint", "pass")}, rel=FLOAT32_REL)
    attention = (("backend.nn.anima", "attention_function"),)
    reference = draw(1, 16, 1, *LATENT)

    def with_reference():
        return neo_globals(ref_latents=[reference])

    image, video = draw.inputs((1, *LATENT), (N_TXT, 24)), draw.inputs((3, *LATENT), (N_TXT, 24))
    return [
        Case("Anima", anima, image, attention, specs("b"), **layout),
        Case("Anima 3-frame", anima, video, attention, specs("b"), frames=3, **layout),
        Case("Anima+ref", anima, dict(image), attention, specs("b"), n_extra=GRID[0] * GRID[1],
             context=with_reference, **layout),
    ]  # fmt: skip


def krea_cases(draw: Draw) -> list[Case]:
    """Krea 2 (28 blocks of 48 heads x 128 over 12 k/v heads, text fusion over 12 Qwen3-VL layers) at 3 blocks
    of width 64, 4 heads of 16 over 2 k/v heads (RoPE 4/6/6 by the class's split), 3 fused text layers of 16;
    Neo's 5-D latent; with one reference latent (the ``index_timestep_zero`` path)."""
    from backend.nn.krea import SingleStreamDiT

    krea = build(SingleStreamDiT(
        features=64, tdim=16, txtdim=16, heads=4, kvheads=2, multiplier=2, layers=3, patch=2, channels=16,
        theta=1000, txtlayers=3, txtheads=2, txtkvheads=2,
    ))  # fmt: skip
    layout = dict(blocks=(("single", "blocks"),), marker="attn", calls={"single": ("joint",)}, rel=FLOAT32_REL)
    attention = (("backend.nn.krea", "attention_function"),)
    plain = draw.inputs((1, *LATENT), (N_TXT, 3 * 16))
    refs = draw.inputs((1, *LATENT), (N_TXT, 3 * 16), ref_latents=[draw(1, 16, 1, 5, 7)])
    return [
        Case("Krea 2", krea, plain, attention, specs("s"), **layout),
        Case("Krea 2+ref", krea, refs, attention, specs("s"), n_extra=3 * 4, **layout),
    ]


def ernie_cases(draw: Draw) -> list[Case]:
    """Ernie-Image (36 layers, hidden 4096, 32 heads, axes 32/48/48, theta 256, 128 channels, patch 1) at 3
    layers of hidden 64, 4 heads of 16, axes 4/6/6, 16 channels; ``[image | text]``."""
    from backend.nn.ernie import ErnieImageModel

    ernie = build(ErnieImageModel(
        hidden_size=64, num_attention_heads=4, num_layers=3, ffn_hidden_size=96, in_channels=16, out_channels=16,
        patch_size=1, text_in_dim=24, rope_theta=256, rope_axes_dim=(4, 6, 6),
    ))  # fmt: skip
    layout = dict(n_ctx=0, n_extra=N_TXT, patch=1, blocks=(("layer", "layers"),), calls={"layer": ("joint",)})
    inputs = draw.inputs(LATENT, (N_TXT, 24), T1000)
    return [Case("Ernie-Image", ernie, inputs, (("backend.nn.ernie", "attention_function"),), specs("l"),
                 rel=FLOAT32_REL, **layout)]  # fmt: skip


def pixeldit_cases(draw: Draw) -> list[Case]:
    """PixelDiT (14 patch blocks, hidden 1536, 24 heads; 2 pixel blocks, attention 1152 over 16 heads; patch 16)
    at 3 patch blocks of hidden 32 over 2 heads, 2 pixel blocks of attention 24 over 2 heads, patch 4, on RGB
    pixels 33 x 50 (a 9 x 13 patch grid after the host's pad); PiD with a 4-channel LQ latent, gates every 2nd
    patch block, RoPE reference grid 4 x 4."""
    import torch
    from backend.nn.pixeldit.model import PixDiT_T2I
    from backend.nn.pixeldit.pid import PidNet

    sizes = dict(in_channels=3, num_groups=2, hidden_size=32, pixel_hidden_size=4, pixel_attn_hidden_size=24)
    sizes.update(pixel_num_groups=2, patch_depth=3, pixel_depth=2, patch_size=4, txt_embed_dim=24, txt_max_length=10)
    pixeldit = build(PixDiT_T2I(**sizes))
    pid = build(PidNet(
        lq_latent_channels=4, lq_hidden_dim=8, lq_num_res_blocks=1, lq_interval=2, sr_scale=4,
        latent_spatial_down_factor=8, rope_ref_h=16, rope_ref_w=16, **sizes,
    ))  # fmt: skip
    lq = [draw(BATCH, 4, 3, 4), torch.tensor([0.3])]  # Neo's lq_latent: the LQ latent per row, degrade sigma

    def with_lq():
        return neo_globals(lq_latent=lq)

    layout = dict(patch=4, blocks=(("joint", "patch_blocks"), ("block", "pixel_blocks")), rel=FLOAT32_REL,
                  calls={"joint": ("joint",), "block": ("image",)})  # fmt: skip
    attention = (
        ("backend.nn.pixeldit.model", "attention_function"),
        ("backend.nn.pixeldit.modules", "attention_function"),
    )
    pixel_specs = ("all", "j1", "b0", "j0,j2,b1")
    pixels = draw.inputs((33, 50), (N_TXT, 24), channels=3)
    return [
        Case("PixelDiT", pixeldit, pixels, attention, pixel_specs, **layout),
        Case("PiD", pid, dict(pixels), attention, pixel_specs, context=with_lq, **layout),
    ]


def neo_cases() -> list[Case]:
    draw = Draw()
    cases = flux_cases()
    for family in (nextdit_cases, qwen_cases, wan_cases, anima_cases, krea_cases, ernie_cases, pixeldit_cases):
        cases += family(draw)
    return cases
