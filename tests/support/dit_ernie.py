"""A small from-scratch Ernie-Image with the attention math and call signature of Neo's ``backend/nn/ernie.py``.

Written from the structure of Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d, ``webui/backend/nn/ernie.py``,
``ErnieImageModel``; ComfyUI's ``comfy/ldm/ernie/model.py``); no host code copied.  What SEG must read from it:

* ``forward(x, timesteps, context, **kwargs)`` (lines 231-287): ``x`` (B, C, H, W), a stride-``patch``
  convolution ``x_embedder.proj`` without pad (``H // p`` rows), tokens row-major; ``context`` the text
  (B, T, text_in_dim), projected by ``text_proj``;
* one sequence ``cat(image, text)``, image FIRST; position ids image ``(T, row, col)``, text ``(t, 0, 0)``,
  turned by ``pos_embed`` into per-token 2x2 maps ``(B, L, 1, D/2, 2, 2)`` for split-half channel pairs
  ``(i, i + D/2)``: ``[[cos a, -sin a], [sin b, cos b]]`` with ``a`` angle ``i // 2`` and ``b`` angle
  ``D/4 + i // 2`` (``ErnieImageEmbedND3``, lines 28-47), which ``comfy_kitchen.apply_rope_split_half``
  applies as given (no rotation: the two angles differ);
* ``layers`` of ``ErnieImageSharedAdaLNBlock`` (one shared adaLN modulation, passed as a list of six tensors);
  ``self_attention``: ``to_q/to_k/to_v``, ``norm_q``/``norm_k`` per head on (B, L, heads, D), the RoPE map,
  then this module's global :func:`attention_function` called by name with (B, L, heads * D) tensors, as Neo
  calls ``backend.attention.attention_function`` (the seam SEG wraps).

Each ``self_attention`` hands its ``hooks`` (:class:`tests.support.dit_blocks.Hooks`) to that call: with ``logits``
set it computes softmax(logits) explicitly, for the slow reference; ``seen`` records q, k, v as they entered.
``patch_attr`` (a lying ``patch_size``) and ``transpose_ids`` (ids laid column-major) build the models whose grid
SEG must refuse.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.dit_blocks import EmbedND, Hooks, RMSNorm, attend, check_axes
from tests.support.sizes import Sizes

AXES = (4, 6, 6)  # head width 16 (hidden 32 / 2 heads); Ernie-Image: (32, 48, 48) of 128
THETA = 256.0


def attention_function(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, hooks=None, **kwargs):
    """Neo's ``backend.attention.attention_function`` signature; attends through
    :func:`tests.support.dit_blocks.attend`, which calls the shared test kernel by attribute.  ``hooks`` is the
    tests' own extra, as :func:`tests.support.dit_blocks.neo_attention` takes it (the slow reference's logit
    hook and the q/k/v record, after SEG's wrapper of this module global)."""
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return attend(q, k, v, hooks or Hooks(), mask).transpose(1, 2).flatten(2)


def split_half_maps(ids: torch.Tensor, axes: tuple[int, ...], theta: float) -> torch.Tensor:
    """``pos_embed``: (B, L, 3) ids -> (B, L, 1, D/2, 2, 2) maps for the pairs (i, i + D/2), float64."""
    omegas = [theta ** -(torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d) for d in axes]
    angles = torch.cat([ids[..., n, None].double() * omega for n, omega in enumerate(omegas)], dim=-1)
    quarter = angles.shape[-1] // 2  # D/4
    a = angles[..., :quarter].repeat_interleave(2, dim=-1)
    b = angles[..., quarter:].repeat_interleave(2, dim=-1)
    maps = torch.stack([torch.cos(a), -torch.sin(a), torch.sin(b), torch.cos(b)], dim=-1)
    return maps.unflatten(-1, (2, 2)).unsqueeze(2)


def apply_split_half(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """x (B, L, heads, D): output pair (i, i + D/2) = maps[..., i, :, :] @ (x_i, x_{i+D/2})."""
    first, second = x.chunk(2, dim=-1)
    out_first = maps[..., 0, 0] * first + maps[..., 0, 1] * second
    out_second = maps[..., 1, 0] * first + maps[..., 1, 1] * second
    return torch.cat([out_first, out_second], dim=-1).to(x.dtype)


class ErnieAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, head = heads, dim // heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head), RMSNorm(head)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.hooks = Hooks()

    def forward(self, x, attention_mask=None, image_rotary_emb=None):
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        if image_rotary_emb is not None:
            q, k = apply_split_half(q, image_rotary_emb), apply_split_half(k, image_rotary_emb)
        q, k, v = q.flatten(2), k.flatten(2), self.to_v(x)
        return self.to_out[0](attention_function(q, k, v, self.heads, mask=attention_mask, hooks=self.hooks))


class ErnieBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.adaLN_sa_ln, self.adaLN_mlp_ln = RMSNorm(dim), RMSNorm(dim)
        self.self_attention = ErnieAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.GELU(), nn.Linear(2 * dim, dim, bias=False))

    def forward(self, x, rotary_pos_emb, temb, attention_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = temb
        h = self.adaLN_sa_ln(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.self_attention(h, attention_mask=attention_mask, image_rotary_emb=rotary_pos_emb)
        return x + gate_mlp * self.mlp(self.adaLN_mlp_ln(x) * (1 + scale_mlp) + shift_mlp)


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.patch_size, self.proj = patch, nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PosEmbed(EmbedND):
    """``pos_embed`` (``ErnieImageEmbedND3``): Flux's ``EmbedND`` with the split-half maps."""

    maps = staticmethod(split_half_maps)


class TinyErnie(nn.Module):
    SIZES = Sizes(channels=8, hidden=32, heads=2, depth=3, patch=1, context_dim=12, axes=AXES)
    HOST_NAMES: ClassVar[dict[str, str]] = dict(layers="depth", text_in_dim="context_dim")

    def __init__(self, *, patch_attr: int | None = None, transpose_ids: bool = False, **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        channels, hidden, heads, patch, axes = s.channels, s.hidden, s.heads, s.patch, s.axes
        check_axes(axes, hidden, heads)
        self.channels, self.hidden, self.transpose_ids = channels, hidden, transpose_ids
        self.patch_size = patch if patch_attr is None else patch_attr
        self.x_embedder = PatchEmbed(channels, hidden, patch)
        self.text_proj = nn.Linear(s.context_dim, hidden, bias=False)
        self.time_embedding = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.pos_embed = PosEmbed(axes, THETA)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.layers = nn.ModuleList(ErnieBlock(hidden, heads) for _ in range(s.depth))
        self.final_norm, self.final_linear = RMSNorm(hidden), nn.Linear(hidden, patch * patch * channels)

    def forward(self, x, timesteps, context, **kwargs):
        batch, _, height, width = x.shape
        p = self.x_embedder.patch_size
        h_len, w_len = height // p, width // p
        image = self.x_embedder(x)
        text = self.text_proj(context)
        n_txt = text.shape[1]
        rows, cols = torch.meshgrid(torch.arange(h_len), torch.arange(w_len), indexing="ij")
        if self.transpose_ids:
            rows, cols = (t.t().reshape(h_len, w_len) for t in (rows, cols))
        image_ids = torch.stack([torch.full_like(rows, n_txt), rows, cols], dim=-1).reshape(1, -1, 3).double()
        text_ids = torch.zeros(1, n_txt, 3, dtype=torch.float64)
        text_ids[..., 0] = torch.arange(n_txt, dtype=torch.float64)
        ids = torch.cat([image_ids, text_ids], dim=1).expand(batch, -1, -1).to(x.device)
        maps = self.pos_embed(ids).to(torch.promote_types(x.dtype, torch.float32))
        half = self.hidden // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=x.device) / half)
        angle = timesteps[:, None].double() * freqs
        c = self.time_embedding(torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).to(x.dtype))
        temb = [t.unsqueeze(1) for t in self.adaLN_modulation(c).chunk(6, dim=-1)]
        hidden = torch.cat([image, text], dim=1)
        for layer in self.layers:
            hidden = layer(hidden, maps, temb)
        patches = self.final_linear(F.silu(self.final_norm(hidden)))[:, : h_len * w_len]
        out = patches.reshape(batch, h_len, w_len, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, self.channels, h_len * p, w_len * p)
