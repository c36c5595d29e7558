"""A small UNet with the real ldm/sgm module layout and names, written from scratch for tests.

Names follow ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` (and sgm's copy for SDXL):
``input_blocks.{i}`` / ``middle_block`` / ``output_blocks.{i}`` are ``TimestepEmbedSequential``s
whose child ``1`` is a ``SpatialTransformer`` holding ``transformer_blocks.{j}`` of
``BasicTransformerBlock`` with ``attn1`` (self) and ``attn2`` (cross) ``CrossAttention`` modules
with ``to_q``/``to_k``/``to_v`` and ``to_out.0``.  Downsampling is a stride-2, padding-1 conv, so odd
latent sides round up as in the hosts; on the way up the feature map is resized to its skip
connection (what A1111's ``TorchHijackForUnet.cat`` and Forge's ``output_shape`` do).

Two calling conventions, as the hosts have them:
* A1111 (ldm/sgm): ``attn1`` is a module called with ``x``; its first call is ``self.to_q(x)``.
* Forge / reForge (``ldm_patched`` / ``backend.nn.unet``): ``forward(..., transformer_options=...)``;
  a ``patches_replace["attn1"]`` entry keyed ``(block_name, block_id, block_index)`` or
  ``(block_name, block_id)`` is called as ``patch(q, k, v, extra_options)`` with q/k/v already
  projected, and the block applies ``attn1.to_out`` to its result.  ``extra_options`` carries
  ``n_heads``, ``dim_head``, ``block``, ``block_index``, ``transformer_index``, ``original_shape``,
  and, as reForge does, ``activations_shape``.  ``control`` (ControlNet residuals, a dict of lists)
  is applied as ``ldm_patched``'s ``apply_control``: after each input block, after the middle block
  and to each skip taken by an output block, popping from the end of the list.  As in classic Forge
  (``ldm_patched/ldm/modules/diffusionmodules/openaimodel.py`` ``UNetModel.forward``, tag
  ``previous``) and new Forge (dfdcbab ``backend/nn/unet.py`` :696-765): ``block_modifiers`` are
  called ``(h, "before"|"after", transformer_options)`` around every block, with ``block`` set;
  ``patches["input_block_patch"]`` ``(h, options)`` after each input block's control, before its
  skip is stored (``input_block_patch_after_skip`` after); ``patches["output_block_patch"]``
  ``(h, hsp, options)`` before each output block's concatenation (Deep Shrink uses these).
The sizes are configurable, so the same tree builds full SD1.5 and SDXL UNets for benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    transformer_depth: tuple[int, ...] = (1, 1, 0)  # per level; 0 = no attention at that level
    middle_depth: int = 1  # 0 = no middle transformer (SSD-1B)
    head_dim: int = 8
    context_dim: int = 16
    adm_in_channels: int | None = None  # SDXL's pooled-text/size vector
    use_linear: bool = False  # SD2/SDXL project in with Linear, SD1 with a 1x1 conv
    norm_groups: int = 8
    in_channels: int = 4


SD15 = UNetConfig(320, (1, 2, 4, 4), 2, (1, 1, 1, 0), 1, 40, 768, None, False, 32)
SDXL = UNetConfig(320, (1, 2, 4), 2, (0, 2, 10), 10, 64, 2048, 2816, True, 32)
TINY_SD1 = UNetConfig()
TINY_SDXL = UNetConfig(32, (1, 2, 2), 1, (0, 2, 3), 3, 8, 16, 12, True, 8)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.to_q(x)
        context = x if context is None else context
        return self.to_out(attention(q, self.to_k(context), self.to_v(context), self.heads))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on (B, N, heads*dim_head) tensors, like the hosts' attention functions."""
    b, n, inner = q.shape
    split = [t.reshape(t.shape[0], t.shape[1], heads, inner // heads).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split)
    return out.transpose(1, 2).reshape(b, n, inner)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """ldm's ``ldm/modules/attention.py`` ``BasicTransformerBlock`` (Stability's stablediffusion repo
    that A1111 1.10 uses; sgm's copy is the same): ``forward(x, context=None)`` hands ``(x, context)``
    to ``_forward`` (through ``checkpoint``, a plain call at inference), which is what tomesd's
    ``ToMeBlock`` overrides.  ``ldm_patched``/``backend`` (Forge, reForge) pass
    ``transformer_options`` on as a third argument; only that path looks for attn1 patches."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.n_heads, self.d_head = heads, dim_head
        self.disable_self_attn = False
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, transformer_options: dict | None = None
    ) -> torch.Tensor:
        if transformer_options is None:
            return self._forward(x, context)
        return self._forward(x, context, transformer_options)

    def _forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, transformer_options: dict | None = None
    ) -> torch.Tensor:
        n = self.norm1(x)
        patch = _attn1_replace(transformer_options)
        if patch is None:
            n = self.attn1(n, context=context if self.disable_self_attn else None)
        else:
            extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
            extra.update(n_heads=self.n_heads, dim_head=self.d_head)
            q, k, v = self.attn1.to_q(n), self.attn1.to_k(n), self.attn1.to_v(n)
            n = self.attn1.to_out(patch(q, k, v, extra))
        x = n + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


def _attn1_replace(options: dict | None):
    if not options:
        return None
    replace = options.get("patches_replace", {}).get("attn1", {})
    block = options.get("block")
    if block is None:
        return None
    return replace.get((*block, options["block_index"])) or replace.get(tuple(block))


class SpatialTransformer(nn.Module):
    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool, groups
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, transformer_options: dict | None = None):
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        if self.use_linear:
            x = self.proj_in(x)
        options = None if transformer_options is None else {**transformer_options, "activations_shape": [b, c, h, w]}
        for index, block in enumerate(self.transformer_blocks):
            if options is None:
                x = block(x, context=context)  # ldm's SpatialTransformer: block(x, context=context[i])
            else:
                options["block_index"] = index
                x = block(x, context=context, transformer_options=options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, 1, 1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context, transformer_options=None):  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, config: UNetConfig = TINY_SD1):
        super().__init__()
        self.config = cfg = config
        ch = cfg.model_channels
        emb = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        if cfg.adm_in_channels:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
            )

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            heads = channels // cfg.head_dim
            return SpatialTransformer(
                channels, heads, cfg.head_dim, depth, cfg.context_dim, cfg.use_linear, cfg.norm_groups
            )

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * cfg.model_channels, cfg.norm_groups)]
                ch = mult * cfg.model_channels
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
        middle: list[nn.Module] = [ResBlock(ch, emb, ch, cfg.norm_groups)]
        if cfg.middle_depth:
            middle.append(transformer(ch, cfg.middle_depth))
        middle.append(ResBlock(ch, emb, ch, cfg.norm_groups))
        self.middle_block = TimestepEmbedSequential(*middle)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for index in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb, mult * cfg.model_channels, cfg.norm_groups)]
                ch = mult * cfg.model_channels
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level]))
                if level and index == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        )

    def forward(self, x, timesteps, context, y=None, control=None, transformer_options: dict | None = None):
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)
        if self.config.adm_in_channels:
            emb = emb + self.label_emb(y)
        options = None
        if transformer_options is not None:
            options = {**transformer_options, "original_shape": list(x.shape), "transformer_index": 0}
        skips = []
        h = x
        for block_id, block in enumerate(self.input_blocks):
            block_options = _at(options, ("input", block_id))
            h = _run_block(block, h, emb, context, block_options, control, "input")
            h = _apply_patches(block_options, "input_block_patch", h)
            skips.append(h)
            h = _apply_patches(block_options, "input_block_patch_after_skip", h)
        h = _run_block(self.middle_block, h, emb, context, _at(options, ("middle", 0)), control, "middle")
        for block_id, block in enumerate(self.output_blocks):
            block_options = _at(options, ("output", block_id))
            skip = _apply_control(skips.pop(), control, "output")
            for patch in _patches(block_options, "output_block_patch"):
                h, skip = patch(h, skip, block_options)
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = _run_block(block, torch.cat([h, skip], dim=1), emb, context, block_options)
        return self.out(h)


def _run_block(block, h, emb, context, options: dict | None, control=None, control_name=None) -> torch.Tensor:
    """A block, its ControlNet residual, and the Forge hosts' ``block_modifiers`` around both."""
    modifiers = (options or {}).get("block_modifiers") or ()
    for modifier in modifiers:
        h = modifier(h, "before", options)
    h = block(h, emb, context, options)
    if control_name is not None:
        h = _apply_control(h, control, control_name)
    for modifier in modifiers:
        h = modifier(h, "after", options)
    return h


def _patches(options: dict | None, name: str) -> list:
    return ((options or {}).get("patches") or {}).get(name) or []


def _apply_patches(options: dict | None, name: str, h: torch.Tensor) -> torch.Tensor:
    """``input_block_patch`` / ``input_block_patch_after_skip`` entries, called ``(h, options)``."""
    for patch in _patches(options, name):
        h = patch(h, options)
    return h


def _apply_control(h: torch.Tensor, control: dict | None, name: str) -> torch.Tensor:
    """ldm_patched ``apply_control``: pop the last residual of ``control[name]``, add it unless None."""
    if not control or not control.get(name):
        return h
    residual = control[name].pop()
    return h if residual is None else h + residual


def _at(options: dict | None, block: tuple[str, int]) -> dict | None:
    return None if options is None else {**options, "block": block}


def build_unet(config: UNetConfig = TINY_SD1, seed: int = 0, dtype=torch.float32) -> UNetModel:
    torch.manual_seed(seed)
    return UNetModel(config).to(dtype).eval()
