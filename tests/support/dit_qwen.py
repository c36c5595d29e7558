"""A small from-scratch Qwen-Image / Qwen-Image-Edit with the attention math of Neo's ``backend/nn/qwen.py``.

Written from the structure of Neo 2.26 (exo101/sd-webui-forge-neo-v3 de2193d, ``webui/backend/nn/qwen.py``,
``QwenImageTransformer2DModel``, lines 169-483); no host code copied.  What SEG must read from it:

* the latent is 5D, ``(B, 16, T=1, H, W)`` (the Wan VAE, ``diffusion_engine/qwen.py``); odd sides are
  padded circularly to the patch (``pad_to_patch_size``), 2x2 patches row-major, channel-major inside
  a patch, so ``img_in`` takes ``16 * 4 = 64`` features (``process_img``, lines 371-389); the output
  is cropped back to ``H x W``;
* position ids (axis 0 index, row, column) centred on the grid: ``row - h_len // 2``,
  ``col - w_len // 2``; the text's ids are ``t, t, t`` for ``t`` from ``max(h_len // 2, w_len // 2)``
  on (MSRoPE); ``pe_embedder(ids)`` (Flux's ``EmbedND``, called as a module) gives 2x2 rotations
  ``(B, 1, L, D/2, 2, 2)``, which the model reshapes to ``(B, L, 1, D/2, 2, 2)`` (lines 426-429);
* each block's ``attn`` projects the image stream (``to_q``...) and the text stream
  (``add_q_proj``...) separately, normalises q/k per head with four RMSNorm modules (``norm_q``,
  ``norm_k``, ``norm_added_q``, ``norm_added_k``, called as modules), joins ``[txt | img]``, and then
  applies RoPE in the plain function :func:`apply_rotary_emb` to the ``(B, L, heads, D)`` queries and
  keys (lines 208-234); no mask reaches the attention (Neo passes ``attention_mask`` None);
* the blocks are called ``block(hidden_states=, encoder_hidden_states=, encoder_hidden_states_mask=,
  temb=, image_rotary_emb=)`` and return ``(encoder_hidden_states, hidden_states)`` (text first);
* Qwen-Image-Edit's reference latents (``ref_latents``, in Neo from ``dynamic_args.ref_latents``) are
  patchified the same way and appended after the image tokens in the image stream, their ids axis 0
  = 1, 2, ... (``"index"`` method) and centred on their own grid (lines 399-424).

:meth:`TinyQwen.offload` imitates Neo's Nunchaku build with ``svdq_cpu_offload`` (``backend/nn/svdq.py``
694-697 and nunchaku's ``CPUOffloadManager.get_block``): blocks past the first run as two buffer copies
that get each block's weights copied in, so hooks on ``transformer_blocks[i]`` never fire for them.

The attention honours :class:`tests.support.dit_blocks.Hooks` on ``attn.hooks`` (``logits`` => explicit
softmax, ``seen`` => record q/k/v entering attention) for the slow logit-blur reference.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tests.support.dit_blocks import EmbedND, Hooks, RMSNorm, attend, check_axes, pad_to_patch, patchify, unpatchify
from tests.support.sizes import Sizes

AXES = (4, 6, 6)  # three RoPE axes summing to the head width (hidden 32 / 2 heads); Qwen-Image: 16, 56, 56
THETA = 10000.0


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, L, heads, D) with rotations (B, L, 1, D/2, 2, 2): pair i of token l becomes
    ``freqs[l, i] @ (x_2i, x_2i+1)``, in ``x``'s dtype (a plain function, as the host's)."""
    pairs = x.unflatten(-1, (-1, 1, 2))  # (B, L, heads, D/2, 1, 2)
    out = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
    return out.reshape(x.shape)


class QwenAttention(nn.Module):
    """Joint attention over ``[txt | img]``, separate weights per stream (the names the hooks find)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, head = heads, hidden // heads
        self.norm_q, self.norm_k = RMSNorm(head), RMSNorm(head)
        self.norm_added_q, self.norm_added_k = RMSNorm(head), RMSNorm(head)
        self.to_q, self.to_k, self.to_v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(hidden, hidden) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(hidden, hidden), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(hidden, hidden)
        self.hooks = Hooks()

    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        n_txt = encoder_hidden_states.shape[1]
        split = lambda t: t.unflatten(-1, (self.heads, -1))  # noqa: E731  (B, L, heads, D)
        img_q = self.norm_q(split(self.to_q(hidden_states)))
        img_k = self.norm_k(split(self.to_k(hidden_states)))
        img_v = split(self.to_v(hidden_states))
        txt_q = self.norm_added_q(split(self.add_q_proj(encoder_hidden_states)))
        txt_k = self.norm_added_k(split(self.add_k_proj(encoder_hidden_states)))
        txt_v = split(self.add_v_proj(encoder_hidden_states))
        q = apply_rotary_emb(torch.cat([txt_q, img_q], dim=1), image_rotary_emb)
        k = apply_rotary_emb(torch.cat([txt_k, img_k], dim=1), image_rotary_emb)
        v = torch.cat([txt_v, img_v], dim=1)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.hooks).transpose(1, 2).flatten(2)
        return self.to_out[1](self.to_out[0](out[:, n_txt:])), self.to_add_out(out[:, :n_txt])


class FeedForward(nn.Module):
    def __init__(self, hidden: int, ratio: int = 2):
        super().__init__()
        self.net = nn.ModuleList(
            [nn.Linear(hidden, ratio * hidden), nn.GELU("tanh"), nn.Linear(ratio * hidden, hidden)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class QwenBlock(nn.Module):
    """``QwenImageTransformerBlock``: adaLN per stream (``img_mod``/``txt_mod``), joint ``attn``, MLPs."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.img_mlp, self.txt_mlp = FeedForward(hidden, mlp_ratio), FeedForward(hidden, mlp_ratio)
        self.attn = QwenAttention(hidden, heads)

    @staticmethod
    def _modulate(x, mod):
        shift, scale, gate = mod.chunk(3, dim=-1)
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        return normed * (1 + scale[:, None]) + shift[:, None], gate[:, None]

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None):
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_in, img_gate1 = self._modulate(hidden_states, img_mod1)
        txt_in, txt_gate1 = self._modulate(encoder_hidden_states, txt_mod1)
        img_out, txt_out = self.attn(
            hidden_states=img_in,
            encoder_hidden_states=txt_in,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
        )
        img = hidden_states + img_gate1 * img_out
        txt = encoder_hidden_states + txt_gate1 * txt_out
        img_in2, img_gate2 = self._modulate(img, img_mod2)
        txt_in2, txt_gate2 = self._modulate(txt, txt_mod2)
        return txt + txt_gate2 * self.txt_mlp(txt_in2), img + img_gate2 * self.img_mlp(img_in2)


def centred_ids(h_len: int, w_len: int, index: float, batch: int, device) -> torch.Tensor:
    """Image ids ``(index, row - h_len // 2, col - w_len // 2)``, row-major: (batch, h_len * w_len, 3)."""
    rows, cols = torch.meshgrid(torch.arange(h_len), torch.arange(w_len), indexing="ij")
    ids = torch.stack([torch.full_like(rows, 0) + index, rows - h_len // 2, cols - w_len // 2], dim=-1)
    return ids.reshape(1, -1, 3).double().expand(batch, -1, -1).to(device)


class TinyQwen(nn.Module):
    """Qwen-Image layout at test size: ``forward(x, timesteps, context, attention_mask=None, guidance=None,
    ref_latents=None, transformer_options={}, control=None)`` as Neo's ``KModel.apply_model`` calls it
    (``context`` the Qwen2.5-VL hidden states; no pooled vector, no guidance embedding).

    Released widths (``benchmarks/dit_step.py``): hidden 3072 = 24 heads x 128, depth 60, ``mlp_ratio`` 4,
    ``context_dim`` 3584, ``axes`` (16, 56, 56), ``channels`` 16.  ``patch_attr``: a deliberately wrong
    ``patch_size`` attribute, to check that the model's own position ids catch it (the host's patchify
    is 2x2 whatever the attribute says)."""

    SIZES = Sizes(channels=4, hidden=32, heads=2, depth=3, mlp_ratio=2, context_dim=12, axes=AXES)

    def __init__(self, *, patch_attr: int | None = None, **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        channels, hidden, heads, context_dim, axes = s.channels, s.hidden, s.heads, s.context_dim, s.axes
        check_axes(axes, hidden, heads)
        self.patch_size = 2 if patch_attr is None else patch_attr
        self.channels = channels
        self.in_channels = 4 * channels
        self.pe_embedder = EmbedND(axes, THETA)
        self.time_text_embed = nn.Linear(1, hidden)
        self.txt_norm = RMSNorm(context_dim)
        self.img_in = nn.Linear(4 * channels, hidden)
        self.txt_in = nn.Linear(context_dim, hidden)
        self.transformer_blocks = nn.ModuleList(QwenBlock(hidden, heads, s.mlp_ratio) for _ in range(s.depth))
        self.norm_out = nn.Linear(hidden, 2 * hidden)
        self.proj_out = nn.Linear(hidden, 4 * channels)
        self._offload: tuple[int, list[nn.Module]] | None = None

    def offload(self, on_gpu: int = 1) -> None:
        """From now on, blocks ``on_gpu`` and later run as buffer copies of block 0 (made now, so without any
        hook registered later), loaded with each block's weights before it runs."""
        self._offload = (on_gpu, [copy.deepcopy(self.transformer_blocks[0]) for _ in range(2)])

    def _block(self, index: int) -> nn.Module:
        block = self.transformer_blocks[index]
        if self._offload is None or index < self._offload[0]:
            return block
        buffer = self._offload[1][index % 2]
        buffer.load_state_dict(block.state_dict())
        return buffer

    def process_img(self, x: torch.Tensor, index: float = 0):
        """(B, C, 1, H, W) -> tokens (B, h*w, 4C), centred ids, the padded shape."""
        padded = pad_to_patch(x, 2)
        h_len, w_len = padded.shape[-2] // 2, padded.shape[-1] // 2
        tokens = patchify(padded.squeeze(2), 2)  # the one frame's 2x2 patches, channel-major
        return tokens, centred_ids(h_len, w_len, index, x.shape[0], x.device), padded.shape

    def forward(
        self,
        x,
        timesteps,
        context,
        attention_mask=None,
        guidance=None,
        ref_latents=None,
        transformer_options=None,
        control=None,
        **kwargs,
    ):
        img, img_ids, padded = self.process_img(x)
        n_image = img.shape[1]
        for index, ref in enumerate(ref_latents or (), start=1):  # Qwen-Image-Edit: references after the image
            tokens, ids, _ = self.process_img(ref.to(x), index)
            img, img_ids = torch.cat([img, tokens], dim=1), torch.cat([img_ids, ids], dim=1)
        h_len, w_len = padded[-2] // 2, padded[-1] // 2
        start = max(h_len // 2, w_len // 2)
        txt_ids = torch.arange(start, start + context.shape[1], dtype=torch.float64, device=x.device)
        txt_ids = txt_ids.reshape(1, -1, 1).repeat(x.shape[0], 1, 3)
        pe = self.pe_embedder(torch.cat([txt_ids, img_ids], dim=1)).squeeze(1).unsqueeze(2).to(x.dtype)
        hidden = self.img_in(img)
        text = self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(timesteps[:, None].to(x.dtype))
        for index in range(len(self.transformer_blocks)):
            text, hidden = self._block(index)(
                hidden_states=hidden,
                encoder_hidden_states=text,
                encoder_hidden_states_mask=attention_mask,
                temb=temb,
                image_rotary_emb=pe,
            )
        scale, shift = self.norm_out(F.silu(temb)).chunk(2, dim=-1)
        hidden = F.layer_norm(hidden, hidden.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        out = self.proj_out(hidden)[:, :n_image]
        out = unpatchify(out, x.shape[1], h_len, w_len, 2).unsqueeze(2)
        return out[..., : x.shape[-2], : x.shape[-1]]
