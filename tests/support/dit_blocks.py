"""Small from-scratch DiT blocks with the hosts' attention math, for testing lib_seg.dit.

Written from the structure described in ``docs/dit.md`` (no host code copied):

* :class:`DoubleStreamBlock`: Flux/Chroma double-stream block (Forge ``backend/nn/flux.py:206-264``,
  reForge ``flux/layers.py:162-208``): image and text streams each modulate, project to q/k/v
  ``(B, heads, L, D)`` and QK-norm (RMSNorm) their own q/k; the sequence is ``cat(txt, img)``;
  ``attention()`` applies RoPE to q and k, then fused attention (Forge ``flux.py:15-18``, reForge
  ``flux/math.py:9-21``); the output is split back into the streams.
* :class:`SingleStreamBlock`: Flux/Chroma single-stream block (Forge ``flux.py:283-307``, reForge
  ``flux/layers.py:247-261``): one joint sequence, one ``linear1`` for qkv and MLP, QK-norm on all
  tokens, RoPE, attention, ``linear2`` over ``cat(attention, gelu(mlp))``.
* :class:`JointBlock`: SD3/SD3.5 MMDiT joint block (Forge ``backend/nn/mmditx.py:323-329, 636-692``,
  A1111 ``modules/models/sd3/mmdit.py:221-232, 411-430``): context and image blocks project q/k/v
  ``(B, L, heads, D)``, ``ln_q``/``ln_k`` (RMSNorm, or Identity as in A1111's SD3), reshape to
  ``(B, L, heads*D)``, concatenate context first; no RoPE.

:class:`EmbedND`, :func:`patchify` / :func:`unpatchify`, :func:`pad_to_patch` and :func:`rope_rotations` are the
token layout the tiny DiTs of tests/support share (each model file cites the host lines it follows).

:func:`attention_function` is the hosts' attention seam (a module attribute with their signature, looked up at
call time), which ``tools/dit_backend_smoke.py --host imitation`` swaps for its reference.

:class:`Hooks` exposes the hook points a host adapter has: the QK-norm (``ln_q``) output, the q
entering attention, and (for the slow reference) the pre-softmax logits; setting ``logits`` makes the
block compute attention explicitly (softmax of the logits) instead of through the fused kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Hook = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Hooks:
    q_norm: Hook | None = None  # Flux: QK-norm output (image q of a double block, joint q of a single one),
    # before RoPE; MMDiT: the image block's ln_q output (B, L_img, heads, D)
    attention_q: Hook | None = None  # q as it enters attention: Flux (B, heads, L, D) after RoPE; MMDiT (B, L, heads*D)
    logits: Hook | None = None  # pre-softmax logits (B, heads, L, L); when set, attention is computed explicitly
    logits2: Hook | None = None  # the same for SD3.5's image-only second attention (``x_block.attn2``)
    seen: dict[str, torch.Tensor] | None = None  # a dict here records q, k, v as they entered attention
    # (off by default: a whole model would keep every block's q, k, v alive, 5 GB per row at Flux size)


def _hook(hook: Hook | None, x: torch.Tensor) -> torch.Tensor:
    return x if hook is None else hook(x)


def attention_function(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask=None, skip_reshape: bool = False
) -> torch.Tensor:
    """The hosts' fused attention function, with their signature: q/k/v (B, L, heads*D), or (B, heads, L, D)
    with ``skip_reshape`` (Flux's call after RoPE); returns (B, L, heads*D).

    Why a module attribute: it is the seam the hosts have (Forge 2.x ``backend.nn.flux.attention_function``,
    ``backend.nn.mmditx.attention``; reForge ``ldm_patched.ldm.flux.math.optimized_attention``), looked up at
    call time, which ``tools/dit_backend_smoke.py --host imitation`` swaps for its attention-swap reference.
    :func:`attend` calls it through this module's globals, so a swapped one is what every block runs."""
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hooks: Hooks, mask: torch.Tensor | None = None):
    """Attention over (B, heads, L, D): :func:`attention_function` (the fused kernel), or
    softmax(hooks.logits(q k^T / sqrt D) + mask) v.  ``mask``: boolean (True attends) or additive."""
    if hooks.seen is not None:
        hooks.seen.update(q=q, k=k, v=v)
    if hooks.logits is None:
        heads = q.shape[1]  # back to (B, heads, L, D): the blocks split and project per stream
        out = attention_function(q, k, v, heads, mask=mask, skip_reshape=True)
        return out.unflatten(-1, (heads, -1)).transpose(1, 2)
    logits = hooks.logits(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5)
    if mask is not None:
        logits = logits.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else logits + mask
    return torch.softmax(logits, dim=-1) @ v


OVERRIDE = "optimized_attention_override"


def wrap_attn(func: Callable) -> Callable:
    """Neo >= 2.27's and ComfyUI's decorator of every attention kernel: when the call's
    ``transformer_options`` hold ``optimized_attention_override``, the call becomes
    ``override(func, *args, **kwargs)`` (Neo 2.29.1 ``backend/attention.py``, youlijie/sd-webui-forge-classic
    b3b8a1e5; ComfyUI ``comfy/ldm/modules/attention.py`` ``wrap_attn``)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        options = kwargs.get("transformer_options")
        override = options.get(OVERRIDE) if isinstance(options, dict) else None
        return func(*args, **kwargs) if override is None else override(func, *args, **kwargs)

    return wrapper


@wrap_attn
def neo_attention(q, k, v, heads, mask=None, skip_reshape=False, transformer_options=None, hooks=None):
    """Neo's ``backend.attention.attention_function(q, k, v, heads, mask=None, skip_reshape=False,
    transformer_options=...)``: q/k/v (B, L, heads*D), or (B, heads, L, D) with ``skip_reshape``; returns
    (B, L, heads*D).  The model files import it into their module globals and call it by that name at
    call time (Neo 2.26 de2193d and 2.29 ``backend/nn/lumina.py``, ``anima.py``, ``krea.py``, ``qwen21.py``).
    ``hooks`` is the tests' own extra (the slow reference's logit hook and the q/k/v record)."""
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return attend(q, k, v, hooks or Hooks(), mask).transpose(1, 2).flatten(2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


def rope_rotations(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """Flux's ``pe`` for position ids (B, L, axes): (B, 1, L, D/2, 2, 2) rotation matrices, axis by axis
    (float64, on the ids' device)."""
    blocks = []
    for axis, dim in enumerate(axes_dim):
        omega = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angle = ids[..., axis, None].double() * omega  # (B, L, dim/2)
        cos, sin = torch.cos(angle), torch.sin(angle)
        blocks.append(torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)))
    return torch.cat(blocks, dim=-3).unsqueeze(1)


class EmbedND(nn.Module):
    """Flux's ``EmbedND``, which the hosts' DiTs call as a module on their position ids (``pe_embedder``: Flux.2,
    Qwen-Image, Qwen-Image 2.1, Krea 2; ``rope_embedder``: NextDiT, Wan): (B, L, axes) ids -> (B, 1, L, D/2, 2, 2)
    2x2 maps, axis by axis.  ``maps``: :func:`rope_rotations` (Ernie-Image's ``pos_embed`` gives split-half maps
    instead, tests/support/dit_ernie.py)."""

    maps = staticmethod(rope_rotations)

    def __init__(self, axes: tuple[int, ...], theta: float = 10000.0):
        super().__init__()
        self.axes, self.theta = tuple(axes), theta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.maps(ids, self.axes, self.theta)


def check_axes(axes: tuple[int, ...], hidden: int, heads: int) -> None:
    """The RoPE axes must cover the head width ``hidden / heads`` (the hosts' ``axes_dim``)."""
    if sum(axes) != hidden // heads:
        raise ValueError(f"RoPE axes {axes} do not sum to the head width {hidden // heads}")


def patchify(x: torch.Tensor, patch: int, channels_last: bool = False) -> torch.Tensor:
    """(B, C, h*p, w*p) -> (B, h*w, C*p*p), patches row-major.  Inside a patch channel-major, ``(c ph pw)`` as
    Flux's ``rearrange`` has it (Flux.1/2, Qwen-Image, Krea 2), or ``(ph pw c)`` with ``channels_last``
    (NextDiT, Neo's ``lumina.py:358-359``)."""
    b, c, height, width = x.shape
    order = (0, 2, 4, 3, 5, 1) if channels_last else (0, 2, 4, 1, 3, 5)
    tokens = x.reshape(b, c, height // patch, patch, width // patch, patch).permute(*order)
    return tokens.reshape(b, (height // patch) * (width // patch), c * patch * patch)


def unpatchify(
    tokens: torch.Tensor, channels: int, h_len: int, w_len: int, patch: int, channels_last: bool = False
) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, h*w, C*p*p) -> (B, C, h*p, w*p)."""
    b = tokens.shape[0]
    if channels_last:
        x = tokens.reshape(b, h_len, w_len, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    else:
        x = tokens.reshape(b, h_len, w_len, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h_len * patch, w_len * patch)


def pad_to_patch(x: torch.Tensor, patch: int | tuple[int, ...]) -> torch.Tensor:
    """The hosts' ``pad_to_patch_size``: the sides after (B, C) padded circularly up to multiples of ``patch`` (an
    int: the last two sides; a tuple: one per side, Wan's ``(1, 2, 2)`` over (T, H, W))."""
    sides = x.shape[2:]
    patches = (1,) * (len(sides) - 2) + (patch, patch) if isinstance(patch, int) else tuple(patch)
    pad = [n for side, p in zip(reversed(sides), reversed(patches), strict=True) for n in (0, (-side) % p)]
    return F.pad(x, pad, mode="circular") if any(pad) else x


def rope_complex(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE as complex multiplication: channel pair (a, b) is a + ib, times e^{i angle} read off ``pe``.

    In float32 or wider, as the hosts rotate (there is no bfloat16 complex type); returns ``x``'s dtype."""
    turn = torch.complex(pe[..., 0, 0], pe[..., 1, 0])
    work = torch.promote_types(x.dtype, torch.float32)
    pairs = torch.view_as_complex(x.to(work).unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


def token_ids(
    n_txt: int, h_len: int, w_len: int, n_extra: int = 0, batch: int = 1, device: torch.device | None = None
) -> torch.Tensor:
    """Position ids of ``[txt | img | extra]``: text at 0, image (0, row, col), extra (1, row, col)."""
    with nullcontext() if device is None else torch.device(device):
        rows, cols = torch.meshgrid(torch.arange(h_len), torch.arange(w_len), indexing="ij")
        image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        extra = torch.stack([torch.ones(n_extra), torch.arange(n_extra) // 2, torch.arange(n_extra) % 2], dim=-1)
        ids = torch.cat([torch.zeros(n_txt, 3), image.double(), extra.double()])
    return ids.double().expand(batch, -1, -1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift


def _heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3*heads*D) -> three (B, heads, L, D)."""
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return q, k, v


def _mlp(hidden: int, ratio: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden, ratio * hidden), nn.GELU(approximate="tanh"), nn.Linear(ratio * hidden, hidden)
    )


class QKNorm(nn.Module):
    """The hosts' QK-norm module: called as ``norm(q, k, v)``, returns ``(q, k)`` normalised per head."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class _Stream(nn.Module):
    """One stream of a double block (``img_attn`` / ``txt_attn``): modulation, qkv, QK-norm ``norm``,
    output projection and MLP.  The hosts keep modulation and MLP beside ``*_attn``; only the
    ``*_attn.norm`` path matters to the adapter.  ``mlp_ratio``: MLP width over ``hidden`` (Flux: 4)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.mod = nn.Linear(hidden, 6 * hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.norm = QKNorm(hidden // heads)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = _mlp(hidden, mlp_ratio)

    def qkv_of(self, x: torch.Tensor, vec: torch.Tensor):
        mod = self.mod(F.silu(vec))[:, None].chunk(6, dim=-1)
        q, k, v = _heads(self.qkv(_modulate(x, mod[0], mod[1])), self.heads)
        q, k = self.norm(q, k, v)
        return q, k, v, mod

    def finish(self, x: torch.Tensor, attention: torch.Tensor, mod) -> torch.Tensor:
        x = x + mod[2] * self.proj(attention)
        return x + mod[5] * self.mlp(_modulate(x, mod[3], mod[4]))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 2, mlp_ratio: int = 2):
        super().__init__()
        self.img_attn, self.txt_attn = _Stream(hidden, heads, mlp_ratio), _Stream(hidden, heads, mlp_ratio)
        self.hooks = Hooks()  # used when a call passes none (a whole model calls its blocks plainly)

    def forward(self, img, txt, vec, pe, hooks: Hooks | None = None):
        hooks = hooks or self.hooks
        img_q, img_k, img_v, img_mod = self.img_attn.qkv_of(img, vec)
        txt_q, txt_k, txt_v, txt_mod = self.txt_attn.qkv_of(txt, vec)
        img_q = _hook(hooks.q_norm, img_q)  # image-only, before RoPE
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        q = _hook(hooks.attention_q, rope_complex(q, pe))
        out = attend(q, rope_complex(k, pe), v, hooks).transpose(1, 2).flatten(2)
        n_txt = txt.shape[1]
        return self.img_attn.finish(img, out[:, n_txt:], img_mod), self.txt_attn.finish(txt, out[:, :n_txt], txt_mod)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 2, mlp_ratio: int = 2):
        super().__init__()
        self.heads, self.hidden, self.mlp_width = heads, hidden, mlp_ratio * hidden
        self.mod = nn.Linear(hidden, 3 * hidden)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_width)
        self.norm = QKNorm(hidden // heads)
        self.linear2 = nn.Linear(hidden + self.mlp_width, hidden)
        self.hooks = Hooks()

    def forward(self, x, vec, pe, hooks: Hooks | None = None):
        hooks = hooks or self.hooks
        shift, scale, gate = self.mod(F.silu(vec))[:, None].chunk(3, dim=-1)
        qkv, mlp = self.linear1(_modulate(x, shift, scale)).split([3 * self.hidden, self.mlp_width], dim=-1)
        q, k, v = _heads(qkv, self.heads)
        q, k = self.norm(q, k, v)
        q = _hook(hooks.q_norm, q)  # the whole joint sequence, before RoPE
        q = _hook(hooks.attention_q, rope_complex(q, pe))
        out = attend(q, rope_complex(k, pe), v, hooks).transpose(1, 2).flatten(2)
        return x + gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1))


class _MMDiTAttention(nn.Module):
    """MMDiT's ``attn`` (and SD3.5's ``attn2``): qkv, ``ln_q``/``ln_k`` on (B, L, heads, D), projection."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        norm = (lambda: RMSNorm(hidden // heads)) if qk_norm else nn.Identity
        self.ln_q, self.ln_k = norm(), norm()
        self.proj = nn.Linear(hidden, hidden)

    def pre_attention(self, x: torch.Tensor, q_hook: Hook | None):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q = _hook(q_hook, self.ln_q(q))  # (B, L, heads, D)
        return q.flatten(2), self.ln_k(k).flatten(2), v.flatten(2)


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


class _MMDiTHalf(nn.Module):
    """MMDiT's per-stream ("dismantled") block: adaLN, ``attn``, MLP; SD3.5's image stream may add
    ``attn2``, a self-attention over the image tokens alone (Forge ``mmditx.py:476-485, 562-589``)."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool, attn2: bool = False, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.ada = nn.Linear(hidden, (9 if attn2 else 6) * hidden)
        self.attn = _MMDiTAttention(hidden, heads, qk_norm)
        self.attn2 = _MMDiTAttention(hidden, heads, qk_norm) if attn2 else None
        self.x_block_self_attn = attn2  # the hosts' ``DismantledBlock`` flag for attn2
        self.mlp = _mlp(hidden, mlp_ratio)

    def pre_attention(self, x, c, q_hook: Hook | None):
        mod = self.ada(F.silu(c))[:, None].chunk(9 if self.attn2 is not None else 6, dim=-1)
        q, k, v = self.attn.pre_attention(_modulate(x, mod[0], mod[1]), q_hook)
        return q, k, v, mod

    def self_attention2(self, x, mod, hooks: Hooks) -> torch.Tensor:
        """SD3.5's image-only second attention, added to the stream with its own gate."""
        q, k, v = self.attn2.pre_attention(_modulate(x, mod[6], mod[7]), None)
        out = attend(*(_per_head(t, self.heads) for t in (q, k, v)), Hooks(logits=hooks.logits2))
        return mod[8] * self.attn2.proj(out.transpose(1, 2).flatten(2))

    def post_attention(self, x, attention, mod, extra: torch.Tensor | None = None):
        x = x + mod[2] * self.attn.proj(attention) + (0 if extra is None else extra)
        return x + mod[5] * self.mlp(_modulate(x, mod[3], mod[4]))


class JointBlock(nn.Module):
    def __init__(self, hidden: int = 32, heads: int = 2, qk_norm: bool = True, attn2: bool = False, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.context_block = _MMDiTHalf(hidden, heads, qk_norm, mlp_ratio=mlp_ratio)
        self.x_block = _MMDiTHalf(hidden, heads, qk_norm, attn2, mlp_ratio)
        self.hooks = Hooks()

    def forward(self, context, x, c, hooks: Hooks | None = None):
        hooks = hooks or self.hooks
        ctx_q, ctx_k, ctx_v, ctx_mod = self.context_block.pre_attention(context, c, None)
        x_q, x_k, x_v, x_mod = self.x_block.pre_attention(x, c, hooks.q_norm)
        q = _hook(hooks.attention_q, torch.cat([ctx_q, x_q], dim=1))  # (B, L, heads*D), context first
        k, v = torch.cat([ctx_k, x_k], dim=1), torch.cat([ctx_v, x_v], dim=1)
        out = attend(*(_per_head(t, self.heads) for t in (q, k, v)), hooks).transpose(1, 2).flatten(2)
        extra = self.x_block.self_attention2(x, x_mod, hooks) if self.x_block.attn2 is not None else None
        n_ctx = context.shape[1]
        return (
            self.context_block.post_attention(context, out[:, :n_ctx], ctx_mod),
            self.x_block.post_attention(x, out[:, n_ctx:], x_mod, extra),
        )
