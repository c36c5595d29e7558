"""Wan 2.1 / 2.2 (text- and image-to-video, also one-frame images): self-attention ``blocks`` over the
video's (frames, rows, columns) token grid, then a separate cross-attention to the text.

Read at Neo ``webui/backend/nn/wan.py`` (de2193d; interfaces and math only, no code taken):

* What is blurred: in each chosen block, the self-attention queries of the video tokens, each frame
  over its own ``h x w`` patch grid with the same sigma, frames independent (infinite sigma: each
  frame's mean query).  Why per frame: the paper's energy, and so its blur, is spatial (an image's
  attention map); blurring along time as well would be a different guidance (it mixes frames that
  move).  A one-frame call, how Neo makes Wan images, is therefore exactly image SEG.  Room for later:
  a temporal sigma would be a keyword of :func:`blur_frames` whose default is no temporal blur.
* Hook point: ``blocks[i].self_attn.norm_q``, the q-norm module (``nn.RMSNorm`` over the full width,
  ``nn.Identity`` without ``qk_norm``), called as a module on ``(B, L, dim)`` (``wan.py:62-64``).
  RoPE follows inside a local function of ``WanSelfAttention.forward``, no extension can reach it:
  ``apply_rope1`` on ``(B, L, heads, D)`` with interleaved pairs ``(2k, 2k+1)`` and ``freqs`` of
  2x2 rotations ``(B, L, 1, D/2, 2, 2)`` (Flux's ``EmbedND`` on ids ``(t, h, w)``, ``movedim(1, 2)``,
  ``wan.py:326, 412-418``).  The hook writes ``R^-1 blur(R q)`` (:func:`blur_frames_before_rope`), so
  the host's own rotation yields the blurred post-RoPE queries; keys, values and the cross-attention
  (``cross_attn``: the text; the i2v model also attends to CLIP image tokens, ``wan.py:105-137``)
  are not touched.
* Geometry, from the model and the call: the patch embedding's output ``(B, dim, T', H', W')`` is the
  token grid (``flatten(2)``: frame-major, row-major; ``wan.py:345-347``); the call's latent
  ``(B, C, T, H, W)`` with the model's ``patch_size[0]`` says how many of those frames are the
  video (``ceil(T / p_t)``: Neo pads every side to the patch, ``wan.py:400``); frames after them
  (``time_dim_concat``, ``wan.py:407-410``) are another latent's and stay as they are.  The ids the
  model gives ``rope_embedder`` must say the same (each frame one time position, rows and columns on
  the grid), and the query count must be the grid's; otherwise the block is skipped with a warning.
* ComfyUI's own ``WanModel`` (``comfy/ldm/wan/model.py``, read at hiddenswitch/pip-and-uv-installable-ComfyUI
  87606c5f; upstream master for the in-context latents) has the same modules and hook point (``norm_q`` line
  58, ``apply_rope1`` 69-75); where its ``ref_conv`` takes a ``reference_latent``, that frame's tokens come
  BEFORE the video (``concat((full_ref, x))`` 596-597) and its ids are frame 0 (``t_len += 1`` 691-692), so the
  video is blurred from the second frame on; upstream's in-context latents (``context_latents``) are embedded
  by further calls of ``patch_embedding`` and ``rope_embedder`` and appended after everything: only the first
  call of each is the video's, the later ones' tokens are counted and left alone.
* Neo's Refiner swaps the high- and low-noise experts of Wan 2.2 A14B: two model objects, each armed
  per call; nothing is cached per model.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.geometry import patched_side, positions_fit_grid
from lib_seg.dit.queries import Rows, blur_before_rope, blur_image_queries

from .base import CallFacts, QNormFamily, SkipCallback, has_structure, skipped

Where = tuple[int, tuple[int, int], int]  # (video frames, (h, w), frames in the sequence)


def blur_frames(tokens: torch.Tensor, frames: int, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Blur ``(B, frames*h*w, C)`` tokens (frame-major, each frame row-major) frame by frame over its own
    ``h x w`` grid (:func:`lib_seg.dit.queries.blur_image_queries` with ``frames``).  No temporal blur (see the
    module docstring)."""
    return blur_image_queries(tokens, slice(None), grid, sigma, "bld", frames=frames)


def blur_frames_before_rope(
    q: torch.Tensor,
    freqs: torch.Tensor,
    frames: int,
    grid: tuple[int, int],
    sigma: float,
    rows: Rows = None,
    start: int = 0,
) -> torch.Tensor:
    """Pre-RoPE queries ``q'`` with ``R q' = blur_frames(R q)`` on the ``frames * h * w`` tokens from ``start``
    (ComfyUI's reference frame comes first: ``start = h * w``).

    ``q``: (B, L, heads, D), as the host's q-norm returns it, before RoPE; ``freqs``: the rotations the
    host applies next, (B or 1, L, 1, D/2, 2, 2): :func:`lib_seg.dit.queries.blur_before_rope` in the
    ``blhd`` layout, each frame over its own grid.  Other tokens and rows are returned bit for bit.
    """
    video = slice(start, start + frames * grid[0] * grid[1])
    return blur_before_rope(q, freqs, video, grid, sigma, rows, "blhd", frames)


def ids_fit_frames(ids: torch.Tensor, frames: int, grid: tuple[int, int]) -> bool:
    """Whether position ids ``(B, frames*h*w, 3)`` = (time, row, column) lay the tokens frame by frame,
    each frame at one time position and row-major on ``grid`` (any offsets)."""
    n_frame = grid[0] * grid[1]
    if ids.dim() != 3 or ids.shape[1] != frames * n_frame or ids.shape[2] < 3:
        return False
    per_frame = ids.reshape(ids.shape[0] * frames, n_frame, ids.shape[2])
    time = per_frame[..., 0]
    return positions_fit_grid(per_frame[..., 1:3], grid) and bool(((time - time[:, :1]).abs() < 0.5).all())


class _Call(CallFacts):
    """What one model call tells the hooks: the latent's frames, the token grid, position ids, rotations, and
    ComfyUI's further tokens: a reference frame before the video, in-context latents after it."""

    def reset(self) -> None:
        super().reset()
        self.latent_frames: int | None = None
        self.tokens: tuple[int, int, int] | None = None  # (T', H', W') of the patch embedding
        self.lead = 0  # frames before the video: ComfyUI's reference frame (``reference_latent``)
        self.after = 0  # tokens of the patch embedding's later calls (ComfyUI's in-context latents), after it
        self.seen_ids = False

    def read(self, x: Any, call: dict[str, Any]) -> None:
        self.latent_frames = int(x.shape[2]) if torch.is_tensor(x) and x.dim() == 5 else None
        extra = call.get("kwargs") if isinstance(call.get("kwargs"), dict) else {}
        reference = call.get("reference_latent", extra.get("reference_latent"))
        self.lead = int(torch.is_tensor(reference) and isinstance(getattr(self.model, "ref_conv", None), nn.Module))

    def on_patches(self, _embedding: nn.Module, _args: tuple, output: Any) -> None:
        """The first call of a model call is the video's; ComfyUI calls the embedding again for each in-context
        latent (``comfy/ldm/wan/model.py`` upstream ``forward_orig``; S2V, HuMo: their reference latents) and
        appends those tokens after it."""
        grid = tuple(output.shape[2:]) if torch.is_tensor(output) and output.dim() == 5 else None
        if self.tokens is None:
            self.tokens = grid
        else:
            self.after += math.prod(output.shape[2:]) if grid is not None else 0

    def on_ids(self, _embedder: nn.Module, args: tuple, kwargs: dict) -> None:
        """The first ids of a model call are the video's (ComfyUI's in-context latents get their own later)."""
        if not self.seen_ids:
            ids = args[0] if args else next(iter(kwargs.values()), None)
            self.ids = ids if torch.is_tensor(ids) and ids.dim() == 3 else None  # checked by :func:`ids_fit_frames`
            self.seen_ids = True

    def read_block(self, layer: DitLayer, call: dict[str, Any]) -> Any:
        return call.get("freqs")

    def _locate(self) -> Where | str:
        if self.latent_frames is None:
            return "the model call passed no 5-D (B, C, T, H, W) latent"
        if self.tokens is None:
            return "the patch embedding's token grid was not seen"
        patch = getattr(self.model, "patch_size", None)
        if not isinstance(patch, tuple | list) or len(patch) != 3 or not isinstance(patch[0], int):
            return "the model's (t, h, w) patch size could not be read"
        frames = patched_side(self.latent_frames, patch[0], pad=True)
        total, h_len, w_len = self.tokens
        if frames > total:
            return f"{frames} latent frames do not fit the {total} frames of its tokens"
        if self.ids is not None and not ids_fit_frames(self.ids, self.lead + total, (h_len, w_len)):
            return f"the model's position ids do not lay its tokens frame by frame on the {h_len}x{w_len} grid"
        return frames, (h_len, w_len), total


def _hook(layer: DitLayer, call: _Call, sigma: float, rows: Rows, on_skip: SkipCallback | None):
    """Forward hook on ``self_attn.norm_q``: ``(B, L, dim) -> R^-1 blur_frames(R q)`` on the video tokens."""

    def hook(_norm: nn.Module, _args: tuple, q: torch.Tensor) -> Any:
        where = call.where()
        if isinstance(where, str):
            return skipped(on_skip, layer, q.shape[1], None, where)
        frames, grid, total = where
        n_frame = grid[0] * grid[1]
        if q.dim() != 3 or q.shape[1] != (call.lead + total) * n_frame + call.after:
            return skipped(on_skip, layer, q.shape[1], grid)
        freqs = call.seen.get(layer)
        fits = torch.is_tensor(freqs) and freqs.dim() == 6 and freqs.shape[1] == q.shape[1]
        if not fits or q.shape[-1] % (2 * freqs.shape[-3]):
            return skipped(on_skip, layer, q.shape[1], grid, "no RoPE rotations reached the block")
        heads = q.unflatten(-1, (-1, 2 * freqs.shape[-3]))  # (B, L, heads, D), as the host views it
        start = call.lead * n_frame
        return blur_frames_before_rope(heads, freqs, frames, grid, sigma, rows, start).flatten(2)

    return hook


class WanFamily(QNormFamily):
    """Wan 2.1 / 2.2: ``blocks`` of self-attention (``self_attn.norm_q``), cross-attention and FFN;
    a 3D ``patch_embedding`` and a ``rope_embedder`` on the model."""

    name, title = "wan", "Wan 2.1 / 2.2"
    attributes: ClassVar[dict[str, str]] = {"block": "blocks"}
    # Transformer blocks of the released models (``num_layers``; Wan-Video's ``wan/configs``: Wan2.1
    # ``wan_t2v_1_3B.py``, ``wan_t2v_14B.py``, ``wan_i2v_14B.py``; Wan2.2 ``wan_t2v_A14B.py``, ``wan_i2v_A14B.py``,
    # ``wan_ti2v_5B.py``); Neo reads the count from the checkpoint (``huggingface_guess/detection.py:80-104``).
    released: ClassVar[dict[str, dict[str, int]]] = {
        "wan2.1-t2v-1.3b": {"block": 30},  # dim 1536, 12 heads
        "wan2.1-t2v-14b": {"block": 40},  # dim 5120, 40 heads (i2v and flf2v 14B alike)
        "wan2.1-i2v-14b": {"block": 40},
        "wan2.2-t2v-a14b": {"block": 40},  # each of the high- and low-noise experts
        "wan2.2-i2v-a14b": {"block": 40},
        "wan2.2-ti2v-5b": {"block": 30},  # dim 3072, 24 heads
    }
    query_modules: ClassVar[dict[str, tuple[str, ...]]] = {"block": ("self_attn.norm_q",)}
    default_source = (
        "no published Wan SEG or PAG block choice was found, and Neo's tree names no skip-layer block (KJNodes' "
        "SkipLayerGuidanceWanVideo could not be read here): the middle block, b20 on the 40-block 14B / A14B "
        "experts, b15 on 1.3B and 5B"
    )
    facts, ids_from, arguments_of = _Call, "rope_embedder", ""  # each chosen block's ``freqs``
    hook = staticmethod(_hook)

    def matches(self, model: Any) -> bool:
        parts = ("patch_embedding", "rope_embedder")
        return has_structure(model, "blocks", parts, ("self_attn.norm_q", "cross_attn"))

    def record(self, model: nn.Module, call: _Call, handles: list[RemovableHandle]) -> None:
        handles.append(model.patch_embedding.register_forward_hook(call.on_patches))


WAN = WanFamily()
# The block counts as tests/dit/test_wan.py reads them (the facts are :attr:`WanFamily.released`).
RELEASED = {model: blocks["block"] for model, blocks in WAN.released.items()}
