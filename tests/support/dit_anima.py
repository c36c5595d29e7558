"""A small from-scratch Anima (Cosmos-Predict2 structure) with the attention math of Neo's ``backend/nn/anima.py``.

Written from the structure of Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d, ``webui/backend/nn/anima.py``,
class ``Anima``) and Neo 2.29 (youlijie/sd-webui-forge-classic b3b8a1e5, ``backend/nn/anima.py``); no host
code copied.  What SEG must read from it instead of assuming:

* ``forward(x, timesteps, context, padding_mask=None, **kwargs)`` on a 5-D latent ``(B, C, T, H, W)``
  (Neo's Wan-VAE latents; images have T = 1), ``context`` the LLM adapter's output (Neo runs the
  adapter in the text encoder, ``loader.py:765``), ``transformer_options`` from the keywords, handed to
  every block (2.29 line 495); reference latents are appended along time before the padding to the
  patch (2.26 ``anima.py:459-468``, 2.29 lines 474-479; Neo reads them from ``dynamic_args.ref_latents``,
  here the ``ref_latents`` keyword, one per row);
* ``x_embedder``: a zero padding-mask channel is concatenated, ``(t r) (h m) (w n)`` patches become
  ``(B, T, H, W, D)`` tokens (``anima.py:196-218, 439-447``); ``pos_embedder`` gives one 2x2 rotation
  per channel pair and token, ``(L, D/2, 2, 2)`` in ``(t h w)`` order, axes ``[t, h, w]`` with NTK
  factors (``anima.py:27-82``); the blocks get it as ``rope_emb_L_1_1_D`` ``(1, L, 1, D/2, 2, 2)``;
* ``Block.forward(x_B_T_H_W_D, emb_B_T_D, crossattn_emb, rope_emb_L_1_1_D=None, adaln_lora_B_T_3D=None,
  extra_per_block_pos_emb=None, transformer_options={})`` flattens ``t h w`` itself (``anima.py:281-367``);
* ``SelfCrossAttention``: 2.26 calls ``q_norm`` (``nn.RMSNorm`` over the head width) as a module on
  ``(B, L, heads, D)``, then split-half RoPE on the self-attention only (pairs ``(k, k + D/2)``,
  ``comfy_kitchen.apply_rope_split_half``; here as a complex product, an independent spelling)
  (``anima.py:99-154``).  ``fused=True`` is 2.29 (lines 146-153): the self-attention's norm and rotation
  are one kernel, ``ck.rms_rope_split_half(q, k, rope_emb, q_scale, k_scale, eps)``, which only reads the
  norms' weights (no q-norm module runs); the cross-attention still calls its norms as modules;
* both attentions then call the module-global ``attention_function(q_B_H_S_D, k_B_H_S_D, v_B_H_S_D, heads,
  skip_reshape=True, transformer_options=...)`` (2.26 line 146, 2.29 line 166), here
  :func:`tests.support.dit_blocks.neo_attention` (with ``wrap_attn``).  ``kernel="private"`` makes the
  self-attention attend by itself, reaching no seam (as a fused build might).

Each block's self-attention honours :class:`tests.support.dit_blocks.Hooks` (``Block.hooks``: ``logits``,
``seen``), its cross-attention ``Block.cross_hooks`` (``seen``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from tests.support.dit_blocks import Hooks, attend, neo_attention, pad_to_patch
from tests.support.sizes import Sizes

attention_function = neo_attention  # Neo: ``from backend.attention import attention_function``


def rope_split_half(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Split-half RoPE as a complex product: ``x[k] + i x[k + D/2]`` times ``e^{i angle_k}`` read off ``rope``."""
    half = x.shape[-1] // 2
    turn = torch.complex(rope[..., 0, 0], rope[..., 1, 0])
    work = torch.promote_types(x.dtype, torch.float32)
    z = torch.complex(x[..., :half].to(work), x[..., half:].to(work)) * turn
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


class VideoRope3D(nn.Module):
    """``pos_embedder``: rotations for a ``(B, T, H, W, D)`` token grid, axes ``[t | h | w]`` over the pairs."""

    def __init__(self, head_dim: int, h_ratio: float = 4.0, w_ratio: float = 4.0, t_ratio: float = 1.0):
        super().__init__()
        self.dim_h = self.dim_w = head_dim // 6 * 2
        self.dim_t = head_dim - 2 * self.dim_h
        self.factors = {
            "t": t_ratio ** (self.dim_t / (self.dim_t - 2)),
            "h": h_ratio ** (self.dim_h / (self.dim_h - 2)),
        }
        self.factors["w"] = w_ratio ** (self.dim_w / (self.dim_w - 2))

    def _axis(self, length: int, dim: int, factor: float) -> torch.Tensor:
        freqs = 1.0 / (10000.0 * factor) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angle = torch.outer(torch.arange(length, dtype=torch.float64), freqs)
        return torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], dim=-1).unflatten(-1, (2, 2))

    def forward(self, x_B_T_H_W_C: torch.Tensor, device=None) -> torch.Tensor:
        _, t, h, w, _ = x_B_T_H_W_C.shape
        axes = {
            "t": self._axis(t, self.dim_t, self.factors["t"])[:, None, None].expand(t, h, w, -1, 2, 2),
            "h": self._axis(h, self.dim_h, self.factors["h"])[None, :, None].expand(t, h, w, -1, 2, 2),
            "w": self._axis(w, self.dim_w, self.factors["w"])[None, None, :].expand(t, h, w, -1, 2, 2),
        }
        return torch.cat([axes["t"], axes["h"], axes["w"]], dim=-3).reshape(t * h * w, -1, 2, 2).to(device)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class SelfCrossAttention(nn.Module):
    def __init__(
        self, query_dim: int, context_dim: int | None, heads: int, head_dim: int, fused=False, kernel="global"
    ):
        super().__init__()
        self.is_self, self.fused, self.kernel = context_dim is None, fused, kernel
        self.heads, self.head_dim = heads, head_dim
        inner, source = heads * head_dim, context_dim or query_dim
        self.q_proj = nn.Linear(query_dim, inner, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.k_proj = nn.Linear(source, inner, bias=False)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.v_proj = nn.Linear(source, inner, bias=False)
        self.v_norm = nn.Identity()
        self.output_proj = nn.Linear(inner, query_dim, bias=False)

    def forward(self, x, context=None, rope_emb=None, transformer_options=None, hooks: Hooks | None = None):
        source = x if context is None else context
        q, k, v = (
            t.unflatten(-1, (self.heads, self.head_dim))
            for t in (self.q_proj(x), self.k_proj(source), self.v_proj(source))
        )  # (B, L, heads, D)
        rotate = self.is_self and rope_emb is not None
        if rotate and self.fused:  # 2.29 ck.rms_rope_split_half: the norms' weights only, no module call
            q, k = _rms(q, self.q_norm.weight, self.q_norm.eps), _rms(k, self.k_norm.weight, self.k_norm.eps)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotate:
            q, k = rope_split_half(q, rope_emb), rope_split_half(k, rope_emb)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), self.v_norm(v).transpose(1, 2)  # (B, heads, L, D)
        if self.kernel == "private" and self.is_self:
            return self.output_proj(attend(q, k, v, hooks or Hooks()).transpose(1, 2).flatten(2))
        options = transformer_options
        out = attention_function(q, k, v, self.heads, skip_reshape=True, transformer_options=options, hooks=hooks)
        return self.output_proj(out)


def _adaln(dim: int, lora: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora, bias=False), nn.Linear(lora, 3 * dim, bias=False))


def _modulate(x: torch.Tensor, norm: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return norm(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class Block(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, mlp_ratio=2.0, lora=8, fused=False, kernel="global"):
        super().__init__()
        self.layer_norm_self_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfCrossAttention(dim, None, heads, dim // heads, fused, kernel)
        self.layer_norm_cross_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = SelfCrossAttention(dim, context_dim, heads, dim // heads)
        self.layer_norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))
        self.adaln_modulation_self_attn = _adaln(dim, lora)
        self.adaln_modulation_cross_attn = _adaln(dim, lora)
        self.adaln_modulation_mlp = _adaln(dim, lora)
        self.hooks, self.cross_hooks = Hooks(), Hooks()

    def forward(
        self,
        x_B_T_H_W_D,
        emb_B_T_D,
        crossattn_emb,
        rope_emb_L_1_1_D=None,
        adaln_lora_B_T_3D=None,
        extra_per_block_pos_emb=None,
        transformer_options=None,
    ):
        x = x_B_T_H_W_D
        mods = [
            (module(emb_B_T_D) + adaln_lora_B_T_3D).chunk(3, dim=-1)
            for module in (self.adaln_modulation_self_attn, self.adaln_modulation_cross_attn, self.adaln_modulation_mlp)
        ]
        shape = x.shape
        (shift, scale, gate), (c_shift, c_scale, c_gate), (m_shift, m_scale, m_gate) = mods
        options = transformer_options
        tokens = _modulate(x, self.layer_norm_self_attn, scale, shift).flatten(1, 3)
        result = self.self_attn(tokens, None, rope_emb_L_1_1_D, options, hooks=self.hooks).view(shape)
        x = x + gate[:, :, None, None] * result
        tokens = _modulate(x, self.layer_norm_cross_attn, c_scale, c_shift).flatten(1, 3)
        result = self.cross_attn(tokens, crossattn_emb, rope_emb_L_1_1_D, options, hooks=self.cross_hooks)
        x = x + c_gate[:, :, None, None] * result.view(shape)
        return x + m_gate[:, :, None, None] * self.mlp(_modulate(x, self.layer_norm_mlp, m_scale, m_shift))


class PatchEmbed(nn.Module):
    def __init__(self, spatial: int, temporal: int, channels: int, dim: int):
        super().__init__()
        self.spatial_patch_size, self.temporal_patch_size = spatial, temporal
        self.linear = nn.Linear(channels * spatial * spatial * temporal, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # "b c (t r) (h m) (w n) -> b t h w (c r m n)"
        b, c, t, h, w = x.shape
        r, m = self.temporal_patch_size, self.spatial_patch_size
        x = x.reshape(b, c, t // r, r, h // m, m, w // m, m).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return self.linear(x.reshape(b, t // r, h // m, w // m, -1))


class TinyAnima(nn.Module):
    SIZES = Sizes(channels=4, hidden=32, heads=2, depth=3, patch=2, context_dim=12).plus(
        out_channels=4, patch_temporal=1, adaln_lora_dim=8
    )
    HOST_NAMES: ClassVar[dict[str, str]] = dict(  # Cosmos' keyword names
        in_channels="channels", model_channels="hidden", num_heads="heads", num_blocks="depth", patch_spatial="patch"
    ) | dict(crossattn_emb_channels="context_dim")

    def __init__(self, *, fused: bool = False, kernel: str = "global", **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        in_channels, out_channels, patch_spatial, patch_temporal = s.channels, s.out_channels, s.patch, s.patch_temporal
        model_channels, num_heads, adaln_lora_dim = s.hidden, s.heads, s.adaln_lora_dim
        self.out_channels, self.patch_spatial, self.patch_temporal = out_channels, patch_spatial, patch_temporal
        self.model_channels = model_channels
        self.pos_embedder = VideoRope3D(model_channels // num_heads)
        self.t_embedder = nn.Sequential(  # TimestepEmbedding's adaLN-LoRA branch (its first output is the input)
            nn.Linear(model_channels, model_channels, bias=False),
            nn.SiLU(),
            nn.Linear(model_channels, 3 * model_channels, bias=False),
        )
        self.x_embedder = PatchEmbed(patch_spatial, patch_temporal, in_channels + 1, model_channels)
        self.blocks = nn.ModuleList(
            Block(model_channels, s.context_dim, num_heads, 2.0, adaln_lora_dim, fused, kernel) for _ in range(s.depth)
        )
        self.final_norm = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Linear(model_channels, 2 * model_channels, bias=False)
        self.final_linear = nn.Linear(model_channels, patch_spatial**2 * patch_temporal * out_channels, bias=False)
        self.t_embedding_norm = nn.RMSNorm(model_channels, eps=1e-6)

    def _timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.model_channels // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
        angle = timesteps.flatten().double()[:, None] * freqs[None]
        return torch.cat([angle.cos(), angle.sin()], dim=-1).view(*timesteps.shape, -1)

    def forward(self, x, timesteps, context, padding_mask=None, ref_latents=None, **kwargs):
        t, h, w = x.shape[2:]
        for ref in ref_latents or []:
            x = torch.cat([x, ref.to(x)], dim=2)
        x = pad_to_patch(x, (self.patch_temporal, self.patch_spatial, self.patch_spatial))
        mask = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=x.dtype)
        tokens = self.x_embedder(torch.cat([x, mask], dim=1))  # (B, T, H, W, D)
        rope = self.pos_embedder(tokens, device=x.device)
        timesteps = timesteps.unsqueeze(1) if timesteps.dim() == 1 else timesteps
        sample = self._timesteps(timesteps).to(x.dtype)
        emb, lora = self.t_embedding_norm(sample), self.t_embedder(sample)
        options = kwargs.get("transformer_options", {})  # Neo: ``kwargs.get("transformer_options", {})``
        kwargs = {"rope_emb_L_1_1_D": rope.unsqueeze(1).unsqueeze(0), "adaln_lora_B_T_3D": lora}
        for block in self.blocks:
            tokens = block(tokens, emb, context, **kwargs, extra_per_block_pos_emb=None, transformer_options=options)
        shift, scale = (self.final_mod(emb) + lora[..., : 2 * self.model_channels]).chunk(2, dim=-1)
        out = self.final_linear(_modulate(tokens, self.final_norm, scale, shift))
        b, tt, hh, ww, _ = out.shape
        p, r = self.patch_spatial, self.patch_temporal
        out = out.view(b, tt, hh, ww, p, p, r, self.out_channels).permute(0, 7, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, self.out_channels, tt * r, hh * p, ww * p)[:, :, :t, :h, :w]
