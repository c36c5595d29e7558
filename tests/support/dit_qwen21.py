"""A small from-scratch Qwen-Image 2.1 for tests: the interfaces of Forge Neo 2.29.1's ``backend/nn/qwen21.py``.

Written from the interfaces of ``QwenImage21Transformer2DModel`` (youlijie/sd-webui-forge-classic b3b8a1e5;
no host code copied).  What SEG has to read from it, and what this imitation keeps:

* ``forward(x, timesteps, context, ref_latents=None, image_slots=None, transformer_options={}, **kwargs)``
  with ``x`` 4D ``(B, C, H, W)`` and no patchify: ``img_in`` is a Linear over the channels of each latent
  position (Neo: 64 channels, here ``channels``).  Neo reads the reference latents and the image slots from
  ``backend.args.dynamic_args`` and ignores the arguments of those names; this imitation takes them from the
  arguments (references ``(1, C, h, w)``, expanded to the batch as Neo does), which SEG never reads either way.
* The sequence ``[text | ref 0 | text | ref 1 | ... | text | target]``: the text is cut before reference
  ``i`` at ``image_slots[i]`` (missing slots: the text's end), empty text pieces are left out, the target is
  last.  Position ids: text token ``(p, p, p)``; an image ``(p, row - h // 2, column - w // 2)`` (Neo centres
  by another offset, which SEG must accept); ``p`` advances by each text piece's length and by ``max(h, w)``
  per image.  ``pe_embedder(ids)`` is called once, as a module, with ``(1, L, 3)`` ids.
* Segments: a text piece ``(start, end, mask)`` with the boolean mask ``(n, end)`` that lets token ``i`` see
  every earlier token and the text up to itself; an image ``(start, end, None)``: it sees everything before
  its end.  Each block gets ``attn_fn = block_causal_attention(segments, transformer_options, ...)``, which
  calls the module-global :data:`attention_function` (Neo's ``backend.attention.attention_function``, here
  :func:`tests.support.dit_blocks.neo_attention`, wrapped by the imitation of ``wrap_attn``) once per segment
  with q ``(B, n, heads * D)`` of the segment and k, v of every token up to its end.
* ``transformer_blocks[i]``: ``img_norm1``, ``attn`` (``Attention.forward(x, pe, attn_fn, prefix_len,
  transformer_options)``: q, k, v ``(B, N, heads, D)``, q/k RMS-norm and RoPE fused as ``ck.rms_rope``, which
  reads ``norm_q.weight`` and calls no norm module, then ``attn_fn(q, k, v, heads)``), ``img_norm2``,
  ``img_mlp`` (SwiGLU).  The modulation is the model's, shared by every block: from the time embedding of
  ``cat([t, 0])``, the ``t = 0`` row for the text and reference tokens (the ``prefix_len`` tokens before the
  target) and the sampled rows for the target, tuples of ``(prefix (1, 1, D), target (B, 1, D))``.

``kernel`` picks how the segments' attention is reached: ``"global"`` (the module global, as Neo),
``"bound"`` (a function bound when the closure is made: only ``wrap_attn``'s override reaches it) or
``"private"`` (a kernel that attends by itself and reaches no seam).  The tests' extra: each ``attn`` has
``segment_hooks``, a dict from segment index (negative from the end: ``-1`` is the target's) to the
:class:`tests.support.dit_blocks.Hooks` that segment's attention call honours (the slow logit-blur reference,
q/k/v records); the model keeps its last call's ``segments``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.dit_blocks import EmbedND, Hooks, attend, check_axes, neo_attention, rope_complex
from tests.support.sizes import Sizes

attention_function = neo_attention  # Neo: ``from backend.attention import attention_function``

AXES = (4, 4, 4)  # three RoPE axes summing to the head width (hidden 24 / 2 heads); Neo 16/56/56
EPS = 1e-6


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rms_rope(q, k, pe, q_weight, k_weight):
    """``ck.rms_rope``: per-head RMS norm of q and k with the norms' weights, then RoPE, in one step."""
    return rope_complex(_rms(q, q_weight), pe), rope_complex(_rms(k, k_weight), pe)


def _hooks_of(segment_hooks: dict[int, Hooks], index: int, count: int) -> Hooks:
    return segment_hooks.get(index) or segment_hooks.get(index - count) or Hooks()


def block_causal_attention(segments, transformer_options, kernel: str = "global", segment_hooks=None):
    """The closure each block attends through: one attention call per segment, outputs joined."""
    hooks = segment_hooks or {}
    bound = neo_attention

    def attn(q, k, v, heads, preferred_attention=None):
        outs = []
        for index, (start, end, mask) in enumerate(segments):
            hook = _hooks_of(hooks, index, len(segments))
            qs, ks, vs = q[:, start:end], k[:, :end], v[:, :end]
            if kernel == "private":  # attends by itself: neither the module global nor the override
                out = attend(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), hook, mask)
                outs.append(out.transpose(1, 2).flatten(2))
                continue
            function = bound if kernel == "bound" else attention_function
            outs.append(
                function(
                    qs.flatten(2),
                    ks.flatten(2),
                    vs.flatten(2),
                    heads,
                    mask=mask,
                    transformer_options=transformer_options,
                    hooks=hook,
                )
            )
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    return attn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, inner = heads, dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.norm_q, self.norm_k = nn.RMSNorm(dim // heads, eps=EPS), nn.RMSNorm(dim // heads, eps=EPS)
        self.segment_hooks: dict[int, Hooks] = {}

    def forward(self, x, pe, attn_fn, prefix_len, transformer_options={}):  # noqa: B006 (Neo's signature)
        batch, length, _ = x.shape
        q, k, v = (f(x).view(batch, length, self.heads, -1) for f in (self.to_q, self.to_k, self.to_v))
        q, k = rms_rope(q, k, pe, self.norm_q.weight, self.norm_k.weight)  # no norm module is called
        return self.to_out[0](attn_fn(q, k, v, self.heads))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up, self.out = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * up)


def _modulated(norm: nn.Module, x, scale, prefix_len: int):
    """``norm(x) * (1 + scale)``: the prefix tokens with the ``t = 0`` row, the target with its own rows."""
    prefix, target = scale
    normed = norm(x)
    return torch.cat([normed[:, :prefix_len] * (1 + prefix), normed[:, prefix_len:] * (1 + target)], dim=1)


def _gated(x, y, gate, prefix_len: int):
    prefix, target = gate
    return x + torch.cat([y[:, :prefix_len] * prefix, y[:, prefix_len:] * target], dim=1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
        self.attn = Attention(dim, heads)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
        self.img_mlp = SwiGLU(dim, mlp_ratio * dim)

    def forward(self, x, mod, pe, attn_fn, prefix_len, transformer_options={}):  # noqa: B006 (Neo's signature)
        scale1, gate1, scale2, gate2 = mod
        attention = self.attn(
            _modulated(self.img_norm1, x, scale1, prefix_len), pe, attn_fn, prefix_len, transformer_options
        )
        x = _gated(x, attention, gate1, prefix_len)
        return _gated(x, self.img_mlp(_modulated(self.img_norm2, x, scale2, prefix_len)), gate2, prefix_len)


def image_ids(h: int, w: int, index: float) -> torch.Tensor:
    """``(index, row - h // 2, column - w // 2)``, row-major: (h * w, 3)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.full_like(rows, 0) + index, rows - h // 2, cols - w // 2], dim=-1).reshape(-1, 3)


class TinyQwen21(nn.Module):
    """Qwen-Image 2.1 at test size (released: 32 blocks, 32 heads x 128, ``context_in_dim`` 4096, 64 channels,
    ``mlp_ratio`` 3, axes 16/56/56)."""

    SIZES = Sizes(channels=4, hidden=24, heads=2, depth=3, context_dim=8, axes=AXES)
    HOST_NAMES: ClassVar[dict[str, str]] = dict(layers="depth")

    def __init__(self, *, kernel: str = "global", **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        channels, hidden, heads, context_dim, axes = s.channels, s.hidden, s.heads, s.context_dim, s.axes
        check_axes(axes, hidden, heads)
        self.out_channels, self.kernel = channels, kernel
        self.pe_embedder = EmbedND(axes)
        self.time_text_embed = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.txt_in = nn.Sequential(nn.RMSNorm(context_dim), nn.Linear(context_dim, hidden), nn.GELU("tanh"))
        self.img_in = nn.Linear(channels, hidden, bias=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 4 * hidden, bias=False))
        self.transformer_blocks = nn.ModuleList(Block(hidden, heads) for _ in range(s.depth))
        self.norm_out = nn.Linear(hidden, hidden, bias=False)  # the last layer's scale
        self.proj_out = nn.Linear(hidden, channels, bias=False)
        self.segments: list[tuple[int, int, torch.Tensor | None]] = []

    def build_sequence(self, x, context, refs: list[torch.Tensor], slots: list[int]):
        txt = self.txt_in(context)
        n_txt = txt.shape[1]
        cuts = [min(max(int(s), 0), n_txt) for s in slots[: len(refs)]] + [n_txt] * max(len(refs) - len(slots), 0)
        bounds = [0, *cuts, n_txt]
        parts, ids, segments = [], [], []
        pos, length = 0, 0
        for piece, image in enumerate([*refs, x]):
            start, end = bounds[piece], max(bounds[piece + 1], bounds[piece])
            n = end - start
            if n > 0:
                parts.append(txt[:, start:end])
                ids.append((pos + torch.arange(n, dtype=torch.float64))[:, None].expand(n, 3))
                causal = torch.arange(length + n)[None, :] <= (length + torch.arange(n))[:, None]
                segments.append((length, length + n, causal))
                pos, length = pos + n, length + n
            h, w = image.shape[-2:]
            tokens = self.img_in(image.flatten(2).transpose(1, 2).to(x))
            parts.append(tokens.expand(x.shape[0], -1, -1))
            ids.append(image_ids(h, w, pos).double())
            segments.append((length, length + h * w, None))
            pos, length = pos + max(h, w), length + h * w
        pe = self.pe_embedder(torch.cat(ids).unsqueeze(0).to(x.device)).transpose(1, 2)  # (1, L, 1, D/2, 2, 2)
        return torch.cat(parts, dim=1), pe.to(x.dtype), segments

    def forward(self, x, timesteps, context, ref_latents=None, image_slots=None, transformer_options={}, **kwargs):  # noqa: B006
        batch, channels, height, width = x.shape
        refs = list(ref_latents or [])
        hidden, pe, segments = self.build_sequence(x, context, refs, list(image_slots or []))
        self.segments = segments
        prefix_len = hidden.shape[1] - height * width
        temb = self.time_text_embed(torch.cat([timesteps, timesteps.new_zeros(1)])[:, None].to(x.dtype))
        scale1, gate1, scale2, gate2 = self.modulation(temb).chunk(4, dim=-1)
        rows = lambda p: (p[-1:, None], p[:-1, None])  # noqa: E731 (the t = 0 row, the sampled rows)
        mod = (rows(scale1), rows(gate1.tanh()), rows(scale2), rows(gate2.tanh()))
        for block in self.transformer_blocks:
            attn_fn = block_causal_attention(segments, transformer_options, self.kernel, block.attn.segment_hooks)
            hidden = block(hidden, mod, pe, attn_fn, prefix_len, transformer_options)
        target = F.layer_norm(hidden[:, prefix_len:], hidden.shape[-1:], eps=EPS)
        out = self.proj_out(target * (1 + self.norm_out(F.silu(temb[:-1]))[:, None]))
        return out.transpose(1, 2).reshape(batch, channels, height, width)


def build(seed: int = 0, **kwargs) -> TinyQwen21:
    """A float64 TinyQwen21 with random weights; norm weights near 1."""
    model = TinyQwen21(**kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            norm = name.endswith(("norm_q.weight", "norm_k.weight")) or name == "txt_in.0.weight"
            parameter.copy_(1.0 + 0.1 * noise if norm else 0.3 * noise)
    return model.double().eval()
