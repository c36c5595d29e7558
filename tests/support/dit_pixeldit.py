"""A small from-scratch PixelDiT / PiD with the attention math and call signature of Neo's ``backend/nn/pixeldit``.

Written from the structure of Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d, ``webui/backend/nn/pixeldit/``
``model.py`` ``PixDiT_T2I``, ``modules.py``, ``pid.py`` ``PidNet``; ComfyUI's ``comfy/ldm/pixeldit`` v0.24.1); no
host code copied.  What SEG must read from it:

* ``forward(x, timesteps, context=None, attention_mask=None, transformer_options={}, **kwargs)`` on RGB pixels:
  padded to the patch (circular, as ``pad_to_patch_size``), ``Hs = ceil(H / p)`` x ``Ws`` patches taken by
  ``F.unfold`` (row-major), the output folded back and cropped;
* 2D RoPE (``precompute_freqs_cis_2d``): positions ``linspace(0, 16, side)`` per axis, the column axis and the row
  axis interleaved pair by pair, ``(L, D/2, 2, 2)``, applied as ``pe[None, None]``;
* ``patch_blocks``: MMDiT joint attention, ``q_norm_x`` (image) / ``q_norm_y`` (text) called as modules, RoPE on
  both (text with 1D positions), ``cat(text, image)``; between blocks PiD gates LQ features into the image
  stream (``_pre_patch_block``: ``lq_proj`` features, every ``interval``-th block);
* ``pixel_blocks``: per-pixel tokens ``(B * L, p * p, C)``, compressed to one token per patch, self-attention over
  the ``Hs x Ws`` patch tokens (``attn.q_norm``, RoPE with the ``pos`` the block passes ``attn``), expanded back.

PiD (``lq=True``): ``lq_proj(lq_latent=, target_pH=, target_pW=)`` maps the model attribute ``lq_latent`` (Neo: the
global ``dynamic_args.lq_latent``, one row per image) to one feature list; its gate concatenates features and
image rows, so any other row count fails in the host, as in Neo.  Every ``attn`` honours a ``hooks`` attribute
(:class:`tests.support.dit_blocks.Hooks`): with ``logits`` set it computes softmax(logits) explicitly.
``patch_attr`` (a lying ``patch_size``) and ``swap_rope`` (rotations of the transposed grid) build models whose
grid SEG must refuse.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.dit_blocks import Hooks, RMSNorm, attend, pad_to_patch, rope_complex
from tests.support.sizes import Sizes


def axis_rope(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """(L,) positions -> (L, dim/2, 2, 2) rotations."""
    omega = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angle = pos.double()[:, None] * omega
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2))


def rope_2d(dim: int, h_len: int, w_len: int, theta: float = 10000.0, swap: bool = False) -> torch.Tensor:
    """(h * w, dim/2, 2, 2): column and row rotations interleaved pair by pair, tokens row-major."""
    if swap:  # the transposed grid's rotations (same count): what SEG must refuse
        return rope_2d(dim, w_len, h_len, theta)
    rows, cols = torch.meshgrid(torch.linspace(0, 16, h_len), torch.linspace(0, 16, w_len), indexing="ij")
    x_rope, y_rope = axis_rope(cols.reshape(-1), dim // 2, theta), axis_rope(rows.reshape(-1), dim // 2, theta)
    return torch.stack([x_rope, y_rope], dim=2).reshape(h_len * w_len, dim // 2, 2, 2)


def _heads(qkv: torch.Tensor, heads: int):
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, head = heads, dim // heads
        self.qkv_x, self.qkv_y = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm_x, self.k_norm_x, self.q_norm_y, self.k_norm_y = (RMSNorm(head) for _ in range(4))
        self.proj_x, self.proj_y = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.hooks = Hooks()

    def forward(self, x, y, pos_img, pos_txt=None, attn_mask=None, transformer_options=None):
        qx, kx, vx = _heads(self.qkv_x(x), self.heads)
        qy, ky, vy = _heads(self.qkv_y(y), self.heads)
        qx, kx, qy, ky = self.q_norm_x(qx), self.k_norm_x(kx), self.q_norm_y(qy), self.k_norm_y(ky)
        qx, kx = rope_complex(qx, pos_img[None, None]), rope_complex(kx, pos_img[None, None])
        if pos_txt is not None:
            qy, ky = rope_complex(qy, pos_txt[None, None]), rope_complex(ky, pos_txt[None, None])
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qy, qx), (ky, kx), (vy, vx)))
        out = attend(q, k, v, self.hooks).transpose(1, 2).flatten(2)
        n_txt = y.shape[1]
        return self.proj_x(out[:, n_txt:]), self.proj_y(out[:, :n_txt])


class PatchBlock(nn.Module):
    """``MMDiTBlockT2I``: RMSNorm + adaLN per stream, joint attention, SwiGLU-less MLPs (the math SEG ignores)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_x1, self.norm_y1, self.norm_x2, self.norm_y2 = (RMSNorm(dim) for _ in range(4))
        self.attn = JointAttention(dim, heads)
        self.mlp_x, self.mlp_y = (
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim)) for _ in range(2)
        )
        self.adaLN_modulation_img, self.adaLN_modulation_txt = nn.Linear(dim, 6 * dim), nn.Linear(dim, 6 * dim)

    def forward(self, x, y, c, pos_img, pos_txt=None, attn_mask=None, transformer_options=None):
        mx, my = self.adaLN_modulation_img(c).chunk(6, dim=-1), self.adaLN_modulation_txt(c).chunk(6, dim=-1)
        attn_x, attn_y = self.attn(
            self.norm_x1(x) * (1 + mx[1]) + mx[0], self.norm_y1(y) * (1 + my[1]) + my[0], pos_img, pos_txt
        )
        x, y = x + mx[2] * attn_x, y + my[2] * attn_y
        x = x + mx[5] * self.mlp_x(self.norm_x2(x) * (1 + mx[4]) + mx[3])
        return x, y + my[5] * self.mlp_y(self.norm_y2(y) * (1 + my[4]) + my[3])


class RotaryAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, head = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = RMSNorm(head), RMSNorm(head)
        self.hooks = Hooks()

    def forward(self, x, pos, mask=None, transformer_options=None):
        q, k, v = _heads(self.qkv(x), self.heads)
        q, k = rope_complex(self.q_norm(q), pos[None, None]), rope_complex(self.k_norm(k), pos[None, None])
        return self.proj(attend(q, k, v, self.hooks).transpose(1, 2).flatten(2))


class PixelBlock(nn.Module):
    """``PiTBlock``: (B * L, p * p, C) pixel tokens, compressed to (B, L, attn_dim) for ``attn``, expanded back."""

    def __init__(self, pixel_dim: int, patch_dim: int, patch: int, attn_dim: int, heads: int, swap_rope: bool):
        super().__init__()
        p2, self.pixel_dim, self.attn_dim, self.swap_rope = patch * patch, pixel_dim, attn_dim, swap_rope
        self.heads = heads
        self.compress_to_attn, self.expand_from_attn = (
            nn.Linear(p2 * pixel_dim, attn_dim),
            nn.Linear(attn_dim, p2 * pixel_dim),
        )
        self.norm1, self.norm2 = RMSNorm(pixel_dim), RMSNorm(pixel_dim)
        self.attn = RotaryAttention(attn_dim, heads)
        self.mlp = nn.Sequential(nn.Linear(pixel_dim, 2 * pixel_dim), nn.GELU(), nn.Linear(2 * pixel_dim, pixel_dim))
        self.adaLN_modulation_msa = nn.Linear(patch_dim, 3 * pixel_dim * p2)
        self.adaLN_modulation_mlp = nn.Linear(patch_dim, 3 * pixel_dim * p2)

    def forward(self, x, s_cond, image_height, image_width, patch_size, mask=None, transformer_options=None):
        rows, p2, _ = x.shape
        h_len, w_len = image_height // patch_size, image_width // patch_size
        shift, scale, gate = self.adaLN_modulation_msa(s_cond).view(rows, p2, -1).chunk(3, dim=-1)
        compressed = self.compress_to_attn((self.norm1(x) * (1 + scale) + shift).reshape(rows, -1))
        pos = rope_2d(self.attn_dim // self.heads, h_len, w_len, swap=self.swap_rope).to(x.device)
        out = self.attn(compressed.view(-1, h_len * w_len, self.attn_dim), pos, mask=mask)
        x = x + gate * self.expand_from_attn(out.reshape(rows, self.attn_dim)).view(rows, p2, -1)
        shift, scale, gate = self.adaLN_modulation_mlp(s_cond).view(rows, p2, -1).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm2(x) * (1 + scale) + shift)


class LQProjection(nn.Module):
    """PiD's ``lq_proj``: the LQ latent, resized to the patch grid, to one feature map per gated block."""

    def __init__(self, channels: int, dim: int, outputs: int, interval: int):
        super().__init__()
        self.interval = interval
        self.latent_proj = nn.Conv2d(channels, dim, 3, padding=1)
        self.output_heads = nn.ModuleList(nn.Linear(dim, dim) for _ in range(outputs))
        self.gate_modules = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(outputs))

    def forward(self, lq_latent, target_pH, target_pW):
        feature = self.latent_proj(F.interpolate(lq_latent, size=(target_pH, target_pW), mode="nearest"))
        tokens = feature.flatten(2).transpose(1, 2)
        return [head(tokens) for head in self.output_heads]

    def gate(self, x, lq, index):
        return x + torch.sigmoid(self.gate_modules[index](torch.cat([x, lq], dim=-1))) * lq


class TinyPixelDiT(nn.Module):
    SIZES = Sizes(channels=3, hidden=32, heads=2, depth=3, patch=4, context_dim=12).plus(
        pixel_hidden_size=4, pixel_attn_hidden_size=24, pixel_num_groups=2, pixel_depth=2
    )
    HOST_NAMES: ClassVar[dict[str, str]] = dict(  # PixelDiT's keyword names
        in_channels="channels", hidden_size="hidden", num_groups="heads", patch_depth="depth", patch_size="patch"
    ) | dict(txt_embed_dim="context_dim")

    def __init__(self, *, lq: bool = False, patch_attr: int | None = None, swap_rope: bool = False, **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        in_channels, hidden_size, num_groups, patch_depth, patch_size = s.channels, s.hidden, s.heads, s.depth, s.patch
        pixel_hidden_size, pixel_attn_hidden_size = s.pixel_hidden_size, s.pixel_attn_hidden_size
        pixel_num_groups = s.pixel_num_groups
        self.in_channels, self.hidden_size, self.num_groups = in_channels, hidden_size, num_groups
        self.patch, self.patch_size, self.swap_rope = (
            patch_size,
            patch_size if patch_attr is None else patch_attr,
            swap_rope,
        )
        self.pixel_embedder = nn.Linear(in_channels, pixel_hidden_size)
        self.s_embedder = nn.Linear(in_channels * patch_size**2, hidden_size)
        self.t_embedder = nn.Sequential(nn.Linear(16, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.y_embedder = nn.Linear(s.context_dim, hidden_size)
        self.patch_blocks = nn.ModuleList(PatchBlock(hidden_size, num_groups) for _ in range(patch_depth))
        self.pixel_blocks = nn.ModuleList(
            PixelBlock(pixel_hidden_size, hidden_size, patch_size, pixel_attn_hidden_size, pixel_num_groups, swap_rope)
            for _ in range(s.pixel_depth)
        )
        self.final_layer = nn.Linear(pixel_hidden_size, in_channels)
        self.lq_latent: torch.Tensor | None = None  # PiD: Neo's ``dynamic_args.lq_latent[0]``
        if lq:
            self.lq_proj = LQProjection(in_channels, hidden_size, (patch_depth + 1) // 2, interval=2)

    def _pre_patch_block(self, s, i, lq_features):
        if lq_features is None or i % self.lq_proj.interval:
            return s
        return self.lq_proj.gate(s, lq_features[i // self.lq_proj.interval], i // self.lq_proj.interval)

    def forward(self, x, timesteps, context=None, attention_mask=None, transformer_options=None, **kwargs):
        height, width, p = x.shape[-2], x.shape[-1], self.patch
        x = pad_to_patch(x, p)
        batch, _, H, W = x.shape
        h_len, w_len = H // p, W // p
        head = self.hidden_size // self.num_groups
        pos_img = rope_2d(head, h_len, w_len, swap=self.swap_rope).to(x.device)
        pos_txt = axis_rope(torch.arange(context.shape[1], device=x.device), head, 10000.0)
        freqs = torch.exp(-math.log(10.0) * torch.arange(8, dtype=torch.float64, device=x.device) / 8)
        angle = timesteps.view(-1, 1).double() * freqs
        t_emb = self.t_embedder(torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1).to(x.dtype)).unsqueeze(1)
        y = self.y_embedder(context)
        lq = None
        if hasattr(self, "lq_proj"):
            lq = self.lq_proj(lq_latent=self.lq_latent.to(x), target_pH=h_len, target_pW=w_len)
        s = self.s_embedder(F.unfold(x, kernel_size=p, stride=p).transpose(1, 2))
        condition = F.silu(t_emb)
        for i, block in enumerate(self.patch_blocks):
            s = self._pre_patch_block(s, i, lq)
            s, y = block(s, y, condition, pos_img, pos_txt, None, transformer_options=transformer_options)
        s_cond = F.silu(t_emb + s).reshape(batch * h_len * w_len, self.hidden_size)
        pixels = self.pixel_embedder(x.permute(0, 2, 3, 1))  # (B, H, W, C)
        pixels = (
            pixels.view(batch, h_len, p, w_len, p, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(batch * h_len * w_len, p * p, -1)
        )
        for block in self.pixel_blocks:
            pixels = block(pixels, s_cond, H, W, p, mask=None, transformer_options=transformer_options)
        out = self.final_layer(pixels).view(batch, h_len * w_len, p * p, -1).permute(0, 3, 2, 1)
        out = F.fold(out.reshape(batch, -1, h_len * w_len), (H, W), kernel_size=p, stride=p)
        return out[..., :height, :width]
