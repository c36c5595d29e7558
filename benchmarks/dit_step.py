"""Per-step cost of SEG on DiTs (Flux, SD3.5, Flux.2-Klein, Neo's families): CFG only, separate SEG call, batched rows.

    python -m benchmarks.dit_step --out dit-table.md          # on a CUDA machine: full size, bf16 (CASES)
    python -m benchmarks.dit_step --cases families            # Neo's families at full size (FAMILY_CASES)
    python -m benchmarks.dit_step --cases wan14b:1:4:inf      # any model:batch:cfg:sigma list
    python -m benchmarks.dit_step --tiny                      # CPU smoke run (small widths, 8 cases)

The transformers are the from-scratch DiTs of tests/support/dit_models.py built at the released sizes
with random bf16 weights, made directly on the device (meta tensors, ``to_empty``, then a
variance-preserving normal init), at 1024² (latent 16 x 128 x 128, 4096 image tokens):

* ``flux``:  hidden 3072, 24 heads of 128 (RoPE axes 16/56/56), 19 double + 38 single blocks, MLP
  ratio 4, 64 input channels after the 2x2 patchify, 512 text tokens of width 4096 (T5), vec 768;
* ``sd35m``: SD3.5 Medium's MMDiT-X: hidden 1536, 24 joint blocks, 24 heads of 64, MLP ratio 4,
  RMS QK-norm, the image-only second attention (``attn2``) in blocks 0-12, 333 context tokens of
  width 4096, pooled y 2048;
* ``klein4b`` / ``klein9b``: Flux.2-Klein (tests/support/dit_flux2.py, the structure of Neo's
  ``backend/nn/flux.py`` with the ``flux2`` config of its ``huggingface_guess/detection.py``): patch 1 on a
  128-channel latent (64 x 64 at 1024², 4096 image tokens), 4 RoPE axes of 32, shared modulation,
  SiLU-gated MLP ratio 3, no biases; 4B: hidden 3072, 24 heads, 5 double + 20 single blocks, 512 text
  tokens of width 7680 (3 Qwen3-4B layers); 9B: hidden 4096, 32 heads, 8 + 24 blocks, width 12288.

Their matrix products, attention lengths and block counts are the real models' (Flux: 11.85 B
parameters; SD3.5 Medium: 2.27 B, the release's 2.5 B less most of its 384² position table, a lookup);
the embedders are single linear maps (no sinusoidal timestep MLP, no guidance embedder), which cost
nothing next to the blocks.  ``--dtype`` defaults to bfloat16 on a GPU, float32 on the CPU.

Forge Neo's families (``--cases families``: each at batch 1 and 2, CFG 1 and 4, infinite sigma) are the
test models of tests/support at the widths and block counts of the released configs (Neo's
``backend/huggingface/*/transformer/config.json`` and ``huggingface_guess/detection.py``); images at 1024²,
text lengths as Neo's prompts give them (padded where Neo pads, else a 256-token prompt).  Parameters as
counted here (meta device) against the released sizes:

* ``zimage``: Z-Image-Turbo (dit_nextdit.py): hidden 3840, 30 heads of 128 (RoPE 32/48/48, theta 256), 30
  layers after 2 + 2 refiners, SiLU-gated MLP 10240, time width 256, caption padded to a multiple of 32;
  latent 16 x 128 x 128, 256 text tokens of width 2560 (Qwen3-4B): 6.15 B (released 6.15 B);
* ``lumina2``: Lumina Image 2 / Neta Lumina: hidden 2304, 24 query heads over 8 k/v heads (RoPE 32/32/32),
  26 layers after 2 + 2 refiners, MLP 9216, time width 1024; latent 16 x 128 x 128, 256 tokens of width 2304
  (Gemma-2-2B): 2.61 B (released 2.6 B);
* ``qwenimage``: Qwen-Image (dit_qwen.py): hidden 3072, 24 heads of 128 (RoPE 16/56/56), 60 dual-stream
  blocks, MLP ratio 4; 5-D latent 16 x 1 x 128 x 128 (Wan VAE), 256 tokens of width 3584 (Qwen2.5-VL-7B):
  20.42 B (released 20 B);
* ``wan14b``: Wan 2.1 T2V 14B, also each Wan 2.2 A14B expert (dit_wan.py): dim 5120, 40 heads of 128, 40
  blocks, FFN 13824, frequency width 256; 480p x 17 frames: latent 16 x 5 x 60 x 104 (1 + 16 / 4 latent
  frames of 480 x 832 / 8; 5 x 30 x 52 = 7800 tokens), 512 umT5 tokens of width 4096 (Neo pads to 512):
  14.29 B (released 14 B);
* ``anima``: Anima, Cosmos-Predict2 2B layout (dit_anima.py): width 2048, 16 heads, 28 blocks, MLP ratio
  4, adaLN-LoRA 256; latent 16 x 1 x 128 x 128, 512 tokens of width 1024 (Neo pads the LLM adapter's
  output to 512): 1.96 B (released 2 B; the LLM adapter, which Neo runs in the text encoder, is not built);
* ``krea2``: Krea 2, Krea-2-Raw (dit_krea.py): 6144 = 48 query heads over 12 k/v heads of 128 (RoPE
  32/48/48, theta 1000), 28 single-stream blocks, SwiGLU 16384, time width 256, text fusion over 12 tapped
  Qwen3-VL layers of width 2560 (20 heads, SwiGLU 6912); latent 16 x 1 x 128 x 128 (Neo's Wan layout), 256
  tokens: 12.86 B (released 12.9 B);
* ``ernie``: Ernie-Image (dit_ernie.py): hidden 4096, 32 heads (RoPE 32/48/48), 36 layers, SwiGLU 12288,
  patch 1 on the 128-channel Flux.2 latent (64 x 64 = 4096 tokens), 256 tokens of width 3072 (Ministral 3B):
  8.00 B (released 8 B);
* ``pixeldit``: PixelDiT, the PixDiT_T2I network Neo's PiD is built on (dit_pixeldit.py): 14 patch blocks of
  hidden 1536 (24 heads, SwiGLU 4096 per stream), 2 pixel blocks (pixel width 16, attention 1152 with 16
  heads), patch 16 on 1024² RGB pixels (64 x 64 patch tokens), 300 Gemma-2 tokens of width 2304 (Neo pads to
  300): 1.30 B (released 1.3 B; PiD's LQ projection is not built: it needs an LQ latent per image);
* ``qwen21``: Qwen-Image 2.1 (dit_qwen21.py, Neo 2.29 ``backend/nn/qwen21.py``; the class's defaults, no
  released config was readable here): hidden 4096, 32 heads of 128 (RoPE 16/56/56), 32 single-stream blocks,
  SwiGLU ratio 3, no patchify on a 64-channel latent (64 x 64 = 4096 tokens at 1024²), 256 tokens of width
  4096, no reference image (the target is the last segment; the text segment attends causally).

Where a test model fixes a width its release does not have, a subclass here sets it; the blocks, their
hook points and the call stay the test model's: Anima's MLP ratio 4 (TinyAnima builds its blocks with
2), the released SwiGLU MLPs of Ernie-Image, Krea 2 and PixelDiT's patch blocks (the test models' MLPs
are 2x wide: GELU on Ernie-Image and PixelDiT, SwiGLU on Krea 2), PixelDiT's pixel MLP ratio 4, and
Krea 2's 20 text-fusion heads (TinyKrea2 gives its text fusion the image heads: 48 do not divide 2560).
TinyNextDiT casts its rotations to the latent's dtype, as Neo does, but rotates with ``torch.complex``,
which has no bfloat16: a pre-hook gives its attentions float32 rotations (of the same bf16 values).  The
5-D latents (Qwen-Image, Wan, Anima, Krea 2) run through a ``KModel`` whose sigma broadcasts over the
latent's rank (forge_host's ``DitModel`` broadcasts over 4 dims, which pairs rows with channels in a 5-D
batch), and Wan and Anima are called with the latent's device as the default one (TinyWan's timestep
embedding and TinyAnima's padding mask are made without a device).  No family is skipped.

The host is the new-Forge (Forge 2.x) imitation of tests/support/forge_host.py (``DitModel`` calls
the DiT as ``KModel`` does; at CFG 1 the host skips the uncond pass; Neo shares these names); the code
under test is ``lib_seg.forge.adapter.patch_unet``, as the WebUI script calls it.  Modes, timed over whole
denoiser steps (one ``p.sampler.model_wrap_cfg`` call) with CUDA events, interleaved step by step, median of
``--repeats`` after ``--warmup``:

* ``cfg``      - SEG off: no extension at all;
* ``separate`` - ``patch_unet(..., batch_rows=False)``: one extra cond-only model call per step;
* ``batched``  - ``patch_unet(..., batch_rows=True)``: the SEG rows appended to the main model call.

Per mode also the peak memory (``torch.cuda.max_memory_allocated`` reset per mode) above what was
allocated before its first step (the weights and the inputs), and the model rows of each call of a
step (``2 / 2+1`` ...: a fallback from batched to separate would show there).  "ideal batched" is the
batched mode's exact limit: 1 + SEG rows / main rows x the timed share of a CFG-only step from the first
blurred block on (from the first block where the family runs no prefix reuse: PixelDiT).  Checks in the
same run:

* "off bit-identical": ``patch_unet`` with SEG disabled vs no extension, ``torch.equal``;
* "max rel. diff": ``max |batched - separate| / max |separate|`` of the guided x0 prediction;
  "noise floor": the same measure for the host's own batch-shape noise: ``separate`` with copies of
  the cond rows appended to every model call and dropped (``max |padded - separate| / max |separate|``);
  "÷ effect": ``‖batched - separate‖ / ‖separate - cfg‖``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.seg_step import Timer
from lib_seg.core.params import SegParams
from lib_seg.dit.families import family_of
from lib_seg.dit.prefix import blocks_in_order
from lib_seg.forge import adapter as forge
from lib_seg.targets import query_target
from tests.support import forge_host as host
from tests.support.dit_anima import TinyAnima
from tests.support.dit_ernie import TinyErnie
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_krea import SwiGLU, TextFusionTransformer, TinyKrea2
from tests.support.dit_models import TinyFlux, TinyMMDiT
from tests.support.dit_nextdit import TinyNextDiT
from tests.support.dit_pixeldit import TinyPixelDiT
from tests.support.dit_qwen import TinyQwen
from tests.support.dit_qwen21 import Block as Qwen21Block
from tests.support.dit_qwen21 import TinyQwen21
from tests.support.dit_wan import TinyWan

KIND = "forge"  # Forge 2.x, the Forge that runs Flux and SD3 (``--host comfyui``: ComfyUI, see ComfyJob)
TIMED = ("cfg", "separate", "batched")
STEP_SIGMA = 0.7  # flow matching: t = sigma in [0, 1]
CASES = (
    "flux:1:1:inf,flux:1:4:inf,flux:2:1:inf,flux:2:4:inf,flux:1:1:10,"
    "sd35m:1:1:inf,sd35m:1:4:inf,sd35m:2:1:inf,sd35m:2:4:inf,sd35m:1:4:10,"
    "klein4b:1:1:inf,klein4b:1:4:inf,klein4b:2:1:inf,klein4b:2:4:inf,"
    "klein9b:1:1:inf,klein9b:1:4:inf,klein9b:2:1:inf,klein9b:2:4:inf"
)
FAMILIES = ("zimage", "lumina2", "qwenimage", "qwen21", "wan14b", "anima", "krea2", "ernie", "pixeldit")  # Neo's
# ``--cases families``: each of them at batch 1 and 2, CFG 1 and 4 (the default run above stays as it was)
FAMILY_CASES = ",".join(f"{name}:{batch}:{cfg}:inf" for name in FAMILIES for batch in (1, 2) for cfg in (1, 4))
PRESETS = {"default": CASES, "families": FAMILY_CASES}
# --tiny's defaults (a smoke run in seconds): batch 1 and 2, CFG 1 and 4, infinite and finite sigma, the
# first models and three of Neo's families (a 4-D, a 5-D video and a 5-D image latent)
TINY_CASES = (
    "flux:1:1:inf,flux:2:4:10,sd35m:1:4:inf,sd35m:2:1:10,klein4b:1:1:inf,zimage:1:1:inf,wan14b:1:4:inf,qwenimage:2:1:10"
)
TINY_RUN = {"device": "cpu", "cases": TINY_CASES, "warmup": 2, "repeats": 2}


class KModel5d(host.DitModel):
    """forge_host's ``DitModel`` with sigma broadcast over the latent's rank, as Neo's predictors do (its own
    ``t[:, None, None, None]`` would pair the rows of a 5-D batch with its channels)."""

    def apply_model(self, x, t, c_crossattn=None, y=None, control=None, transformer_options=None, **extra):
        self.calls.append(transformer_options)
        self.rows.append(x.shape[0])
        v = self._call(
            x, t, context=c_crossattn, y=y, control=control, transformer_options=transformer_options, **extra
        )
        return x - v * t.reshape(-1, *(1,) * (x.dim() - 1))

    def _call(self, x, t, **kwargs):
        return self.diffusion_model(x, t, **kwargs)


class KModel5dOnDevice(KModel5d):
    """:class:`KModel5d` calling the model with the latent's device as the default one: TinyWan's timestep
    embedding and TinyAnima's padding mask are made without a device, so on a GPU they would be CPU tensors."""

    def _call(self, x, t, **kwargs):
        with torch.device(x.device):
            return self.diffusion_model(x, t, **kwargs)


def _float_rotations(_attention: nn.Module, args: tuple, kwargs: dict):
    """``JointAttention(x, x_mask, freqs_cis, ...)`` pre-hook: the rotations in float32."""
    x, mask, freqs, *rest = args
    return (x, mask, freqs.float() if freqs.dtype in (torch.bfloat16, torch.float16) else freqs, *rest), kwargs


class NextDiTAt(TinyNextDiT):
    """TinyNextDiT whose attentions get the rotations in float32: it casts them to the latent's dtype, as Neo
    does, but rotates with ``torch.complex``, which has no bfloat16 (Neo's comfy-kitchen kernel takes it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for layer in (*self.context_refiner, *self.noise_refiner, *self.layers):
            layer.attention.register_forward_pre_hook(_float_rotations, with_kwargs=True)


class AnimaAt(TinyAnima):
    """TinyAnima with the blocks' MLP ratio (the release's 4; TinyAnima builds its blocks with 2)."""

    def __init__(self, mlp_ratio: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        dim, hidden = self.model_channels, int(self.model_channels * mlp_ratio)
        for block in self.blocks:  # Block's own MLP (Neo: GPT2FeedForward), at that width
            block.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))


class ErnieAt(TinyErnie):
    """TinyErnie with the release's SwiGLU MLP of width ``ffn_hidden`` (TinyErnie: a GELU MLP of 2x)."""

    def __init__(self, ffn_hidden: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if ffn_hidden is not None:
            for layer in self.layers:
                layer.mlp = SwiGLU(self.hidden, ffn_hidden)


class Qwen21At(TinyQwen21):
    """TinyQwen21 with the release's SwiGLU ratio 3 (its blocks use 2) and float32 rotations (of the same bf16
    values: it rotates with ``torch.complex``, which has no bfloat16)."""

    def __init__(self, mlp_ratio: int = 3, **kwargs):
        super().__init__(**kwargs)
        hidden, heads = self.img_in.out_features, self.transformer_blocks[0].attn.heads
        layers = len(self.transformer_blocks)
        self.transformer_blocks = nn.ModuleList(Qwen21Block(hidden, heads, mlp_ratio) for _ in range(layers))

    def build_sequence(self, x, context, refs, slots):
        hidden, pe, segments = super().build_sequence(x, context, refs, slots)
        return hidden, pe.float(), segments


class Krea2At(TinyKrea2):
    """TinyKrea2 with the release's SwiGLU widths (``mlp_hidden`` in the blocks, ``txt_mlp_hidden`` in the text
    fusion; TinyKrea2: 2x) and ``txtheads`` text-fusion heads (TinyKrea2 gives it the image heads)."""

    def __init__(self, mlp_hidden=None, txtheads=None, txt_mlp_hidden=None, **kwargs):
        super().__init__(**kwargs)
        features = self.first.out_features
        if mlp_hidden is not None:
            for block in self.blocks:
                block.mlp = SwiGLU(features, mlp_hidden)
        if txtheads is not None:
            self.txtfusion = TextFusionTransformer(self.txtlayers, self.txtdim, txtheads)
        if txt_mlp_hidden is not None:
            for block in (*self.txtfusion.layerwise_blocks, *self.txtfusion.refiner_blocks):
                block.mlp = SwiGLU(self.txtdim, txt_mlp_hidden)


class PixelDiTAt(TinyPixelDiT):
    """TinyPixelDiT with the release's SwiGLU patch-block MLPs of width ``mlp_hidden`` (both streams) and
    pixel MLP ratio (TinyPixelDiT: GELU MLPs of 2x)."""

    def __init__(self, mlp_hidden: int | None = None, pixel_mlp_ratio: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if mlp_hidden is not None:
            for block in self.patch_blocks:
                block.mlp_x, block.mlp_y = SwiGLU(self.hidden_size, mlp_hidden), SwiGLU(self.hidden_size, mlp_hidden)
        if pixel_mlp_ratio is not None:
            for block in self.pixel_blocks:
                dim = block.pixel_dim
                block.mlp = nn.Sequential(
                    nn.Linear(dim, pixel_mlp_ratio * dim), nn.GELU(), nn.Linear(pixel_mlp_ratio * dim, dim)
                )


@dataclass(frozen=True)
class DitSpec:
    """A model to build (``cls(**kwargs)``) and the size of its inputs."""

    cls: type
    kwargs: dict
    latent: int | tuple[int, ...]  # latent side (8x VAE: image side / 8; ``kwargs["channels"]`` channels),
    # or the latent of one row, (C, H, W) or (C, T, H, W)
    n_txt: int
    context_dim: int
    vec_dim: int | None  # None: no pooled vector (no ``y`` in the conds)
    guidance: bool  # Flux dev's distilled-guidance value rides in the conds (one per row)
    host_model: type = host.DitModel  # the host's ``KModel`` that calls it

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.kwargs["channels"], self.latent, self.latent) if isinstance(self.latent, int) else self.latent


FULL = {
    "flux": DitSpec(
        TinyFlux,
        dict(
            channels=16,
            hidden=3072,
            heads=24,
            depth=19,
            single=38,
            mlp_ratio=4,
            context_dim=4096,
            vec_dim=768,
            axes=(16, 56, 56),
        ),
        latent=128,
        n_txt=512,
        context_dim=4096,
        vec_dim=768,
        guidance=True,
    ),
    "sd35m": DitSpec(
        TinyMMDiT,
        dict(
            channels=16,
            hidden=1536,
            heads=24,
            depth=24,
            pad=False,  # Forge 2.x's MMDiTX
            qk_norm=True,
            attn2_blocks=tuple(range(13)),
            mlp_ratio=4,
            context_dim=4096,
            y_dim=2048,
            pos_size=64,
        ),
        latent=128,
        n_txt=333,
        context_dim=4096,
        vec_dim=2048,
        guidance=False,
    ),
}
FULL["klein4b"] = DitSpec(
    TinyFlux2,
    dict(channels=128, hidden=3072, heads=24, depth=5, single=20, mlp_ratio=3, context_dim=7680, axes=(32,) * 4),
    latent=64,
    n_txt=512,
    context_dim=7680,
    vec_dim=1,  # no pooled vector; the model ignores y
    guidance=False,
)
FULL["klein9b"] = DitSpec(
    TinyFlux2,
    dict(channels=128, hidden=4096, heads=32, depth=8, single=24, mlp_ratio=3, context_dim=12288, axes=(32,) * 4),
    latent=64,
    n_txt=512,
    context_dim=12288,
    vec_dim=1,
    guidance=False,
)
# Small widths, the same block counts around the default layers (d7-9,s7-9 / j7-9 need 10 blocks).
TINY = {
    "flux": DitSpec(
        TinyFlux,
        dict(
            channels=16,
            hidden=64,
            heads=2,
            depth=10,
            single=10,
            mlp_ratio=4,
            context_dim=32,
            vec_dim=16,
            axes=(4, 14, 14),
        ),
        latent=16,
        n_txt=16,
        context_dim=32,
        vec_dim=16,
        guidance=True,
    ),
    "sd35m": DitSpec(
        TinyMMDiT,
        dict(
            channels=16,
            hidden=64,
            heads=2,
            depth=10,
            pad=False,
            attn2_blocks=tuple(range(6)),
            mlp_ratio=4,
            context_dim=32,
            y_dim=16,
            pos_size=8,
        ),
        latent=16,
        n_txt=16,
        context_dim=32,
        vec_dim=16,
        guidance=False,
    ),
}

TINY["klein4b"] = DitSpec(  # Klein 4B's block counts (default d2,s10), small widths
    TinyFlux2,
    dict(channels=16, hidden=64, heads=2, depth=5, single=20, mlp_ratio=3, context_dim=32, axes=(8,) * 4),
    latent=16,
    n_txt=16,
    context_dim=32,
    vec_dim=1,
    guidance=False,
)

# Forge Neo's families at their released sizes (module docstring); no pooled vector, no guidance value.
NEXTDIT = dict(channels=16, refiners=2, patch=2)
FULL["zimage"] = DitSpec(
    NextDiTAt,
    dict(NEXTDIT, hidden=3840, heads=30, layers=30, context_dim=2560, axes=(32, 48, 48), theta=256.0)
    | dict(z_image=True, pad_multiple=32, adaln_dim=256, ffn_hidden=10240),
    latent=128,
    n_txt=256,
    context_dim=2560,
    vec_dim=None,
    guidance=False,
)
FULL["lumina2"] = DitSpec(
    NextDiTAt,
    dict(NEXTDIT, hidden=2304, heads=24, kv_heads=8, layers=26, context_dim=2304, axes=(32, 32, 32), theta=10000.0)
    | dict(z_image=False, pad_multiple=None, adaln_dim=1024, ffn_hidden=9216),
    latent=128,
    n_txt=256,
    context_dim=2304,
    vec_dim=None,
    guidance=False,
)
FULL["qwenimage"] = DitSpec(
    TinyQwen,
    dict(channels=16, hidden=3072, heads=24, depth=60, mlp_ratio=4, context_dim=3584, axes=(16, 56, 56)),
    latent=(16, 1, 128, 128),
    n_txt=256,
    context_dim=3584,
    vec_dim=None,
    guidance=False,
    host_model=KModel5d,
)
FULL["wan14b"] = DitSpec(
    TinyWan,
    dict(in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, freq_dim=256, text_dim=4096, num_heads=40, num_layers=40),
    latent=(16, 5, 60, 104),  # 480 x 832, 17 frames
    n_txt=512,
    context_dim=4096,
    vec_dim=None,
    guidance=False,
    host_model=KModel5dOnDevice,
)
FULL["anima"] = DitSpec(
    AnimaAt,
    dict(in_channels=16, out_channels=16, model_channels=2048, num_heads=16, num_blocks=28, mlp_ratio=4.0)
    | dict(crossattn_emb_channels=1024, adaln_lora_dim=256),
    latent=(16, 1, 128, 128),
    n_txt=512,
    context_dim=1024,
    vec_dim=None,
    guidance=False,
    host_model=KModel5dOnDevice,
)
FULL["krea2"] = DitSpec(
    Krea2At,
    dict(channels=16, features=6144, heads=48, kvheads=12, layers=28, patch=2, tdim=256, mlp_hidden=16384)
    | dict(txtdim=2560, txtlayers=12, txtheads=20, txt_mlp_hidden=6912),
    latent=(16, 1, 128, 128),
    n_txt=256,
    context_dim=12 * 2560,  # the 12 tapped Qwen3-VL layers side by side
    vec_dim=None,
    guidance=False,
    host_model=KModel5d,
)
FULL["ernie"] = DitSpec(
    ErnieAt,
    dict(
        channels=128, hidden=4096, heads=32, layers=36, patch=1, text_in_dim=3072, axes=(32, 48, 48), ffn_hidden=12288
    ),
    latent=64,
    n_txt=256,
    context_dim=3072,
    vec_dim=None,
    guidance=False,
)
FULL["pixeldit"] = DitSpec(
    PixelDiTAt,
    dict(in_channels=3, hidden_size=1536, num_groups=24, patch_depth=14, mlp_hidden=4096, patch_size=16)
    | dict(pixel_hidden_size=16, pixel_attn_hidden_size=1152, pixel_num_groups=16, pixel_depth=2, pixel_mlp_ratio=4)
    | dict(txt_embed_dim=2304),
    latent=(3, 1024, 1024),  # pixels
    n_txt=300,
    context_dim=2304,
    vec_dim=None,
    guidance=False,
)
FULL["qwen21"] = DitSpec(
    Qwen21At,
    dict(channels=64, hidden=4096, heads=32, layers=32, context_dim=4096, axes=(16, 56, 56)),
    latent=(64, 64, 64),
    n_txt=256,
    context_dim=4096,
    vec_dim=None,
    guidance=False,
    host_model=KModel5dOnDevice,  # 4-D, but its causal masks are made without a device
)
# Small widths, the released block counts (so ``middle`` is the released default block), small latents.
TINY["zimage"] = DitSpec(  # default l15
    NextDiTAt,
    dict(NEXTDIT, hidden=32, heads=2, layers=30, context_dim=32, z_image=True, pad_multiple=32, adaln_dim=16),
    latent=16,
    n_txt=16,
    context_dim=32,
    vec_dim=None,
    guidance=False,
)
TINY["lumina2"] = DitSpec(  # default l13
    NextDiTAt,
    dict(NEXTDIT, hidden=64, heads=4, kv_heads=2, layers=26, context_dim=32, z_image=False, pad_multiple=None)
    | dict(theta=10000.0, adaln_dim=16),
    latent=16,
    n_txt=16,
    context_dim=32,
    vec_dim=None,
    guidance=False,
)
TINY["qwenimage"] = DitSpec(  # default j30
    TinyQwen,
    dict(channels=16, hidden=32, heads=2, depth=60, mlp_ratio=2, context_dim=32),
    latent=(16, 1, 16, 16),
    n_txt=16,
    context_dim=32,
    vec_dim=None,
    guidance=False,
    host_model=KModel5d,
)
TINY["wan14b"] = DitSpec(  # default b20; 3 latent frames, each blurred over its own grid
    TinyWan,
    dict(in_dim=16, out_dim=16, dim=32, ffn_dim=48, freq_dim=16, text_dim=32, num_heads=2, num_layers=40),
    latent=(16, 3, 8, 10),
    n_txt=16,
    context_dim=32,
    vec_dim=None,
    guidance=False,
    host_model=KModel5dOnDevice,
)
TINY["anima"] = DitSpec(  # default b14
    AnimaAt,
    dict(in_channels=16, out_channels=16, model_channels=48, num_heads=2, num_blocks=28, mlp_ratio=4.0)
    | dict(crossattn_emb_channels=32, adaln_lora_dim=8),
    latent=(16, 1, 16, 16),
    n_txt=16,
    context_dim=32,
    vec_dim=None,
    guidance=False,
    host_model=KModel5dOnDevice,
)
TINY["krea2"] = DitSpec(  # default s14
    Krea2At,
    dict(channels=16, features=64, heads=4, kvheads=2, layers=28, patch=2, tdim=8, mlp_hidden=96)
    | dict(txtdim=16, txtlayers=3, txtheads=2, txt_mlp_hidden=24),
    latent=(16, 1, 16, 16),
    n_txt=16,
    context_dim=3 * 16,
    vec_dim=None,
    guidance=False,
    host_model=KModel5d,
)
TINY["ernie"] = DitSpec(  # default l18
    ErnieAt,
    dict(channels=32, hidden=32, heads=2, layers=36, patch=1, text_in_dim=32, ffn_hidden=48),
    latent=8,
    n_txt=16,
    context_dim=32,
    vec_dim=None,
    guidance=False,
)
TINY["qwen21"] = DitSpec(  # default s16
    Qwen21At,
    dict(channels=64, hidden=24, heads=2, layers=32, context_dim=16, axes=(4, 4, 4)),
    latent=(64, 8, 10),
    n_txt=16,
    context_dim=16,
    vec_dim=None,
    guidance=False,
    host_model=KModel5dOnDevice,
)
TINY["pixeldit"] = DitSpec(  # default j7
    PixelDiTAt,
    dict(in_channels=3, hidden_size=32, num_groups=2, patch_depth=14, mlp_hidden=48, patch_size=4)
    | dict(pixel_hidden_size=4, pixel_attn_hidden_size=24, pixel_num_groups=2, pixel_depth=2, pixel_mlp_ratio=4)
    | dict(txt_embed_dim=32),
    latent=(3, 32, 32),
    n_txt=16,
    context_dim=32,
    vec_dim=None,
    guidance=False,
)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights on the model's device: ``N(0, 1/fan_in)`` matrices (activations keep their size
    through 57 blocks, bf16 stays finite), small biases, norm scales and weights near 1."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.endswith("scale") or (name.endswith("weight") and parameter.dim() == 1):  # norms (RMSNorm ...)
            parameter.normal_(1.0, 0.1, generator=generator)
        elif name.endswith("bias"):
            parameter.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("pos_embed"):
            parameter.normal_(0.0, 0.5, generator=generator)
        else:
            parameter.normal_(0.0, parameter[0].numel() ** -0.5, generator=generator)


def build_model(spec: DitSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The DiT with random ``dtype`` weights made on ``device`` (no float32 copy, no host transfer)."""
    with torch.device("meta"):
        model = spec.cls(**spec.kwargs)
    model = model.to(dtype).to_empty(device=device)
    init_weights(model)
    return model.eval().requires_grad_(False)


def make_inputs(spec: DitSpec, batch: int, device, dtype):
    """x, sigma, cond, uncond as ``CFGDenoiser`` gets them (one cond entry each, Forge's conds)."""
    g = torch.Generator(device=device).manual_seed(1)

    def entry():
        conds = {
            "c_crossattn": torch.randn(batch, spec.n_txt, spec.context_dim, generator=g, device=device, dtype=dtype)
        }
        if spec.vec_dim is not None:
            conds["y"] = torch.randn(batch, spec.vec_dim, generator=g, device=device, dtype=dtype)
        if spec.guidance:
            conds["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return [{"model_conds": conds, "strength": 1.0}]

    x = torch.randn(batch, *spec.shape, generator=g, device=device, dtype=dtype)
    return x, torch.full((batch,), STEP_SIGMA, device=device, dtype=dtype), entry(), entry()


def padded_wrapper(apply_model: Callable, args: dict) -> torch.Tensor:
    """A model-function wrapper that appends copies of the cond chunks' rows to the call and drops their
    outputs.  On the ``separate`` mode it changes only the calls' batch sizes, as batching does (main
    call: the batched call's rows; SEG call: twice its rows), so its difference from ``separate`` is
    the host's own batch-shape noise, through the same guidance."""
    x, flags = args["input"], args["cond_or_uncond"]
    rows, chunk = x.shape[0], x.shape[0] // len(flags)
    index = torch.cat([torch.arange(i * chunk, (i + 1) * chunk) for i, flag in enumerate(flags) if flag == 0])
    index = torch.cat([torch.arange(rows), index]).to(x.device)

    def pad(value):
        return value[index] if torch.is_tensor(value) and value.dim() and value.shape[0] == rows else value

    c = {key: pad(value) for key, value in args["c"].items()}
    return apply_model(pad(x), pad(args["timestep"]), **c)[:rows]


class ComfyStep:
    """One ComfyUI denoiser evaluation as KSampler runs it: ``comfy.samplers.sampling_function`` on the job's
    current patcher (the imitation's, tests/support/forge_host.py kind ``comfyui``), with the step's call shape."""

    def __init__(self, job: ComfyJob):
        self.job, self.total_steps = job, None

    def __call__(self, x, sigma, cond, uncond, cfg_scale):
        patcher = self.job.sd_model.forge_objects.unet
        samplers = sys.modules["comfy.samplers"]
        return samplers.sampling_function(patcher.model, x, sigma, uncond, cond, cfg_scale, patcher.model_options)


class ComfyJob:
    """What :func:`step` and :func:`suffix_share` read of a job, for ComfyUI: the patcher and one evaluation."""

    def __init__(self, patcher):
        self.sd_model = type("SdModel", (), {})()
        self.sd_model.forge_objects = type("ForgeObjects", (), {"unet": patcher})()
        self.sampler = type("Sampler", (), {})()
        self.sampler.model_wrap_cfg = ComfyStep(self)


def comfy_processing(model: torch.nn.Module, mode: str, layers: str, sigma: float, host_model: type):
    """``(job, layer text)`` for one mode on ComfyUI: the node's ``patch_model`` on a ModelPatcher (``off``: scale
    0, which returns the patcher itself)."""
    from lib_seg.comfy import adapter as comfy

    patcher, text = host.UnetPatcher(host_model(model)), None
    if mode in ("separate", "batched", "off", "padded"):
        settings = comfy.settings(
            scale=0.0 if mode == "off" else 3.0,
            blur_sigma=10.0 if math.isinf(sigma) else sigma,
            infinite_blur=math.isinf(sigma),
            layers=layers,
            start_percent=0.0,
            end_percent=1.0,
        )
        patcher = comfy.patch_model(patcher, settings, batch_rows=mode == "batched")
        text = comfy.layer_text(patcher, layers)
    if mode == "padded":
        patcher = patcher.clone()
        patcher.set_model_unet_function_wrapper(padded_wrapper)
    return ComfyJob(patcher), text


def processing(model: torch.nn.Module, mode: str, layers: str, sigma: float, host_model: type = host.DitModel):
    """``(p, layer text)`` for one mode: ``cfg`` (no extension), ``separate``, ``batched``, ``off`` (SEG
    disabled through the adapter), ``padded`` (``separate`` with every model call padded: the noise floor)."""
    if KIND == host.COMFYUI:
        return comfy_processing(model, mode, layers, sigma, host_model)
    p, text = host.make_processing(KIND, model, model=host_model(model)), None
    if mode in ("separate", "batched", "off", "padded"):
        params = SegParams(enabled=mode != "off", layers=layers, blur_sigma=sigma)
        text = forge.patch_unet(p, params, batch_rows=mode == "batched")
    if mode == "padded":
        patcher = p.sd_model.forge_objects.unet.clone()
        patcher.set_model_unet_function_wrapper(padded_wrapper)
        p.sd_model.forge_objects.unet = patcher
    p.sampler.model_wrap_cfg.total_steps = 10**9
    return p, text


def step(p, inputs, cfg_scale: float) -> tuple[float, torch.Tensor, list[int]]:
    """One denoiser step: its time in ms, the guided x0 prediction, the model rows of each call."""
    x, sigma, cond, uncond = inputs
    model = p.sd_model.forge_objects.unet.model
    model.rows.clear()
    with Timer(x.device) as timer:
        out = p.sampler.model_wrap_cfg(x, sigma, cond, uncond, cfg_scale)
    rows = list(model.rows)
    model.rows.clear()
    model.calls.clear()  # the imitation records every call's options
    return timer.ms, out, rows


@contextmanager
def forge_host_installed() -> Iterator[None]:
    """The Forge 2.x host modules in ``sys.modules`` (pytest's MonkeyPatch undoes it; without pytest,
    as on a bare GPU machine, they simply stay, as in forge_step.py)."""
    try:
        from pytest import MonkeyPatch
    except ImportError:
        sys.modules.update(host.host_modules(KIND))
        yield
        return
    with MonkeyPatch.context() as monkeypatch:
        host.install(monkeypatch, KIND)
        yield


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


def _mark(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed(a, b) -> float:
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1000


def suffix_share(p, model: torch.nn.Module, inputs, cfg_scale: float, layers: str, device, repeats: int) -> float:
    """The share of a CFG-only step spent from the first blurred block to the end of the last block,
    timed (CUDA events around the step and at those two blocks; median of ``repeats`` steps).  From the
    first block where the family runs no prefix reuse (the SEG rows go through every block)."""
    chosen = set(query_target(model).resolve(layers))
    order = blocks_in_order(model)
    reuse = getattr(family_of(model), "prefix_reuse", True)
    first = next(block for layer, block in order if layer in chosen or not reuse)
    marks: dict[str, object] = {}
    handles = [
        first.register_forward_pre_hook(lambda *_: marks.__setitem__("start", _mark(device))),
        order[-1][1].register_forward_hook(lambda *_: marks.__setitem__("end", _mark(device))),
    ]
    shares = []
    try:
        for _ in range(repeats):
            begin = _mark(device)
            step(p, inputs, cfg_scale)
            finish = _mark(device)
            synchronize(device)
            shares.append(_elapsed(marks["start"], marks["end"]) / _elapsed(begin, finish))
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(shares)


def run_case(model, spec_name, batch, cfg_scale, sigma_text, layers, inputs, args, device, host_model) -> dict:
    sigma = math.inf if sigma_text == "inf" else float(sigma_text)
    modes = (*TIMED, "off", "padded")
    made = {mode: processing(model, mode, layers, sigma, host_model) for mode in modes}
    ps, layer_text = {mode: p for mode, (p, _) in made.items()}, made["separate"][1]
    times = {mode: [] for mode in TIMED}
    outs, rows, peaks = {}, {}, {}
    cuda = device.type == "cuda"
    for mode in modes:  # first calls (lazy library set-up, blur operators) before any memory is measured
        _, outs[mode], rows[mode] = step(ps[mode], inputs, cfg_scale)
    for mode in TIMED:  # the rest of the warm-up, and peak memory, one mode at a time
        synchronize(device)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        for _ in range(max(args.warmup - 1, 1)):
            _, outs[mode], rows[mode] = step(ps[mode], inputs, cfg_scale)
        peaks[mode] = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else math.nan
    for _ in range(args.repeats):  # modes interleaved, so clock drift hits all alike
        for mode in TIMED:
            times[mode].append(step(ps[mode], inputs, cfg_scale)[0])
    median = {mode: statistics.median(times[mode]) for mode in TIMED}
    effect = (outs["separate"].float() - outs["cfg"].float()).norm()
    return dict(
        model=spec_name,
        batch=batch,
        cfg=cfg_scale,
        layers=layer_text,
        sigma=sigma_text,
        ms=median,
        ideal=1.0
        + suffix_share(ps["cfg"], model, inputs, cfg_scale, layers, device, args.repeats)
        / (1 if cfg_scale == 1.0 else 2),
        rows={mode: "+".join(map(str, rows[mode])) for mode in TIMED},
        peaks=peaks,
        identical=torch.equal(outs["off"], outs["cfg"]),
        finite=all(bool(torch.isfinite(outs[mode]).all()) for mode in TIMED),
        rel=max_rel(outs["batched"], outs["separate"]),
        floor=max_rel(outs["padded"], outs["separate"]),
        of_effect=float((outs["batched"].float() - outs["separate"].float()).norm() / effect),
    )


def table_row(r: dict, tiny: bool) -> str:
    base = r["ms"]["cfg"]
    ratio = {mode: r["ms"][mode] / base for mode in TIMED}
    peaks = " / ".join("-" if math.isnan(r["peaks"][m]) else f"{r['peaks'][m]:.0f}" for m in TIMED)
    name = f"{r['model']}{' (tiny)' if tiny else ''}"
    return (
        f"| {name} | {r['batch']} | {r['cfg']:g} | {r['layers']} | {r['sigma']} | {base:.1f} | "
        f"{ratio['separate']:.2f}× | {ratio['batched']:.2f}× | {r['ideal']:.2f}× | "
        f"{r['ms']['batched'] / r['ms']['separate']:.2f} | "
        f"{' / '.join(r['rows'][m] for m in TIMED)} | {peaks} | "
        f"{'yes' if r['identical'] else 'NO'} | {r['rel']:.1e} | {r['floor']:.1e} | {r['of_effect']:.1e}"
        f"{'' if r['finite'] else ' (NaN/inf!)'} |"
    )


HEADER = (
    "| model | batch | CFG | layers | sigma | CFG-only ms | separate | batched | ideal batched | batched ÷ separate | "
    "model rows per call: cfg / sep / batched | peak extra MiB cfg / sep / batched | off bit-identical | "
    "max rel. diff batched vs separate | noise floor | ÷ effect |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default=None,
        help=f"model:batch:cfg:sigma, comma-separated (models: {', '.join(FULL)}), or a preset: default (18 cases "
        f"of flux, sd35m, klein4b, klein9b), families ({len(FAMILY_CASES.split(','))} cases of {', '.join(FAMILIES)})",
    )
    parser.add_argument(
        "--layers",
        default="middle",
        help="SEG layer specs, ';'-separated (middle: d7-9,s7-9 / j7-9 / Klein d2,s10 / Z-Image l15 / Lumina 2 l13 / "
        "Qwen-Image j30 / Wan 14B b20 / Anima b14 / Krea 2 s14 / Ernie-Image l18 / PixelDiT j7)",
    )
    parser.add_argument("--device", default=None, help="default: cuda when there is one (--tiny: cpu)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--tiny", action="store_true", help=f"small widths (CPU smoke run; {TINY_CASES})")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 (--tiny: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 (--tiny: 2)")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument(
        "--host",
        default="forge",
        choices=("forge", "comfyui"),
        help="the Forge 2.x imitation (patch_unet) or "
        "ComfyUI's (the node's patch_model; its KSampler skips the uncond at CFG 1 as Forge does)",
    )
    args = parser.parse_args()
    real = {"device": "cuda" if torch.cuda.is_available() else "cpu", "cases": CASES, "warmup": 3, "repeats": 10}
    for key, value in (TINY_RUN if args.tiny else real).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.cases = PRESETS.get(args.cases, args.cases)
    unknown = {case.split(":")[0] for case in args.cases.split(",")} - set(FULL)
    if unknown:
        parser.error(f"unknown models {', '.join(sorted(unknown))} (known: {', '.join(FULL)})")
    if torch.device(args.device).type == "cpu" and not args.tiny:
        parser.error("the full-size models need a GPU (Flux alone is 24 GB of bf16 weights); add --tiny on the CPU")
    if args.dtype is None:  # CPUs without bf16 units run bf16 far slower than float32
        args.dtype = "float32" if torch.device(args.device).type == "cpu" else "bfloat16"
    return args


def main() -> None:
    global KIND
    args = parse_arguments()
    KIND = host.COMFYUI if args.host == "comfyui" else KIND
    started = time.perf_counter()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":  # a smoke run: one thread, so OpenMP does not stall on a busy shared CPU
        torch.set_num_threads(1)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    specs = TINY if args.tiny else FULL
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run, not a benchmark)"
    adapter = "Forge-family adapter on the Forge 2.x"
    if KIND == host.COMFYUI:
        adapter = "ComfyUI node (patch_model) on the ComfyUI"
    header = (
        f"Card: {card}; torch {torch.__version__}; {args.dtype}; {datetime.date.today().isoformat()}; "
        f"{adapter} host imitation; {'tiny widths' if args.tiny else '1024²'}; "
        f"warm-up {args.warmup}, median of {args.repeats} interleaved steps"
    )
    print(header, flush=True)
    cases = [case.split(":") for case in args.cases.split(",")]
    order = list(dict.fromkeys(name for name, *_ in cases))  # build each model once
    results, notes = [], []
    with forge_host_installed(), torch.inference_mode():
        for name in order:
            t0 = time.perf_counter()
            model, host_model = build_model(specs[name], device, dtype), specs[name].host_model
            synchronize(device)
            params = sum(p.numel() for p in model.parameters())
            weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
            note = f"{name}: {params / 1e6:,.1f} M parameters, {weights:.2f} GiB of {args.dtype} weights"
            notes.append(note)
            elapsed = time.perf_counter() - t0
            print(f"[{time.perf_counter() - started:6.0f} s] built {note} in {elapsed:.1f} s", flush=True)
            for case_name, batch, cfg_scale, sigma_text in cases:
                if case_name != name:
                    continue
                inputs = make_inputs(specs[name], int(batch), device, dtype)
                for layers in args.layers.split(";"):
                    r = run_case(
                        model, name, int(batch), float(cfg_scale), sigma_text, layers, inputs, args, device, host_model
                    )
                    results.append(r)
                    print(f"[{time.perf_counter() - started:6.0f} s] {table_row(r, args.tiny)}", flush=True)
            del model, inputs
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    batch1 = [r for r in results if r["batch"] == 1]
    faster = sum(r["ms"]["batched"] < r["ms"]["separate"] for r in batch1)
    summary = [
        *notes,
        f"batch 1: batched faster than the separate call in {faster} of {len(batch1)} cases; "
        f"SEG off bit-identical in {sum(r['identical'] for r in results)} of {len(results)}; "
        f"total run {time.perf_counter() - started:.0f} s",
    ]
    table = "\n".join([header, "", HEADER, *(table_row(r, args.tiny) for r in results), "", *summary, ""])
    print("\n" + table, flush=True)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
