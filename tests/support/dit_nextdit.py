"""A small from-scratch NextDiT (Z-Image / Lumina Image 2 / Neta Lumina) with Neo's attention math.

Written from the structure of Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d,
``webui/backend/nn/lumina.py``, the class ``NextDiT`` that ``backend/loader.py:394-406`` builds for
``Lumina2Transformer2DModel`` and ``ZImageTransformer2DModel`` from the config of
``modules_forge/packages/huggingface_guess/detection.py:43-79``); no host code copied.  What SEG has to
read from it:

* ``forward(x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options={}, **kw)``
  (``lumina.py:388``), called by ``KModel.apply_model`` with ``context`` the text encoder's hidden
  states and no extra conditioning; the output is ``-x`` cropped to the input size;
* the latent is padded circularly to the patch (``pad_to_patch_size``, ``lumina.py:393``), cut into
  ``patch x patch`` squares row-major (``lumina.py:358-359``) and embedded by ``x_embedder``;
* with ``pad_tokens_multiple`` (Z-Image: 32) the caption and the image token runs are each padded to a
  multiple with the learnt ``cap_pad_token`` / ``x_pad_token`` (``lumina.py:351-353, 367-370``);
* position ids (``lumina.py:355-370``): caption token ``i`` is ``(i + 1, 0, 0)``, image token ``(r, c)``
  is ``(n_cap + 1, r, c)`` with ``n_cap`` the padded caption length, image pad tokens ``(0, 0, 0)``;
  ``rope_embedder(ids)`` (Flux's ``EmbedND``, called as a module) turns them into one 2x2 rotation
  per channel pair, moved to ``(B, L, 1, D/2, 2, 2)`` and cast to the latent's dtype (``lumina.py:372``);
* ``context_refiner`` layers (no modulation) run on the caption alone, ``noise_refiner`` layers on
  the image (+ pad) tokens alone, then the main ``layers`` on ``[caption | caption pad | image | image
  pad]`` with ``mask=None`` (``lumina.py:374-386, 413-414``);
* each ``JointAttention`` projects q/k/v ``(B, L, heads, D)`` (grouped k/v heads on Lumina 2), calls
  ``q_norm`` and ``k_norm`` as modules (``nn.RMSNorm``; without ``qk_norm`` one shared ``nn.Identity``
  serves both), rotates q and k with comfy-kitchen's interleaved ``apply_rope`` (pair ``(2i, 2i+1)``
  times the matrix ``freqs[..., i, :, :]``), repeats k/v to the query heads and attends
  (``lumina.py:51-97``);
* the blocks' adaLN: ``scale_msa, gate_msa, scale_mlp, gate_mlp`` from ``adaLN_modulation`` (Z-Image:
  a bare ``Linear``; Lumina 2: ``SiLU`` then ``Linear``), ``x * (1 + scale)``, tanh gates and the
  post-norms ``attention_norm2`` / ``ffn_norm2`` (``lumina.py:118-188``).

Every attention calls ``attention_function(q, k, v, heads, mask, skip_reshape=True, transformer_options=...)``,
a module global here as in Neo's ``lumina.py`` (2.26 de2193d line 95; 2.29 fdb9c164 alike), with q
``(B, heads, L, D)`` after the q-norm and RoPE; it is :func:`tests.support.dit_blocks.neo_attention`, wrapped
by the imitation of ``wrap_attn``.  ``fused=True`` imitates Neo >= 2.27 (youlijie/sd-webui-forge-classic
fdb9c164 ``backend/nn/lumina.py``): q/k norm and RoPE in one kernel (``ck.rms_rope`` / ``rms_rope1``), which
only reads ``q_norm.weight``, so no q-norm module is ever called.  ``kernel`` picks how the attention is
reached: ``"global"`` (the module global, as Neo), ``"attribute"`` (an instance attribute: only
``wrap_attn``'s override can reach it) or ``"private"`` (a kernel that attends by itself and reaches no
seam, as a Nunchaku build may).
``patch_attr`` sets a wrong ``patch_size`` attribute (the model still patchifies by ``patch``).
Every attention honours its :class:`tests.support.dit_blocks.Hooks` (``attention.hooks``) for the slow
logit-blur reference.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.dit_blocks import (
    EmbedND,
    Hooks,
    attend,
    check_axes,
    neo_attention,
    pad_to_patch,
    patchify,
    rope_complex,
    unpatchify,
)
from tests.support.sizes import Sizes

attention_function = neo_attention  # Neo: ``from backend.attention import attention_function``

AXES = (4, 6, 6)  # three RoPE axes summing to the head width (hidden 32 / 2 heads); Z-Image 32/48/48
THETA = 256.0  # Z-Image's rope_theta (Lumina 2: 10000)


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * weight


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, qk_norm: bool, fused: bool = False, kernel="global"):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.fused = heads, kv_heads, dim // heads, fused
        self.kernel = kernel
        if kernel == "attribute":
            self.attention_function = neo_attention
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(heads * self.head_dim, dim, bias=False)
        if qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(self.head_dim), nn.RMSNorm(self.head_dim)
        else:  # one module for both, as Neo has it
            self.q_norm = self.k_norm = nn.Identity()
        self.hooks = Hooks()

    def forward(self, x, x_mask, freqs_cis, transformer_options={}):  # noqa: B006 (Neo's signature)
        # x_mask is None on every Neo call (KModel passes no attention_mask), so it is not applied here
        batch, length, _ = x.shape
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        q, k, v = (t.reshape(batch, length, -1, self.head_dim) for t in self.qkv(x).split(sizes, dim=-1))
        if self.fused and isinstance(self.q_norm, nn.RMSNorm):  # Neo >= 2.27 ck.rms_rope: no module called
            q, k = _rms(q, self.q_norm.weight), _rms(k, self.k_norm.weight)
        else:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = rope_complex(q, freqs_cis), rope_complex(k, freqs_cis)  # (B, L, H, D) x (B, L, 1, D/2, 2, 2)
        repeat = self.heads // self.kv_heads
        k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
        if self.kernel == "private":
            return self.out(attend(q, k, v, self.hooks).transpose(1, 2).flatten(2))
        kernel = self.attention_function if self.kernel == "attribute" else attention_function
        options = transformer_options
        out = kernel(q, k, v, self.heads, None, skip_reshape=True, transformer_options=options, hooks=self.hooks)
        return self.out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JointTransformerBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, qk_norm, modulation, z_image, adaln_dim, ffn_hidden, fused, kernel):
        super().__init__()
        self.attention = JointAttention(dim, heads, kv_heads, qk_norm, fused, kernel)
        self.feed_forward = FeedForward(dim, ffn_hidden)
        self.attention_norm1, self.attention_norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.ffn_norm1, self.ffn_norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.modulation = modulation
        if modulation:
            linear = nn.Linear(adaln_dim, 4 * dim)
            self.adaLN_modulation = nn.Sequential(linear) if z_image else nn.Sequential(nn.SiLU(), linear)

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, transformer_options={}):  # noqa: B006
        def attention(h):
            return self.attention_norm2(self.attention(h, x_mask, freqs_cis, transformer_options=transformer_options))

        if not self.modulation:
            x = x + attention(self.attention_norm1(x))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input)[:, None].chunk(4, dim=-1)
        x = x + gate_msa.tanh() * attention(self.attention_norm1(x) * (1 + scale_msa))
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


def position_ids(n_cap: int, h_len: int, w_len: int, n_pad: int, batch: int, device) -> torch.Tensor:
    """Neo's ids of ``[caption | image | image pad]``: ``(i + 1, 0, 0)``, ``(n_cap + 1, r, c)``, zeros."""
    caption = torch.zeros(n_cap, 3, dtype=torch.float64)
    caption[:, 0] = torch.arange(n_cap, dtype=torch.float64) + 1
    rows, cols = torch.meshgrid(torch.arange(h_len), torch.arange(w_len), indexing="ij")
    image = torch.stack([torch.full_like(rows, n_cap + 1), rows, cols], dim=-1).reshape(-1, 3).double()
    ids = torch.cat([caption, image, torch.zeros(n_pad, 3, dtype=torch.float64)])
    return ids.expand(batch, -1, -1).to(device)


class TinyNextDiT(nn.Module):
    """NextDiT at test size.  ``z_image``: Z-Image's bare-Linear adaLN (Lumina 2: SiLU first);
    ``pad_multiple``: Neo's ``pad_tokens_multiple`` (Z-Image 32, Lumina 2 None); ``kv_heads`` below
    ``heads``: grouped k/v heads (Lumina 2: 24 / 8); ``qk_norm=False``: one shared Identity.
    ``adaln_dim`` (the time embedding's width: Z-Image 256, Lumina 2 1024) and ``ffn_hidden`` (the
    SiLU-gated MLP's width: Z-Image 10240, Lumina 2 9216) also build the released layouts."""

    SIZES = Sizes(channels=4, hidden=32, heads=2, depth=3, patch=2, context_dim=12, axes=AXES).plus(
        kv_heads=None, refiners=2, adaln_dim=16, ffn_hidden=None, theta=THETA
    )
    HOST_NAMES: ClassVar[dict[str, str]] = dict(layers="depth")

    def __init__(
        self,
        *,
        z_image: bool = True,
        pad_multiple: int | None = 4,
        qk_norm: bool = True,
        fused: bool = False,
        kernel: str = "global",
        patch_attr: int | None = None,
        **sizes,
    ):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        channels, hidden, heads, patch, context_dim = s.channels, s.hidden, s.heads, s.patch, s.context_dim
        axes, adaln_dim, ffn_hidden = s.axes, s.adaln_dim, s.ffn_hidden
        check_axes(axes, hidden, heads)
        self.in_channels, self.patch = channels, patch
        self.patch_size = patch if patch_attr is None else patch_attr
        self.pad_tokens_multiple = pad_multiple
        kv_heads = heads if s.kv_heads is None else s.kv_heads

        def block(modulation: bool) -> JointTransformerBlock:
            ffn = 2 * hidden if ffn_hidden is None else ffn_hidden
            return JointTransformerBlock(
                hidden, heads, kv_heads, qk_norm, modulation, z_image, adaln_dim, ffn, fused, kernel
            )

        self.x_embedder = nn.Linear(patch * patch * channels, hidden)
        self.noise_refiner = nn.ModuleList(block(True) for _ in range(s.refiners))
        self.context_refiner = nn.ModuleList(block(False) for _ in range(s.refiners))
        self.t_embedder = nn.Sequential(nn.Linear(1, adaln_dim), nn.SiLU(), nn.Linear(adaln_dim, adaln_dim))
        self.cap_embedder = nn.Sequential(nn.RMSNorm(context_dim), nn.Linear(context_dim, hidden))
        self.layers = nn.ModuleList(block(True) for _ in range(s.depth))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, hidden))
        self.final_linear = nn.Linear(hidden, patch * patch * channels)
        if pad_multiple is not None:
            self.x_pad_token = nn.Parameter(torch.randn(1, hidden))
            self.cap_pad_token = nn.Parameter(torch.randn(1, hidden))
        self.rope_embedder = EmbedND(axes, s.theta)

    def _pad(self, tokens: torch.Tensor, pad_token: nn.Parameter | None) -> torch.Tensor:
        if self.pad_tokens_multiple is None:
            return tokens
        extra = (-tokens.shape[1]) % self.pad_tokens_multiple
        return torch.cat([tokens, pad_token.to(tokens).expand(tokens.shape[0], extra, -1)], dim=1)

    def embed(self, x, timesteps, context) -> tuple:
        """``(adaln, caption tokens, image tokens (padded), h_len, w_len)`` of a call, as ``patchify_and_embed``
        makes them (the ids and rotations are the caller's: Neo and ComfyUI differ there)."""
        p = self.patch
        x = pad_to_patch(x, p)
        h_len, w_len = x.shape[-2] // p, x.shape[-1] // p
        adaln = self.t_embedder((1.0 - timesteps)[:, None].to(x.dtype))
        cap = self._pad(self.cap_embedder(context), getattr(self, "cap_pad_token", None))
        img = self._pad(self.x_embedder(patchify(x, p, channels_last=True)), getattr(self, "x_pad_token", None))
        return adaln, cap, img, h_len, w_len

    def head(self, joint, adaln, n_cap: int, h_len: int, w_len: int, height: int, width: int):
        """The final layer on the image tokens, unpatchified and cropped to the latent."""
        out = self.final_linear(self.final_norm(joint) * (1 + self.final_mod(adaln)[:, None]))
        out = out[:, n_cap : n_cap + h_len * w_len]
        return -unpatchify(out, self.in_channels, h_len, w_len, self.patch, channels_last=True)[..., :height, :width]

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options={}, **kw):  # noqa: B006
        batch, _, height, width = x.shape
        adaln, cap, img, h_len, w_len = self.embed(x, timesteps, context)
        n_cap, n_img = cap.shape[1], h_len * w_len
        ids = position_ids(n_cap, h_len, w_len, img.shape[1] - n_img, batch, x.device)
        freqs = self.rope_embedder(ids).movedim(1, 2).to(x.dtype)  # (B, L, 1, D/2, 2, 2)
        for layer in self.context_refiner:
            cap = layer(cap, attention_mask, freqs[:, :n_cap], transformer_options=transformer_options)
        for layer in self.noise_refiner:
            img = layer(img, None, freqs[:, n_cap:], adaln, transformer_options=transformer_options)
        joint = torch.cat([cap, img], dim=1)
        for layer in self.layers:
            joint = layer(joint, None, freqs, adaln, transformer_options=transformer_options)
        return self.head(joint, adaln, n_cap, h_len, w_len, height, width)


def build(seed: int = 0, **kwargs) -> TinyNextDiT:
    """A float64 TinyNextDiT with random weights everywhere (biases and pad tokens included) and norm
    weights near 1."""
    model = TinyNextDiT(**kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            owner = name.split(".")[-2] if "." in name else ""
            norm = "norm" in owner or name.startswith("cap_embedder.0.")
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if norm else 0.3 * noise)
    return model.double().eval()
