"""The layouts of ComfyUI's own DiT classes that differ from Forge Neo's copies, each imitated at test size.

Read at hiddenswitch/pip-and-uv-installable-ComfyUI 87606c5f (upstream master merged 2026-02-03; ``comfy/...``
below) and, for what that tree lacks, ComfyUI master 783545f6 (``upstream``); the imitations follow the interface
and math, no host code is copied.  ``tools/dit_backend_smoke.py --host comfyui`` runs the real classes; here:

* the module-global names ComfyUI's model files call their attention kernel by (``optimized_attention``,
  ``optimized_attention_masked``), and upstream's ``AttentionTensorContainer`` boxes around q, k, v;
* NextDiT's position ids given to ``rope_embedder`` segment by segment, batch 1 (``lumina/model.py:652-711``);
* Qwen-Image's head-first queries at ``norm_q`` and its ``(B, 1, L, D/2, 2, 2)`` rotations
  (``qwen_image/model.py:156-174, 492``), also with Qwen-Image-Layered's frames (393-417);
* Wan's reference frame before the video (``wan/model.py:596-597, 691-692``) and upstream's in-context latents
  after it (further ``patch_embedding`` / ``rope_embedder`` calls);
* Flux's ``matches`` refusing ComfyUI's other models built of Flux blocks, and Anima's refusing plain
  Cosmos-Predict2.
"""

import pytest
import torch
from torch import nn

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.attention_call import AttentionCalls, CallShape, ImageTokens, blur_call_queries
from lib_seg.dit.families import FAMILIES, family_of
from lib_seg.dit.families.anima import ANIMA
from lib_seg.dit.families.base import AttentionCallFamily
from lib_seg.dit.families.flux import FLUX1, FLUX2
from lib_seg.dit.families.nextdit import LUMINA2, ZIMAGE
from lib_seg.dit.families.nextdit import _Call as NextDiTCall
from lib_seg.dit.families.qwen import QWEN_IMAGE, layout
from lib_seg.dit.families.wan import WAN
from lib_seg.dit.hooks import blurred_dit_queries
from tests.support import dit_nextdit
from tests.support.dit_anima import TinyAnima
from tests.support.dit_blocks import attend, neo_attention, pad_to_patch, patchify, rope_complex, unpatchify
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_models import TinyFlux, randomize
from tests.support.dit_nextdit import JointAttention, TinyNextDiT
from tests.support.dit_qwen import QwenAttention, TinyQwen, centred_ids
from tests.support.dit_wan import TinyWan, sinusoidal, video_ids
from tests.support.slow_seg import blur_frame_rows, blur_logit_rows
from tests.support.tolerance import assert_network_close

SIGMAS = (0.7, float("inf"))

# ComfyUI's model files bind the kernel under these names (``from comfy.ldm.modules.attention import ...``:
# ``lumina/model.py:12``, ``qwen_image/model.py:11``, ``wan/model.py:9``, ``cosmos/predict2.py:16``); the classes
# below call them through this module's globals, as ComfyUI's call theirs.
optimized_attention = neo_attention
optimized_attention_masked = neo_attention


def _run(model, x, t, context, **kwargs):
    with torch.no_grad():
        return model(x, t, context=context, control=None, transformer_options={}, **kwargs)


def _seg(model, layers, sigma, *args, **kwargs):
    skips = []
    with blurred_dit_queries(model, layers, sigma, on_skip=lambda *a: skips.append(a)):
        out = _run(model, *args, **kwargs)
    assert not skips, skips
    return out


# The attention seam's names and ComfyUI's tensor containers


def test_attention_call_families_wrap_comfyuis_module_globals():
    calls = [family for family in FAMILIES if isinstance(family, AttentionCallFamily)]
    assert calls  # NextDiT, Krea 2, Ernie-Image, Qwen-Image 2.1, Anima
    for family in calls:
        assert {"attention_function", "optimized_attention", "optimized_attention_masked"} <= set(family.seams)


class Container:
    """Upstream ComfyUI's ``AttentionTensorContainer`` (``comfy/ldm/modules/attention.py:152-168`` at 783545f6): a
    single-owner box its models pass q, k, v to ``optimized_attention`` in; ``take()`` empties it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def peek(self):
        if self.tensor is None:
            raise RuntimeError("attention tensor container has already been consumed")
        return self.tensor

    def take(self):
        tensor, self.tensor = self.peek(), None
        return tensor


def test_a_container_boxed_query_is_blurred_into_a_new_box_and_the_originals_are_not_taken():
    seen = []
    namespace = {"optimized_attention": lambda *args, **kwargs: seen.append((args, kwargs)) or "out"}
    calls = AttentionCalls(1.0, None)
    wrapper = calls.wrap(namespace, "optimized_attention")
    q, k, v = (torch.randn(2, 2, 3 + 12, 4, dtype=torch.float64) for _ in range(3))
    boxes = Container(q), Container(k), Container(v)
    image = ImageTokens(3, (3, 4))
    calls.expect(DitLayer("layer", 0), lambda shape: image if shape == CallShape(15, 15, 2) else None)
    assert namespace["optimized_attention"](*boxes, 2, skip_reshape=True, preferred_attention="int8") == "out"
    [(args, kwargs)] = seen
    assert type(args[0]) is Container and args[0] is not boxes[0] and args[1:] == (*boxes[1:], 2)
    assert torch.equal(args[0].peek(), blur_call_queries(q, "bhld", image, 1.0))
    assert kwargs == {"skip_reshape": True, "preferred_attention": "int8"}  # passed on as the host gave them
    assert all(box.tensor is not None for box in boxes) and torch.equal(boxes[0].peek(), q)
    wrapper.remove()
    assert namespace["optimized_attention"] is not wrapper.function


# NextDiT: one rope_embedder call per segment


class ComfyJointAttention(JointAttention):
    """ComfyUI's ``JointAttention.forward(x, x_mask, freqs_cis, transformer_options)`` (``lumina/model.py:126-171``):
    the module-global ``optimized_attention_masked(q, k, v, heads, x_mask, skip_reshape=True,
    transformer_options=...)`` (line 169), mask positional; ``pass_options=False`` drops ``transformer_options``
    (then only the module-global seam can reach the call, as on Ernie-Image, ``ernie/model.py:130`` upstream)."""

    pass_options = True

    def forward(self, x, x_mask, freqs_cis, transformer_options=None):
        batch, length, _ = x.shape
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        q, k, v = (t.reshape(batch, length, -1, self.head_dim) for t in self.qkv(x).split(sizes, dim=-1))
        q, k = rope_complex(self.q_norm(q), freqs_cis), rope_complex(self.k_norm(k), freqs_cis)
        repeat = self.heads // self.kv_heads
        k, v = (t.repeat_interleave(repeat, dim=2) for t in (k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        options = {"transformer_options": transformer_options} if self.pass_options else {}
        out = optimized_attention_masked(q, k, v, self.heads, x_mask, skip_reshape=True, hooks=self.hooks, **options)
        return self.out(out)


class ComfyNextDiT(TinyNextDiT):
    """ComfyUI's ``NextDiT._forward(x, timesteps, context, num_tokens, attention_mask=None, ...)``: the caption's ids
    ``(1, L_cap, 3)`` (axis 0 = ``arange + 1``, ``embed_cap`` 652-666) and the image's ``(1, h*w + pad, 3)`` (axis 0
    = caption length + 1, rows, columns, pad ids zero; ``embed_all`` 668-712, ``pos_ids_x`` 418-434) go to
    ``rope_embedder`` apart, batch 1; the rotations are joined, ``[caption | image]`` (``patchify_and_embed``
    714-812)."""

    def forward(self, x, timesteps, context, num_tokens, attention_mask=None, transformer_options=None, **kwargs):
        options = {} if transformer_options is None else transformer_options
        _, _, height, width = x.shape
        adaln, cap, img, h_len, w_len = self.embed(x, timesteps, context)
        n_cap, n_img = cap.shape[1], h_len * w_len
        cap_ids = torch.zeros(1, n_cap, 3, dtype=torch.float64)
        cap_ids[..., 0] = torch.arange(n_cap, dtype=torch.float64) + 1
        img_ids = torch.zeros(1, img.shape[1], 3, dtype=torch.float64)
        img_ids[:, :n_img] = dit_nextdit.position_ids(0, h_len, w_len, 0, 1, x.device)
        img_ids[:, :n_img, 0] = n_cap + 1
        cap_freqs = self.rope_embedder(cap_ids).movedim(1, 2).to(x.dtype)
        img_freqs = self.rope_embedder(img_ids).movedim(1, 2).to(x.dtype)
        for layer in self.context_refiner:
            cap = layer(cap, attention_mask, cap_freqs, transformer_options=options)
        for layer in self.noise_refiner:
            img = layer(img, None, img_freqs, adaln, transformer_options=options)
        joint, freqs = torch.cat([cap, img], dim=1), torch.cat([cap_freqs, img_freqs], dim=1)
        for layer in self.layers:
            joint = layer(joint, None, freqs, adaln, transformer_options=options)
        return self.head(joint, adaln, n_cap, h_len, w_len, height, width)


def comfy_nextdit(pass_options: bool, **kwargs) -> ComfyNextDiT:
    model = dit_nextdit.build(**kwargs)
    model.__class__ = ComfyNextDiT
    for module in model.modules():
        if isinstance(module, JointAttention):
            module.__class__ = ComfyJointAttention
            module.pass_options = pass_options
    return model


@pytest.mark.parametrize("pass_options", [True, False], ids=["override", "module global only"])
@pytest.mark.parametrize(
    ("kwargs", "family"),
    [(dict(pad_multiple=4), ZIMAGE), (dict(z_image=False, pad_multiple=None, kv_heads=1), LUMINA2)],
    ids=["Z-Image", "Lumina 2"],
)
def test_nextdit_with_per_segment_ids_blurs_the_image_at_the_end_of_the_sequence(kwargs, family, pass_options):
    model = comfy_nextdit(pass_options, **kwargs)
    assert family_of(model) is family
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 5, 9, generator=generator, dtype=torch.float64)  # odd sides: a 3 x 5 grid (+1 pad on Z-Image)
    context = torch.randn(2, 5, 12, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    multiple = kwargs["pad_multiple"] or 1
    n_cap = -(-5 // multiple) * multiple
    layers = [DitLayer("layer", 0), DitLayer("layer", 2)]
    for sigma in SIGMAS:
        for layer in layers:
            model.layers[layer.index].attention.hooks.logits = blur_logit_rows(slice(n_cap, n_cap + 15), (3, 5), sigma)
        expected = _run(model, x, t, context, num_tokens=5)
        for layer in layers:
            model.layers[layer.index].attention.hooks.logits = None
        assert_network_close(_seg(model, layers, sigma, x, t, context, num_tokens=5), expected)


def _segments(*ids: torch.Tensor) -> NextDiTCall:
    model = dit_nextdit.build(pad_multiple=4)
    call = NextDiTCall(model)
    call.latent = (4, 5, 7)  # a 3 x 4 grid of 12 tokens, padded to 12
    for segment in ids:
        call.on_ids(model.rope_embedder, (segment,), {})
    return call


def _image_ids(h_len, w_len, t, pad=0, scale=1.0):
    ids = torch.zeros(1, h_len * w_len + pad, 3, dtype=torch.float64)
    ids[:, : h_len * w_len] = dit_nextdit.position_ids(0, h_len, w_len, 0, 1, torch.device("cpu")) * scale
    ids[:, : h_len * w_len, 0] = t
    return ids


def test_nextdit_the_main_image_is_the_last_segment_of_its_size_on_the_grid():
    caption = torch.zeros(1, 8, 3, dtype=torch.float64)
    caption[..., 0] = torch.arange(8) + 1
    # Z-Image Omni (``patchify_and_embed`` 727-764): a reference's caption pad and image (here of the main image's
    # size), the main caption and image, a leftover caption: the main image is placed, at the sequence's end
    call = _segments(caption, _image_ids(3, 4, 9), caption, _image_ids(3, 4, 30), caption)
    assert call.where() == ((3, 4), None)
    assert ZIMAGE.locate(call, DitLayer("layer", 0), CallShape(60, 60, 2), None) == ImageTokens(48, (3, 4))
    # ids stepping by 2 (``rope_options`` scale_y/scale_x, ``pos_ids_x`` 418-434) or of another grid: not placed
    assert isinstance(_segments(caption, _image_ids(3, 4, 9, scale=2.0)).where(), str)
    assert isinstance(_segments(caption, _image_ids(4, 3, 9)).where(), str)


# Qwen-Image: head-first queries


def apply_rope1(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``apply_rope1`` (``comfy/ldm/flux/math.py:42-49``, comfy-kitchen's same math): channel pair i of
    token l times ``freqs[..., l, i, :, :]``."""
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(x.shape)


class ComfyQwenAttention(QwenAttention):
    """ComfyUI's ``Attention.forward`` (``qwen_image/model.py:140-190``): q/k/v ``view(B, L, heads, -1)
    .transpose(1, 2)`` (156-162), so ``norm_q`` gets and returns ``(B, heads, L, D)`` (164); ``cat`` on dim 2 (168),
    ``apply_rope1`` with ``(B, 1, L, D/2, 2, 2)`` (173), ``optimized_attention_masked(..., skip_reshape=True)``."""

    def forward(
        self,
        hidden_states,
        encoder_hidden_states=None,
        encoder_hidden_states_mask=None,
        attention_mask=None,
        image_rotary_emb=None,
        transformer_options=None,
    ):
        n_txt = encoder_hidden_states.shape[1]
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  (B, heads, L, D)
        img_q, img_k = self.norm_q(split(self.to_q(hidden_states))), self.norm_k(split(self.to_k(hidden_states)))
        txt_q = self.norm_added_q(split(self.add_q_proj(encoder_hidden_states)))
        txt_k = self.norm_added_k(split(self.add_k_proj(encoder_hidden_states)))
        q = apply_rope1(torch.cat([txt_q, img_q], dim=2), image_rotary_emb)
        k = apply_rope1(torch.cat([txt_k, img_k], dim=2), image_rotary_emb)
        v = torch.cat([split(self.add_v_proj(encoder_hidden_states)), split(self.to_v(hidden_states))], dim=2)
        out = attend(q, k, v, self.hooks).transpose(1, 2).flatten(2)
        return self.to_out[1](self.to_out[0](out[:, n_txt:])), self.to_add_out(out[:, :n_txt])


class ComfyQwen(TinyQwen):
    """ComfyUI's ``QwenImageTransformer2DModel``: the rotations stay ``(B, 1, L, D/2, 2, 2)`` (``pe_embedder(ids)``,
    492); a latent of ``T > 1`` frames (Qwen-Image-Layered, ``process_img`` 393-417) is T frames of ``h * w`` tokens,
    frame ``t``'s ids ``(t, row, col)`` centred."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for block in self.transformer_blocks:
            block.attn.__class__ = ComfyQwenAttention

    def process_img(self, x, index=0):
        padded = pad_to_patch(x, 2)
        frames, h_len, w_len = padded.shape[2], padded.shape[-2] // 2, padded.shape[-1] // 2
        tokens = torch.cat([patchify(padded[:, :, f], 2) for f in range(frames)], dim=1)
        ids = [centred_ids(h_len, w_len, f if frames > 1 else index, x.shape[0], x.device) for f in range(frames)]
        return tokens, torch.cat(ids, dim=1), padded.shape

    def forward(self, x, timesteps, context, attention_mask=None, ref_latents=None, transformer_options=None, **kw):
        img, img_ids, padded = self.process_img(x)
        n_image = img.shape[1]
        for index, ref in enumerate(ref_latents or (), start=1):  # method ``index`` (ComfyUI's default)
            tokens, ids, _ = self.process_img(ref.to(x), index)
            img, img_ids = torch.cat([img, tokens], dim=1), torch.cat([img_ids, ids], dim=1)
        frames, h_len, w_len = padded[2], padded[-2] // 2, padded[-1] // 2
        start = max(h_len // 2, w_len // 2)
        txt_ids = torch.arange(start, start + context.shape[1], dtype=torch.float64).reshape(1, -1, 1)
        pe = self.pe_embedder(torch.cat([txt_ids.repeat(x.shape[0], 1, 3), img_ids], dim=1)).to(x.dtype)
        hidden, text = self.img_in(img), self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(timesteps[:, None].to(x.dtype))
        for block in self.transformer_blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None,
                                 temb=temb, image_rotary_emb=pe)  # fmt: skip
        out = self.proj_out(hidden)[:, :n_image].unflatten(1, (frames, -1))
        out = torch.stack([unpatchify(out[:, f], x.shape[1], h_len, w_len, 2) for f in range(frames)], dim=2)
        return out[..., : x.shape[-2], : x.shape[-1]]


@pytest.mark.parametrize(("frames", "refs"), [(1, 0), (1, 1), (2, 0)], ids=["image", "Edit", "Layered 2-frame"])
def test_qwen_image_head_first_queries_and_rotations_are_blurred_exactly(frames, refs):
    model = randomize(ComfyQwen(), seed=7).double().eval()
    assert family_of(model) is QWEN_IMAGE
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, frames, 5, 7, generator=generator, dtype=torch.float64)  # 3 x 4 grid per frame
    context = torch.randn(2, 6, 12, generator=generator, dtype=torch.float64)
    extra = {"ref_latents": [torch.randn(2, 4, 1, 4, 6, generator=generator, dtype=torch.float64)]} if refs else {}
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    layers = [DitLayer("joint", 1)]
    for sigma in SIGMAS:
        model.transformer_blocks[1].attn.hooks.logits = blur_frame_rows(6, (3, 4), frames, sigma)
        expected = _run(model, x, t, context, **extra)
        model.transformer_blocks[1].attn.hooks.logits = None
        assert_network_close(_seg(model, layers, sigma, x, t, context, **extra), expected)


def test_qwen_layout_tells_neo_and_comfyuis_query_orders_apart():
    q_neo, q_comfy = torch.zeros(2, 12, 3, 8), torch.zeros(2, 3, 12, 8)  # 12 image tokens, 3 heads
    assert layout(torch.zeros(1, 5 + 12, 1, 4, 2, 2), q_neo, 5) == "blhd"  # Neo: (B, L, 1, D/2, 2, 2)
    assert layout(torch.zeros(2, 1, 5 + 12, 4, 2, 2), q_comfy, 5) == "bhld"  # ComfyUI: (B, 1, L, D/2, 2, 2)
    assert layout(torch.zeros(2, 1, 5 + 12, 4, 2, 2), q_neo, 5) is None  # rotations of another layout
    assert layout(torch.zeros(2, 1, 4 + 12, 4, 2, 2), q_comfy, 5) is None  # of another text length


# Wan: a reference frame before the video, in-context latents after it


class ComfyWan(TinyWan):
    """ComfyUI's ``WanModel`` with ``ref_conv`` (``in_dim_ref_conv``, 542-545): ``reference_latent`` (4-D) becomes one
    frame of tokens BEFORE the video (``concat((full_ref, x))`` 596-597) and its ids frame 0 (``t_len += 1``, 691-692;
    ``rope_encode`` gives ids of batch 1, 636-667).  Upstream's ``context_latents`` (783545f6 ``forward_orig``,
    ``_forward``): each is embedded by another ``patch_embedding`` call and appended after everything, its
    rotations from another ``rope_encode`` (``rope_embedder``) call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ref_conv = nn.Conv2d(self.in_dim, self.dim, kernel_size=self.patch_size[1:], stride=self.patch_size[1:])

    def _freqs(self, frames, h_len, w_len, start=0):
        ids = video_ids(frames, h_len, w_len, 1)
        return self.rope_embedder(ids + torch.tensor([float(start), 0.0, 0.0], dtype=ids.dtype)).movedim(1, 2)

    def forward(self, x, timestep, context, transformer_options=None, reference_latent=None, context_latents=(), **kw):
        options = {} if transformer_options is None else transformer_options
        bs, _, t, h, w = x.shape
        x = pad_to_patch(x, self.patch_size)
        grid = [side // p for side, p in zip(x.shape[2:], self.patch_size, strict=True)]
        freqs = self._freqs(grid[0] + (reference_latent is not None), *grid[1:])
        for i, latent in enumerate(context_latents):
            patched = [side // p for side, p in zip(latent.shape[2:], self.patch_size, strict=True)]
            freqs = torch.cat([freqs, self._freqs(*patched, start=100 * (i + 1))], dim=1)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        n_ref = 0
        if reference_latent is not None:
            ref = self.ref_conv(reference_latent).flatten(2).transpose(1, 2)
            tokens, n_ref = torch.cat([ref, tokens], dim=1), ref.shape[1]
        for latent in context_latents:
            tokens = torch.cat([tokens, self.patch_embedding(latent).flatten(2).transpose(1, 2)], dim=1)
        e = self.time_embedding(sinusoidal(self.freq_dim, timestep.flatten()).to(x.dtype)).reshape(bs, -1, self.dim)
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        context = self.text_embedding(context)
        for block in self.blocks:
            tokens = block(tokens, e=e0, freqs=freqs, context=context, transformer_options=options)
        n_video = grid[0] * grid[1] * grid[2]
        out = self.head(tokens, e)[:, n_ref : n_ref + n_video].reshape(bs, *grid, *self.patch_size, self.out_dim)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        out = out.reshape(bs, self.out_dim, *[g * p for g, p in zip(grid, self.patch_size, strict=True)])
        return out[:, :, :t, :h, :w]


@pytest.mark.parametrize(("reference", "in_context"), [(True, 0), (True, 1), (False, 2)])
def test_wan_blurs_the_video_after_comfyuis_reference_frame_and_before_its_in_context_latents(reference, in_context):
    model = randomize(ComfyWan(), seed=7).double().eval()
    assert family_of(model) is WAN
    generator = torch.Generator().manual_seed(6)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    x, context, t = draw(2, 4, 3, 6, 8), draw(2, 5, 12), torch.tensor([300.0, 800.0], dtype=torch.float64)
    extra = {"reference_latent": draw(2, 4, 6, 8)} if reference else {}  # ref_conv does not pad: even sides
    extra["context_latents"] = [draw(2, 4, 1, 4, 6) for _ in range(in_context)]
    layers = [DitLayer("block", 0), DitLayer("block", 2)]
    for sigma in SIGMAS:
        for layer in layers:
            model.blocks[layer.index].hooks.logits = blur_frame_rows(12 if reference else 0, (3, 4), 3, sigma)
        expected = _run(model, x, t, context, **extra)
        for layer in layers:
            model.blocks[layer.index].hooks.logits = None
        assert_network_close(_seg(model, layers, sigma, x, t, context, **extra), expected)


# Which ComfyUI models the families claim


class QuantizedLinear(nn.Module):
    """A linear layer that is no ``nn.Linear`` (Forge's GGUF ``Linear(torch.nn.Module)``, Neo
    ``backend/operations.py:404``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def _flux_with(**changes) -> nn.Module:
    model = TinyFlux()
    for name, value in changes.items():
        if value is None:
            delattr(model, name)
        else:
            setattr(model, name, value)
    return model


def test_flux_matches_leaves_comfyuis_other_models_of_flux_blocks_alone():
    assert family_of(TinyFlux()) is FLUX1 and family_of(TinyFlux2()) is FLUX2
    # HunyuanVideo / HunyuanImage 2.1: a list patch_size and a PatchEmbed img_in (``hunyuan_video/model.py:197,
    # 213``); JoyImage: a list patch_size, a Conv3d img_in (upstream ``joyimage/model.py:267, 273``)
    assert family_of(_flux_with(patch_size=[1, 2, 2])) is None
    assert family_of(_flux_with(patch_size=[2, 2])) is None
    assert family_of(_flux_with(img_in=nn.Conv3d(4, 32, (1, 2, 2), (1, 2, 2)))) is None
    # Hunyuan3D: ``latent_in`` for a (B, L, C) shape latent, no img_in (``hunyuan3d/model.py:33``)
    assert family_of(_flux_with(img_in=None, latent_in=nn.Linear(16, 32))) is None
    # Chroma Radiance: img_in a method over a Conv2d (``chroma_radiance/model.py:70-71``)
    radiance = _flux_with(img_in=None, img_in_patch=nn.Conv2d(3, 32, 16, 16))
    radiance.img_in = lambda img: radiance.img_in_patch(img).flatten(2).transpose(1, 2)
    assert family_of(radiance) is None
    # Flux as the hosts build it: an int patch_size, a quantized img_in that is no nn.Linear
    assert family_of(_flux_with(patch_size=2)) is FLUX1
    assert family_of(_flux_with(img_in=QuantizedLinear(TinyFlux().img_in))) is FLUX1
    assert family_of(_flux_with(patch_size=True)) is None  # a bool is no patch side


def test_anima_is_claimed_with_its_llm_adapter_plain_cosmos_predict2_is_left_alone():
    neo = TinyAnima()  # Neo's Anima: its own class, the adapter in the text encoder
    assert family_of(neo) is ANIMA
    cosmos = TinyAnima()
    cosmos.pos_emb_cls = "rope3d"  # ComfyUI's MiniTrainDIT keeps its embedding config (``cosmos/predict2.py:660``)
    assert family_of(cosmos) is None
    cosmos.llm_adapter = nn.Linear(4, 4)  # ComfyUI's Anima: MiniTrainDIT + ``llm_adapter`` (``anima/model.py:196``)
    assert family_of(cosmos) is ANIMA
