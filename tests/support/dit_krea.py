"""A small from-scratch Krea 2 with the attention math and call signature of Neo's ``backend/nn/krea.py``.

Written from the structure of Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d, ``webui/backend/nn/krea.py``,
``SingleStreamDiT``; ComfyUI's ``comfy/ldm/krea2/model.py`` v0.26.1) and Neo >= 2.27 (xxxqwerty337/
sd-webui-forge-classic-1337 ba50f188 ``backend/nn/krea.py``, alike in iqddd/stable-diffusion-webui-forge
b4b6d513); no host code copied.  What SEG must read from it:

* ``forward(x, timesteps, context, attention_mask=None, transformer_options={}, **kwargs)``; ``patch`` 2
  (``first`` takes ``channels * 4``), odd sides padded (circular, as ``pad_to_patch_size``), patches
  row-major; the text-fusion transformer ``txtfusion`` (``layerwise_blocks`` attend across the tapped layers
  of each token, a ``projector`` merges them, ``refiner_blocks`` attend across tokens) takes
  ``(B, L, txtlayers, txtdim)``;
* one stream ``blocks`` of ``SingleStreamBlock``; ``attn`` is grouped-query attention (``kvheads`` <
  ``heads``), ``qknorm(q, k) -> (q, k)`` called as a module, then RoPE (``pe_embedder(pos)``), k/v heads
  repeated, then the module-global ``attention_function(q, k, v, heads, mask=mask, skip_reshape=True,
  transformer_options=...)`` (2.26 line 211, ba50f188 line 92; here
  :func:`tests.support.dit_blocks.neo_attention`, with ``wrap_attn``), a sigmoid output gate.  Neither
  version fuses the norm into the rotation (2.27+ only swaps Flux's ``apply_rope`` for ``ck.apply_rope``).
  ``kernel="private"`` makes the blocks' attention attend by itself, reaching no seam;
* ``layout="2.26"`` (lines 45-144, 357-416): ``x`` 4D or 5D Wan layout ``(B, C, T, H, W)`` (frames folded
  into the batch); ``context`` ``(B, seq, txtlayers * txtdim)``, squeezed at dim 1 and unpacked; the
  sequence is ``[txt | image | references]``, reference ``i`` with ids ``(i + 1, row, col)``; with
  ``ref_latents`` the blocks run through ``_block_ref_forward``, which calls ``block.mod``/``block.attn``
  directly, never the block module, and the reference span gets the modulation of timestep 0;
* ``layout="2.29"`` (ba50f188 lines 238-305): ``x`` ``(B, C, 1, H, W)``, squeezed; ``context`` the 4D
  ``(B, L, txtlayers, txtdim)`` straight into ``txtfusion``; references (Neo: ``dynamic_args.ref_latents``,
  here the ``ref_latents`` keyword) resized to the image's size, then ``[txt | ref 1 ... ref N | image]``,
  ids ``(i + 1, row, col)`` and ``(0, row, col)``; the blocks are called as modules with one modulation
  for all tokens; the output is ``(B, C, 1, H, W)``.

Each attention module (``blocks[i].attn``) honours a ``hooks`` attribute (:class:`tests.support.dit_blocks.Hooks`):
with ``logits`` set it computes softmax(logits) explicitly for the slow reference.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tests.support import dit_blocks
from tests.support.dit_blocks import EmbedND, Hooks, attend, pad_to_patch, patchify, rope_complex, unpatchify
from tests.support.sizes import Sizes

attention_function = dit_blocks.neo_attention  # Neo: ``from backend.attention import attention_function``


class RMSNorm(nn.Module):
    """Krea's RMSNorm: weight ``scale + 1`` (``scale`` starts near 0 here)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.scale = eps, nn.Parameter(0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.scale + 1.0)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qnorm, self.knorm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.qnorm(q), self.knorm(k)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    """``wq/wk/wv/gate/qknorm/wo``; q ``heads``, k/v ``kvheads``; RoPE after ``qknorm`` when ``freqs`` is given."""

    def __init__(self, dim: int, heads: int, kvheads: int, kernel: str = "global"):
        super().__init__()
        self.heads, self.kvheads, head, self.kernel = heads, kvheads, dim // heads, kernel
        self.wq, self.gate = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.wk, self.wv = nn.Linear(dim, head * kvheads, bias=False), nn.Linear(dim, head * kvheads, bias=False)
        self.qknorm = QKNorm(head)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.hooks = Hooks()

    def forward(self, x, freqs=None, mask=None, transformer_options=None):
        q = self.wq(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.wk(x).unflatten(-1, (self.kvheads, -1)).transpose(1, 2)
        v = self.wv(x).unflatten(-1, (self.kvheads, -1)).transpose(1, 2)
        q, k = self.qknorm(q, k)
        if freqs is not None:
            q, k = rope_complex(q, freqs), rope_complex(k, freqs)
        rep = self.heads // self.kvheads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        options = {"transformer_options": transformer_options, "hooks": self.hooks}  # keywords, as Neo passes them
        if self.kernel == "private":
            out = attend(q, k, v, self.hooks, mask).transpose(1, 2).flatten(2)
        else:
            out = attention_function(q, k, v, self.heads, mask=mask, skip_reshape=True, **options)
        return self.wo(out * torch.sigmoid(self.gate(x)))


class TextFusionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.prenorm, self.postnorm = RMSNorm(dim), RMSNorm(dim)
        self.attn, self.mlp = Attention(dim, heads, heads), SwiGLU(dim, 2 * dim)

    def forward(self, x, mask=None, transformer_options=None):
        x = x + self.attn(self.prenorm(x), mask=mask, transformer_options=transformer_options)
        return x + self.mlp(self.postnorm(x))


class TextFusionTransformer(nn.Module):
    def __init__(self, txtlayers: int, txtdim: int, heads: int):
        super().__init__()
        self.layerwise_blocks = nn.ModuleList(TextFusionBlock(txtdim, heads) for _ in range(2))
        self.projector = nn.Linear(txtlayers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList(TextFusionBlock(txtdim, heads) for _ in range(2))

    def forward(self, x, mask=None, transformer_options=None):
        b, seq, layers, dim = x.shape
        x = x.reshape(b * seq, layers, dim)
        for block in self.layerwise_blocks:  # across the tapped layers of each token
            x = block(x, transformer_options=transformer_options)
        x = self.projector(x.reshape(b, seq, layers, dim).transpose(-1, -2)).squeeze(-1)
        for block in self.refiner_blocks:  # across the tokens
            x = block(x, mask=mask, transformer_options=transformer_options)
        return x


class SingleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kvheads: int, kernel: str = "global"):
        super().__init__()
        self.mod = nn.Parameter(0.3 * torch.randn(6 * dim))  # DoubleSharedModulation's ``lin``, added to vec
        self.prenorm, self.postnorm = RMSNorm(dim), RMSNorm(dim)
        self.attn, self.mlp = Attention(dim, heads, kvheads, kernel), SwiGLU(dim, 2 * dim)

    def modulation(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (vec + self.mod).chunk(6, dim=-1)

    def forward(self, x, vec, freqs, mask=None, transformer_options=None):
        prescale, preshift, pregate, postscale, postshift, postgate = self.modulation(vec)
        h = (1 + prescale) * self.prenorm(x) + preshift
        x = x + pregate * self.attn(h, freqs, mask, transformer_options=transformer_options)
        return x + postgate * self.mlp((1 + postscale) * self.postnorm(x) + postshift)


def _block_with_refs(block: SingleStreamBlock, x, vec, refvec, split: int, freqs, options) -> torch.Tensor:
    """Neo's ``_block_ref_forward``: the span from ``split`` on (references) is modulated by ``refvec``;
    the block module itself is never called."""
    m, r = block.modulation(vec), block.modulation(refvec)

    def mod(h, scale, shift):
        return torch.cat([(1 + m[scale]) * h[:, :split] + m[shift], (1 + r[scale]) * h[:, split:] + r[shift]], dim=1)

    def gate(h, g):
        return torch.cat([m[g] * h[:, :split], r[g] * h[:, split:]], dim=1)

    x = x + gate(block.attn(mod(block.prenorm(x), 0, 1), freqs, None, transformer_options=options), 2)
    return x + gate(block.mlp(mod(block.postnorm(x), 3, 4)), 5)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64, device=t.device) / (dim // 2))
    args = 1000.0 * t[:, None].double() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def grid_ids(h_len: int, w_len: int, index: float, batch: int, device) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(h_len), torch.arange(w_len), indexing="ij")
    ids = torch.stack([torch.full_like(rows, 0) + index, rows, cols], dim=-1).reshape(1, -1, 3)
    return ids.double().expand(batch, -1, -1).to(device)


class TinyKrea2(nn.Module):
    """Krea 2 at test size.  ``layers``: ``blocks`` (Krea 2: 28); ``kvheads`` < ``heads`` as Krea's GQA.
    ``layout``: ``"2.26"`` or ``"2.29"`` (the module docstring); ``kernel``: the blocks' attention kernel.
    ``patch_attr``: a deliberately wrong ``patch`` attribute (the ids check must catch it)."""

    SIZES = Sizes(channels=4, hidden=32, heads=2, kvheads=1, depth=3, patch=2, txtdim=8, txtlayers=3, tdim=8)
    HOST_NAMES: ClassVar[dict[str, str]] = dict(features="hidden", layers="depth")

    def __init__(self, *, patch_attr: int | None = None, layout: str = "2.26", kernel: str = "global", **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        channels, features, heads, patch = s.channels, s.hidden, s.heads, s.patch
        txtdim, txtlayers, tdim = s.txtdim, s.txtlayers, s.tdim
        head = features // heads
        axes = (head - 12 * (head // 16), 6 * (head // 16), 6 * (head // 16))  # Neo's split (lines 332-334)
        if head < 16 or sum(axes) != head:
            raise ValueError(f"head width {head} gives no spatial RoPE axes")
        self.patch, self.real_patch, self.channels = patch if patch_attr is None else patch_attr, patch, channels
        self.tdim, self.txtdim, self.txtlayers, self.layout = tdim, txtdim, txtlayers, layout
        self.pe_embedder = EmbedND(axes, 1000.0)
        self.first = nn.Linear(channels * patch * patch, features)
        self.blocks = nn.ModuleList(SingleStreamBlock(features, heads, s.kvheads, kernel) for _ in range(s.depth))
        self.tmlp = nn.Sequential(nn.Linear(tdim, features), nn.GELU(approximate="tanh"), nn.Linear(features, features))
        self.txtfusion = TextFusionTransformer(txtlayers, txtdim, heads)
        self.txtmlp = nn.Sequential(RMSNorm(txtdim), nn.Linear(txtdim, features), nn.GELU(approximate="tanh"))
        self.last_norm, self.last = RMSNorm(features), nn.Linear(features, patch * patch * channels)
        self.last_mod = nn.Linear(features, 2 * features)
        self.tproj = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(features, 6 * features))

    def _time(self, timesteps: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tmlp(timestep_embedding(timesteps, self.tdim).unsqueeze(1).to(dtype))
        return t, self.tproj(t)

    def _text(self, context: torch.Tensor, options) -> torch.Tensor:
        if self.layout == "2.26":  # ``_unpack_context(context.squeeze(1))``: the tapped layers side by side
            context = context.squeeze(1)
            context = context.reshape(*context.shape[:2], self.txtlayers, self.txtdim)
        return self.txtmlp(self.txtfusion(context, transformer_options=options))

    def _output(self, combined, t, start: int, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        (h_len, w_len), p = grid, self.real_patch
        scale, shift = self.last_mod(t).chunk(2, dim=-1)
        out = self.last((1 + scale) * self.last_norm(combined) + shift)[:, start : start + h_len * w_len]
        return unpatchify(out, self.channels, h_len, w_len, p)[..., : size[0], : size[1]]

    def forward(self, x, timesteps, context, attention_mask=None, transformer_options=None, **kwargs):
        if self.layout == "2.29":
            return self._forward_229(x, timesteps, context, transformer_options, kwargs.get("ref_latents"))
        refs = kwargs.get("ref_latents")
        frames = x.shape[2] if x.dim() == 5 else 0
        if frames:  # Neo folds the frames into the batch by a plain reshape (batch-major rows)
            x = x.reshape(x.shape[0] * frames, x.shape[1], *x.shape[-2:])
        batch, _, height, width = x.shape
        p = self.real_patch
        padded = pad_to_patch(x, p)
        h_len, w_len = padded.shape[-2] // p, padded.shape[-1] // p
        tokens, ids = [patchify(padded, p)], [grid_ids(h_len, w_len, 0, batch, x.device)]
        for i, ref in enumerate(refs or []):
            ref = pad_to_patch(ref.to(x).expand(batch, -1, -1, -1), p)
            tokens.append(patchify(ref, p))
            ids.append(grid_ids(ref.shape[-2] // p, ref.shape[-1] // p, i + 1, batch, x.device))
        img = self.first(torch.cat(tokens, dim=1))
        t, tvec = self._time(timesteps, img.dtype)
        txt = self._text(context, transformer_options)
        n_txt = txt.shape[1]
        combined = torch.cat([txt, img], dim=1)
        pos = torch.cat([torch.zeros(batch, n_txt, 3, dtype=torch.float64, device=x.device), *ids], dim=1)
        freqs = self.pe_embedder(pos).to(torch.promote_types(x.dtype, torch.float32))
        if refs:
            _, tvec0 = self._time(torch.zeros_like(timesteps), img.dtype)
            split = n_txt + h_len * w_len
            for block in self.blocks:
                combined = _block_with_refs(block, combined, tvec, tvec0, split, freqs, transformer_options)
        else:
            for block in self.blocks:
                combined = block(combined, tvec, freqs, None, transformer_options=transformer_options)
        out = self._output(combined, t, n_txt, (h_len, w_len), (height, width))
        return out.reshape(-1, frames, self.channels, height, width).movedim(1, 2) if frames else out

    def _forward_229(self, x, timesteps, context, options, refs) -> torch.Tensor:
        x = x.squeeze(2) if x.dim() == 5 else x  # Neo gets (B, C, 1, H, W) and squeezes the frame
        batch, _, height, width = x.shape
        p = self.real_patch
        padded = pad_to_patch(x, p)
        h_len, w_len = padded.shape[-2] // p, padded.shape[-1] // p
        references = []
        for ref in refs or []:  # resized to the padded image's size (Neo: ``adaptive_resize``), so its grid
            ref = ref.to(x).expand(batch, -1, -1, -1)
            if ref.shape[-2:] != padded.shape[-2:]:
                ref = F.interpolate(ref, size=tuple(padded.shape[-2:]), mode="area")
            references.append(self.first(patchify(ref, p)))
        img = self.first(patchify(padded, p))
        t, tvec = self._time(timesteps, img.dtype)
        txt = self._text(context, options)
        n_txt, n_refs = txt.shape[1], sum(ref.shape[1] for ref in references)
        combined = torch.cat([txt, *references, img], dim=1)  # ``[txt | ref 1 ... ref N | image]``
        ids = [grid_ids(h_len, w_len, i + 1, batch, x.device) for i in range(len(references))]
        ids.append(grid_ids(h_len, w_len, 0, batch, x.device))
        pos = torch.cat([torch.zeros(batch, n_txt, 3, dtype=torch.float64, device=x.device), *ids], dim=1)
        freqs = self.pe_embedder(pos).to(torch.promote_types(x.dtype, torch.float32))
        for block in self.blocks:  # called as modules, with or without references
            combined = block(combined, tvec, freqs, None, transformer_options=options)
        return self._output(combined, t, n_txt + n_refs, (h_len, w_len), (height, width)).unsqueeze(2)
