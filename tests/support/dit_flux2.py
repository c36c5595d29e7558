"""A small from-scratch Flux.2 (Klein) with the attention math of Neo's ``backend/nn/flux.py``.

Written from the structure of Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d, ``webui/backend/nn/flux.py``,
the class ``IntegratedFluxTransformer2DModel`` built with the ``flux2`` config that
``modules_forge/packages/huggingface_guess/detection.py`` derives); no host code copied.  What makes it
Flux.2 rather than Flux.1, and what SEG must read from the model instead of assuming:

* ``patch_size`` 1 (Flux.1: 2): one token per latent pixel, ``(B, C, H, W) -> (B, H*W, C)``, patches
  row-major as ``rearrange("b c (h ph) (w pw) -> b (h w) (c ph pw)")`` orders them;
* 4 RoPE axes (``axes_dim`` 32 x 4 at full size, theta 2000): image ids ``(index, row, col, 0)``, text
  ids ``(0, 0, 0, t)`` (``txt_ids_dims = [3]``); ``pe_embedder(ids)`` concatenates the axes' rotations
  into the same ``(B, 1, L, D/2, 2, 2)`` as Flux.1;
* one shared modulation (``global_modulation``): the blocks have no ``img_mod``/``modulation`` of
  their own; the model computes ``double_stream_modulation_img/txt(vec)`` and
  ``single_stream_modulation(vec)`` once and passes the blocks tuples of ``ModulationOut`` dataclasses
  as ``vec``;
* reference images (Klein edit, Neo's ``ref_latents``) follow the image with ids index 1.

The blocks call their QK-norm as a module (``img_attn.norm(q, k, v)``, ``norm(q, k, v)``) before RoPE,
as Neo does, and honour :class:`tests.support.dit_blocks.Hooks` for the slow logit-blur reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.dit_blocks import (
    EmbedND,
    Hooks,
    QKNorm,
    attend,
    check_axes,
    pad_to_patch,
    patchify,
    rope_complex,
    unpatchify,
)
from tests.support.sizes import Sizes

AXES2 = (4, 4, 4, 4)  # four RoPE axes summing to the head width (hidden 32 / 2 heads)
THETA2 = 2000.0


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class SharedModulation(nn.Module):
    """``Modulation(dim, double)`` without bias, applied once per model call: ``(mod1, mod2 | None)``."""

    def __init__(self, hidden: int, double: bool):
        super().__init__()
        self.double = double
        self.lin = nn.Linear(hidden, (6 if double else 3) * hidden, bias=False)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None].chunk(6 if self.double else 3, dim=-1)
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.double else None)


def _modulate(x: torch.Tensor, mod: ModulationOut) -> torch.Tensor:
    return (1 + mod.scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + mod.shift


class _Attention(nn.Module):
    """``SelfAttention``: qkv, QK-norm ``norm``, projection (the names the hooks find)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)

    def qkv_of(self, x: torch.Tensor):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v


def _mlp(hidden: int, ratio: int) -> nn.Sequential:  # Flux.2's SiLU-gated MLP (``mlp_silu_act``)
    gate_in = nn.Linear(hidden, 2 * ratio * hidden, bias=False)
    return nn.Sequential(gate_in, _SiLUGate(), nn.Linear(ratio * hidden, hidden, bias=False))


class _SiLUGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class DoubleStreamBlock2(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.img_attn, self.txt_attn = _Attention(hidden, heads), _Attention(hidden, heads)
        self.img_mlp, self.txt_mlp = _mlp(hidden, mlp_ratio), _mlp(hidden, mlp_ratio)
        self.hooks = Hooks()

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options=None):
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
        img_q, img_k, img_v = self.img_attn.qkv_of(_modulate(img, img_mod1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_of(_modulate(txt, txt_mod1))
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        out = attend(rope_complex(q, pe), rope_complex(k, pe), v, self.hooks).transpose(1, 2).flatten(2)
        n_txt = txt.shape[1]
        img = img + img_mod1.gate * self.img_attn.proj(out[:, n_txt:])
        img = img + img_mod2.gate * self.img_mlp(_modulate(img, img_mod2))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(out[:, :n_txt])
        txt = txt + txt_mod2.gate * self.txt_mlp(_modulate(txt, txt_mod2))
        return img, txt


class SingleStreamBlock2(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads, self.hidden, self.mlp_width = heads, hidden, mlp_ratio * hidden
        self.linear1 = nn.Linear(hidden, 3 * hidden + 2 * self.mlp_width, bias=False)
        self.norm = QKNorm(hidden // heads)
        self.linear2 = nn.Linear(hidden + self.mlp_width, hidden, bias=False)
        self.mlp_act = _SiLUGate()
        self.hooks = Hooks()

    def forward(self, x, vec, pe, attn_mask=None, transformer_options=None):
        mod = vec
        qkv, mlp = self.linear1(_modulate(x, mod)).split([3 * self.hidden, 2 * self.mlp_width], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        out = attend(rope_complex(q, pe), rope_complex(k, pe), v, self.hooks).transpose(1, 2).flatten(2)
        return x + mod.gate * self.linear2(torch.cat([out, self.mlp_act(mlp)], dim=-1))


def image_ids(h_len: int, w_len: int, index: float, batch: int, device) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h_len), torch.arange(w_len), indexing="ij")
    ids = torch.stack([torch.full_like(rows, 0) + index, rows, cols, torch.zeros_like(rows)], dim=-1)
    return ids.reshape(1, -1, 4).double().expand(batch, -1, -1).to(device)


class TinyFlux2(nn.Module):
    """Flux.2 layout at test size: ``forward(x, timestep, context, y=None, guidance=None, ref_latents=None)``
    as Neo's ``KModel.apply_model`` calls it (``context`` the Qwen3 hidden states; no pooled vector).
    The keyword arguments also build the released sizes (``benchmarks/dit_step.py``: Klein 4B hidden 3072,
    24 heads of 128, 5 + 20 blocks, MLP ratio 3, 128 latent channels, context 7680 = 3 Qwen3-4B layers).

    ``expose_patch``: keep the ``patch_size`` attribute (Neo has it); without it SEG must read the patch
    from ``img_in``'s width.  ``patch_attr``: a deliberately wrong ``patch_size`` to check that the
    model's position ids catch it."""

    global_modulation = True

    SIZES = Sizes(channels=8, hidden=32, heads=2, depth=2, single=3, patch=1, mlp_ratio=2, context_dim=12, axes=AXES2)

    def __init__(self, *, expose_patch: bool = True, patch_attr: int | None = None, **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        channels, hidden, heads, patch, mlp_ratio, axes = s.channels, s.hidden, s.heads, s.patch, s.mlp_ratio, s.axes
        check_axes(axes, hidden, heads)
        self.channels, self.patch = channels, patch
        if expose_patch:
            self.patch_size = patch if patch_attr is None else patch_attr
        self.pe_embedder = EmbedND(axes, THETA2)
        self.img_in = nn.Linear(channels * patch * patch, hidden, bias=False)
        self.time_in = nn.Linear(1, hidden, bias=False)
        self.txt_in = nn.Linear(s.context_dim, hidden, bias=False)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock2(hidden, heads, mlp_ratio) for _ in range(s.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock2(hidden, heads, mlp_ratio) for _ in range(s.single))
        self.double_stream_modulation_img = SharedModulation(hidden, double=True)
        self.double_stream_modulation_txt = SharedModulation(hidden, double=True)
        self.single_stream_modulation = SharedModulation(hidden, double=False)
        self.final_layer = nn.Linear(hidden, channels * patch * patch, bias=False)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, **kwargs):
        batch, _, height, width = x.shape
        p = self.patch
        padded = pad_to_patch(x, p)
        h_len, w_len = padded.shape[-2] // p, padded.shape[-1] // p
        img = self.img_in(patchify(padded, p))
        ids = [image_ids(h_len, w_len, 0, batch, x.device)]
        if ref_latents is not None:  # Klein edit: reference tokens after the image, ids index 1
            ref = pad_to_patch(ref_latents, p)
            img = torch.cat([img, self.img_in(patchify(ref, p))], dim=1)
            ids.append(image_ids(ref.shape[-2] // p, ref.shape[-1] // p, 1, batch, x.device))
        txt = self.txt_in(context)
        txt_ids = torch.zeros(batch, txt.shape[1], 4, dtype=torch.float64, device=x.device)
        txt_ids[..., 3] = torch.arange(txt.shape[1], dtype=torch.float64, device=x.device)
        pe = self.pe_embedder(torch.cat([txt_ids, *ids], dim=1)).to(torch.promote_types(x.dtype, torch.float32))
        vec = self.time_in(timestep[:, None].to(x.dtype))
        mods = (self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=mods, pe=pe)
        joint = torch.cat([txt, img], dim=1)
        single_mod, _ = self.single_stream_modulation(vec)
        for block in self.single_blocks:
            joint = block(joint, vec=single_mod, pe=pe)
        out = self.final_layer(joint[:, txt.shape[1] : txt.shape[1] + h_len * w_len])
        return unpatchify(out, self.channels, h_len, w_len, p)[..., :height, :width]
