"""Whole small DiTs built from tests/support/dit_blocks.py, called the way the hosts call theirs.

Written from the hosts' interfaces (no host code copied), at Forge 2.x dfdcbab, reForge 3b56b26,
A1111 82a973c:

* :class:`TinyFlux` follows Forge 2.x ``IntegratedFluxTransformer2DModel.forward(x, timestep, context,
  y, guidance=None, **kwargs)`` (``backend/nn/flux.py:400-420``): circular pad of odd sides, 2x2
  patches row-major, position ids ``(0, row, col)`` with text at 0, ``pe`` from them; double blocks
  called ``block(img=, txt=, vec=, pe=)`` (all keywords, ``flux.py:389``), then ``cat(txt, img)`` and
  single blocks called ``block(x, vec=, pe=)`` (``flux.py:392``); output cropped to the input size.
  ``ref_latents`` appends reference-image tokens after the image as reForge's Flux Kontext does
  (``ldm_patched/ldm/flux/model.py:224-243``).
* :class:`TinyMMDiT` follows the MMDiT ``forward(x, t, y=None, context=None)`` of A1111
  (``modules/models/sd3/mmdit.py:603``) and Forge 2.x (``backend/nn/mmditx.py:940``): a stride-2 conv
  patch embedding (no pad: Forge 2.x, A1111; ``pad=True``: reForge's circular ``dynamic_img_pad``),
  an additive position embedding, blocks called ``block(context, x, c=c_mod)``
  (``mmdit.py:598``), optional SD3.5 ``attn2`` in chosen blocks.

Weights are random (``randomize``), biases included, so that every path reaches the output.  The
defaults are tiny; the keyword arguments (``mlp_ratio``, ``context_dim``, ``vec_dim``/``y_dim``, ``axes``,
``pos_size``) also build the released widths (``benchmarks/dit_step.py``: Flux, SD3.5 Medium).
"""

from __future__ import annotations

import torch
from torch import nn

from tests.support.dit_blocks import (
    DoubleStreamBlock,
    JointBlock,
    SingleStreamBlock,
    check_axes,
    pad_to_patch,
    patchify,
    rope_rotations,
    token_ids,
    unpatchify,
)
from tests.support.sizes import Sizes

AXES = (4, 6, 6)  # RoPE axes: their sum is the head width (hidden 32 / 2 heads)


def randomize(model: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Random weights everywhere; norm scales stay near 1 (the blocks' RMSNorm ``scale``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("scale"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


class TinyFlux(nn.Module):
    """Flux/Chroma layout: ``double_blocks``, ``single_blocks``, RoPE over ``(txt, img, extra)``.

    ``axes``: the RoPE axes (their sum is the head width ``hidden / heads``); ``context_dim`` the text
    width (Flux: T5's 4096), ``vec_dim`` the pooled vector's (Flux: CLIP's 768)."""

    SIZES = Sizes(channels=4, hidden=32, heads=2, depth=2, single=3, mlp_ratio=2, context_dim=12, vec_dim=8, axes=AXES)

    def __init__(self, **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        channels, hidden, heads, mlp_ratio, axes = s.channels, s.hidden, s.heads, s.mlp_ratio, s.axes
        check_axes(axes, hidden, heads)
        self.channels, self.axes = channels, tuple(axes)
        self.img_in = nn.Linear(4 * channels, hidden)
        self.txt_in = nn.Linear(s.context_dim, hidden)
        self.time_in = nn.Linear(1, hidden)
        self.vector_in = nn.Linear(s.vec_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, heads, mlp_ratio) for _ in range(s.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, heads, mlp_ratio) for _ in range(s.single))
        self.final_layer = nn.Linear(hidden, 4 * channels)

    def forward(self, x, timestep, context, y, guidance=None, ref_latents=None, **kwargs):
        height, width = x.shape[-2:]
        x = pad_to_patch(x, 2)
        h_len, w_len = x.shape[-2] // 2, x.shape[-1] // 2
        img = self.img_in(patchify(x, 2))
        extra = 0
        if ref_latents is not None:  # reForge's Kontext: reference tokens after the image
            ref = self.img_in(patchify(pad_to_patch(ref_latents, 2), 2))
            img, extra = torch.cat([img, ref], dim=1), ref.shape[1]
        txt = self.txt_in(context)
        vec = self.time_in(timestep[:, None].to(x.dtype)) + self.vector_in(y)
        ids = token_ids(txt.shape[1], h_len, w_len, extra, batch=x.shape[0], device=x.device)
        pe = rope_rotations(ids, self.axes).to(torch.promote_types(x.dtype, torch.float32))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        joint = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            joint = block(joint, vec=vec, pe=pe)
        img = joint[:, txt.shape[1] : txt.shape[1] + h_len * w_len]
        return unpatchify(self.final_layer(img), self.channels, h_len, w_len, 2)[..., :height, :width]


class TinyMMDiT(nn.Module):
    """SD3/SD3.5 layout: ``joint_blocks[i].x_block.attn.ln_q`` (and ``attn2`` where SD3.5 has it).

    ``context_dim``: the text width (SD3: 4096), ``y_dim`` the pooled vector's (SD3: 2048),
    ``pos_size``: sides of the position-embedding table (patches; the grid must fit in it)."""

    SIZES = Sizes(channels=4, hidden=32, heads=2, depth=3, mlp_ratio=2, context_dim=12, y_dim=8, pos_size=16)

    def __init__(self, *, pad: bool = False, qk_norm: bool = True, attn2_blocks: tuple[int, ...] = (), **sizes):
        super().__init__()
        s = self.SIZES.for_call(type(self), sizes)
        channels, hidden, heads, pos_size = s.channels, s.hidden, s.heads, s.pos_size
        self.channels, self.pad = channels, pad
        self.x_embedder = nn.Conv2d(channels, hidden, 2, stride=2)
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden, pos_size, pos_size))
        self.context_embedder = nn.Linear(s.context_dim, hidden)
        self.t_embedder = nn.Linear(1, hidden)
        self.y_embedder = nn.Linear(s.y_dim, hidden)
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden, heads, qk_norm, attn2=i in attn2_blocks, mlp_ratio=s.mlp_ratio) for i in range(s.depth)
        )
        self.final_layer = nn.Linear(hidden, 4 * channels)

    def forward(self, x, t, y=None, context=None, **kwargs):
        height, width = x.shape[-2:]
        x = pad_to_patch(x, 2) if self.pad else x
        grid = self.x_embedder(x)
        h_len, w_len = grid.shape[-2:]
        tokens = (grid + self.pos_embed[..., :h_len, :w_len]).flatten(2).transpose(1, 2)
        c_mod = self.t_embedder(t[:, None].to(x.dtype)) + self.y_embedder(y)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            context, tokens = block(context, tokens, c=c_mod)
        out = unpatchify(self.final_layer(tokens), self.channels, h_len, w_len, 2)
        return out[..., :height, :width] if self.pad else out
