"""A small from-scratch Wan 2.1 / 2.2 with the attention math of Neo's ``backend/nn/wan.py``.

Written from the structure of Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d, ``webui/backend/nn/wan.py``,
``WanModel``); no host code copied.  What SEG must read from it instead of assuming:

* ``forward(x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs)``
  on a 5-D latent ``(B, C, T, H, W)`` (``wan.py:389-419``), every side circularly padded to the
  ``patch_size`` ``(1, 2, 2)``; ``time_dim_concat`` frames are appended along time after padding;
* a ``Conv3d`` ``patch_embedding`` whose output ``(B, dim, T', H', W')`` is flattened frame-major,
  row-major (``wan.py:345-347``);
* position ids ``(t, h, w)`` per token, given to ``rope_embedder`` (Flux's ``EmbedND``: 2x2 rotations
  ``(B, 1, L, D/2, 2, 2)``, axes ``[D - 4(D//6), 2(D//6), 2(D//6)]``), then ``movedim(1, 2)`` to
  ``(B, L, 1, D/2, 2, 2)`` (``wan.py:326, 412-418``);
* ``WanSelfAttention``: ``norm_q`` (``nn.RMSNorm`` over the full width, or ``nn.Identity``) called as a
  module on ``(B, L, dim)``, viewed to ``(B, L, heads, D)``, then interleaved RoPE (``apply_rope1``,
  here as a complex product: an independent spelling) (``wan.py:54-82``);
* cross-attention to the text; the i2v variant adds CLIP image tokens (``img_emb``) before the text and
  attends to them with ``k_img``/``v_img`` (``wan.py:85-137, 356-362``);
* per-token modulation ``e0`` ``(B, T_e, 6, dim)`` and the blocks' 4-D branch (``wan.py:195-209``).

Each block's self-attention honours :class:`tests.support.dit_blocks.Hooks` (``logits``: explicit
softmax, for the slow logit-blur reference; ``seen``: record q, k, v entering attention).
``extra_tokens`` appends tokens after the video (an extension changing the sequence) and
``swap_ids`` gives ``rope_embedder`` ids with rows and columns swapped: both must make SEG skip.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from tests.support import dit_blocks
from tests.support.dit_blocks import EmbedND, Hooks, attend, pad_to_patch, rope_complex
from tests.support.sizes import Sizes


def sinusoidal(dim: int, position: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    angle = torch.outer(position.double(), torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half))
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)


def _norm(dim: int, qk_norm: bool) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-6) if qk_norm else nn.Identity()


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = _norm(dim, qk_norm), _norm(dim, qk_norm)

    def forward(self, x, freqs, hooks: Hooks):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = rope_complex(self.norm_q(self.q(x)).view(b, s, n, d), freqs)  # (B, L, heads, D)
        k = rope_complex(self.norm_k(self.k(x)).view(b, s, n, d), freqs)
        v = self.v(x).view(b, s, n, d)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), hooks)
        return self.o(out.transpose(1, 2).flatten(2))


class WanCrossAttention(nn.Module):
    """Text cross-attention (t2v); ``image=True``: the i2v one, which also attends to CLIP image tokens."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, image: bool = False):
        super().__init__()
        self.num_heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = _norm(dim, qk_norm), _norm(dim, qk_norm)
        self.image = image
        if image:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_k_img = _norm(dim, qk_norm)

    def forward(self, x, context, context_img_len=None):
        heads = self.num_heads
        q = self.norm_q(self.q(x))
        if self.image:
            context_img, context = context[:, :context_img_len], context[:, context_img_len:]
        out = dit_blocks.attention_function(q, self.norm_k(self.k(context)), self.v(context), heads)
        if self.image:
            img_k, img_v = self.norm_k_img(self.k_img(context_img)), self.v_img(context_img)
            out = out + dit_blocks.attention_function(q, img_k, img_v, heads)
        return self.o(out)


def _repeat_e(e: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return e if e.shape[1] <= 1 else torch.repeat_interleave(e, x.shape[1] // e.shape[1], dim=1)


class WanAttentionBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, heads: int, qk_norm: bool = True, image: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, 1e-6, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, heads, qk_norm)
        self.norm3 = nn.LayerNorm(dim, 1e-6, elementwise_affine=True)  # cross_attn_norm=True, as Neo detects
        self.cross_attn = WanCrossAttention(dim, heads, qk_norm, image)
        self.norm2 = nn.LayerNorm(dim, 1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))
        self.hooks = Hooks()

    def forward(self, x, e, freqs, context, context_img_len=257, transformer_options=None):
        e = (self.modulation.unsqueeze(0) + e).unbind(2)  # e0 is (B, T_e, 6, dim): Neo's 4-D branch
        y = self.self_attn(self.norm1(x) * (1 + _repeat_e(e[1], x)) + _repeat_e(e[0], x), freqs, self.hooks)
        x = x + y * _repeat_e(e[2], x)
        x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len)
        y = self.ffn(self.norm2(x) * (1 + _repeat_e(e[4], x)) + _repeat_e(e[3], x))
        return x + y * _repeat_e(e[5], x)


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.norm = nn.LayerNorm(dim, 1e-6, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch) * out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e):
        e = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + _repeat_e(e[1], x)) + _repeat_e(e[0], x))


def video_ids(t_len: int, h_len: int, w_len: int, batch: int, swap: bool = False) -> torch.Tensor:
    t, h, w = torch.meshgrid(torch.arange(t_len), torch.arange(h_len), torch.arange(w_len), indexing="ij")
    ids = torch.stack([t, w, h] if swap else [t, h, w], dim=-1).reshape(1, -1, 3).double()
    return ids.expand(batch, -1, -1)


class TinyWan(nn.Module):
    """Wan at test size; ``model_type="i2v"`` adds ``img_emb`` (CLIP features ``clip_fea`` of ``image_dim``)."""

    SIZES = Sizes(channels=4, hidden=32, heads=2, depth=3, patch=(1, 2, 2), context_dim=12).plus(
        ffn_dim=48, freq_dim=16, out_dim=4, image_dim=6
    )
    HOST_NAMES: ClassVar[dict[str, str]] = dict(  # Wan's keyword names
        in_dim="channels", dim="hidden", num_heads="heads", num_layers="depth", patch_size="patch"
    ) | dict(text_dim="context_dim")

    def __init__(
        self, *, model_type: str = "t2v", qk_norm: bool = True, extra_tokens: int = 0, swap_ids: bool = False, **sizes
    ):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        patch_size, in_dim, dim, num_heads, ffn_dim = s.patch, s.channels, s.hidden, s.heads, s.ffn_dim
        text_dim, freq_dim, out_dim, image_dim = s.context_dim, s.freq_dim, s.out_dim, s.image_dim
        self.patch_size, self.in_dim, self.dim, self.freq_dim, self.out_dim = patch_size, in_dim, dim, freq_dim, out_dim
        self.extra_tokens, self.swap_ids = extra_tokens, swap_ids
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        image = model_type == "i2v"
        self.blocks = nn.ModuleList(WanAttentionBlock(dim, ffn_dim, num_heads, qk_norm, image) for _ in range(s.depth))
        self.head = Head(dim, out_dim, patch_size)
        d = dim // num_heads
        self.rope_embedder = EmbedND((d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)))
        self.img_emb = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, dim)) if image else None

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options=None, **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        bs, _, t, h, w = x.shape
        x = pad_to_patch(x, self.patch_size)
        if time_dim_concat is not None:
            x = torch.cat([x, pad_to_patch(time_dim_concat, self.patch_size)], dim=2)
        grid = [side // p for side, p in zip(x.shape[2:], self.patch_size, strict=True)]
        freqs = self.rope_embedder(video_ids(*grid, bs, self.swap_ids).to(x.device)).movedim(1, 2)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        if self.extra_tokens:  # after the video, at rotation 0 (an extension lengthening the sequence)
            tokens = torch.cat([tokens, tokens[:, : self.extra_tokens]], dim=1)
            freqs = torch.cat([freqs, freqs[:, :1].expand(-1, self.extra_tokens, -1, -1, -1, -1)], dim=1)
        e = self.time_embedding(sinusoidal(self.freq_dim, timestep.flatten()).to(x.dtype))
        e = e.reshape(timestep.shape[0], -1, self.dim)
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        context = self.text_embedding(context)
        context_img_len = None
        if clip_fea is not None and self.img_emb is not None:
            context = torch.cat([self.img_emb(clip_fea), context], dim=1)
            context_img_len = clip_fea.shape[-2]
        transformer_options["total_blocks"] = len(self.blocks)
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            tokens = block(
                tokens,
                e=e0,
                freqs=freqs,
                context=context,
                context_img_len=context_img_len,
                transformer_options=transformer_options,
            )
        out = self.head(tokens, e)[:, : math.prod(grid)]
        out = out.view(bs, *grid, *self.patch_size, self.out_dim)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        out = out.reshape(bs, self.out_dim, *[g * p for g, p in zip(grid, self.patch_size, strict=True)])
        return out[:, :, :t, :h, :w]
