"""Smoke check of lib_seg.dit.hooks against the REAL DiT classes of Forge 2.x, reForge or Forge Neo (not a test: it
needs a host tree and its venv; ``--host imitation`` is its self-check without one, run by CI).

For each family the host's own transformer class is built tiny on the CPU (2 double + 2 single blocks, or
2 joint blocks), float64, with random weights everywhere (those the host zero-initialises included), and
called as the host's ``apply_model`` calls it on an odd, non-square 9x13 latent, batch 2 (Forge 2.x's
MMDiTX gets 10x14: it crashes on odd sides by itself).  For some block choices and each sigma, the output
under ``blurred_dit_queries`` must equal a reference that never touches a query: the host's attention
function (the module attribute its blocks look up at call time) is swapped for an explicit attention that,
in the chosen blocks only, blurs the image rows of the pre-softmax logits with a dense Gaussian written
here from the SEG definition.  Also checked: the hooks leave nothing behind (no hooks on any module, the
host's attention functions back in place, the plain output bit-identical) and the blur changes the output.
The reference's swap composes with SEG's own wrapper of the same module global (attention-call families
wrap whatever the name holds while armed): the two runs are separate calls, and each undoes its own.

Forge Neo (``--host neo``, ``tools/_neo_cases.py``) runs float32 (its RoPE kernels have no float64) and covers
every family SEG supports there: Flux.1 (Kontext), Chroma, Flux.2-Klein, Z-Image, Lumina 2, Qwen-Image (Edit),
Wan (one frame, video, ``time_dim_concat``, 2.1 i2v), Anima (also video and a reference frame), Krea 2 (also
references), Ernie-Image, PixelDiT and PiD.  A case says where its image tokens sit in each attention call of a
block (``Case.calls``: a joint sequence, the image alone, or a cross-attention that passes), how many frames
the latent has (each frame's rows are blurred over its own grid), which blocks there are (``Case.blocks``) and
which module attributes its attention goes through (``Case.attention``).  The reference attention computes
in float64 (whatever the model's dtype, cast back after), repeats grouped k/v heads and applies the host's
mask (boolean or additive) after the blur.

Forge Neo 2.29 (``--host neo229``, ``tools/_neo229_cases.py``): the hybrid tree /work/hosts/neo229 (NEO229_DIR),
Neo 2.26 with 2.29's model files taken verbatim (its PROVENANCE.md): youlijie/sd-webui-forge-classic
(2.29.1) b3b8a1e5 ``anima.py``, ``qwen21.py``, ``attention.py`` (``optimized_attention_override``),
``args.py`` and fdb9c164 ``lumina.py``, ``quant_ops.py``; xxxqwerty337/sd-webui-forge-classic-1337 ba50f188
``krea.py``, ``qwen.py``, ``wan.py`` and 8343ece9 ``flux.py``; comfy-kitchen 0.2.40 from NEO229_PYLIB
(/work/hosts/neo229-pylib), put first on the path; argv ``--cpu --use-pytorch-cross-attention``.  Cases:
Z-Image, Lumina 2 (grouped k/v: ``ck.rms_rope1``), Anima (1, 2 frames, a reference frame), Krea 2 (0, 1, 2
references before the image), Qwen-Image 2.1 (0, 1, 2 references; block-causal segments, only the target's
call blurred), Flux.1 (Kontext), Chroma, Flux.2-Klein, Wan and Qwen-Image (Edit).

ComfyUI (``--host comfyui``, ``tools/_comfy_cases.py``): its own classes in the tree /work/hosts/comfyui/src
(COMFYUI_DIR; hiddenswitch/pip-and-uv-installable-ComfyUI 87606c5f), called as ``model_base`` calls them: Flux.1
(Kontext), Chroma, Flux.2-Klein, SD3 / SD3.5 (float64), Z-Image (also Omni with a reference), Lumina 2, Qwen-Image
(Edit, Layered), Wan (image, video, ``time_dim_concat``, 2.1 i2v, a reference frame), Anima; and the models it must
leave alone (HunyuanVideo / HunyuanImage, Hunyuan3D, Chroma Radiance, plain Cosmos-Predict2) claimed by no family:
    HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 /work/hosts/comfyui/venv/bin/python -m tools.dit_backend_smoke \
        --host comfyui

Run from the repo root with the host's venv (the tree is FORGE_DIR / REFORGE_DIR / NEO_DIR / NEO229_DIR,
defaults below; the 2.29 hybrid runs with Neo 2.26's venv):
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/venv-forge2/bin/python -m tools.dit_backend_smoke --host forge2
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/venv-reforge/bin/python -m tools.dit_backend_smoke --host reforge
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/forge-neo/venv/bin/python -m tools.dit_backend_smoke --host neo
    PYTHONDONTWRITEBYTECODE=1 /work/hosts/forge-neo/venv/bin/python -m tools.dit_backend_smoke --host neo229

Self-check without a host tree (what CI runs, tests/tools): ``--host imitation`` builds the repo's own
from-scratch Flux and MMDiT (tests/support/dit_models.py, float64 throughout, RoPE included) instead of a host's
classes; their blocks call ``tests.support.dit_blocks.attention_function`` through that module at call time, as
the hosts' blocks call theirs, so the same reference, comparison, leftover-hook checks and report run end to end.
It checks this tool and lib_seg against the imitation, not against a host:
    python -m tools.dit_backend_smoke --host imitation
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

HOSTS = {
    "forge2": ("FORGE_DIR", "/work/hosts/forge2"),
    "reforge": ("REFORGE_DIR", "/work/hosts/reforge"),
    "neo": ("NEO_DIR", "/work/hosts/forge-neo/webui"),
    "neo229": ("NEO229_DIR", "/work/hosts/neo229"),
    "comfyui": ("COMFYUI_DIR", "/work/hosts/comfyui/src"),  # hiddenswitch/pip-and-uv-installable-ComfyUI 87606c5f
}
NEO229_PYLIB = ("NEO229_PYLIB", "/work/hosts/neo229-pylib")  # comfy-kitchen 0.2.40, first on the path
IMITATION = "imitation"  # no host tree: the repo's test imitations (tests/support)
BATCH, N_TXT, REGISTERS = 2, 5, 2
SD3_CTX = N_TXT + REGISTERS  # MMDiT: register tokens, then text, then the image
SIGMAS = (0.5, 1.5, math.inf)
# Bounds on max|seg - reference| / max|reference| (cf. tests/support/tolerance.py).  MMDiT runs wholly in
# float64: 2**20 float64 epsilons (~2.3e-10) for rounding amplified by depth.  Flux/Chroma: both hosts'
# RoPE casts q and k to float32 and rotates with float32 ``pe`` whatever the model dtype (Forge 2.x
# ``apply_rope``: ``xq.float()``; reForge ``flux/math.py attention``: ``q.to(pe.dtype)``), so the two runs
# round different queries to float32 (unit roundoff 6e-8): 2**7 float32 epsilons (~1.5e-5) of room.
FLOAT64_REL, ROPE_REL = 2.0**20 * 2.0**-52, 2.0**7 * 2.0**-23
# Neo's RoPE kernel (comfy_kitchen ``apply_rope``) has no float64: its models run wholly in float32, where the
# issue's acceptance bound is 1e-6 relative (about 8 float32 epsilons of rounding amplified by two blocks).
FLOAT32_REL = 1e-6
EFFECT_FACTOR = 10.0  # the blur must move the output by more than this many bounds


FLUX_BLOCKS = (("double", "double_blocks"), ("single", "single_blocks"), ("joint", "joint_blocks"))
# What each attention call of a chosen block is, in call order: "joint" (a sequence of ``n_ctx`` tokens, the
# image's ``frames * h * w``, then ``n_extra``: its image rows are blurred), "image" (the image tokens alone,
# blurred: SD3.5's attn2), "pass" (a cross-attention to the text or a reference image: left alone).
JOINT_THEN_IMAGE = ("joint", "image")


@dataclass
class Case:
    name: str
    model: object
    inputs: dict
    attention: tuple[tuple[str, str], ...]  # the (module, attribute)s the blocks call for attention
    specs: tuple[str, ...]
    n_ctx: int = N_TXT  # tokens before the image in the joint sequence (text, MMDiT registers)
    patch: int = 2  # the model's patch side (Flux.2: 1)
    n_extra: int = 0  # tokens after the image (Kontext references)
    rel: float = FLOAT64_REL
    blocks: tuple[tuple[str, str], ...] = FLUX_BLOCKS  # (kind, the model's ModuleList attribute), run order
    marker: str = ""  # the submodule of a block whose call brackets its attention calls ("": the block)
    calls: dict[str, tuple[str, ...]] = field(default_factory=dict)  # kind -> roles; JOINT_THEN_IMAGE if absent
    frames: int = 1  # image frames (video latents): each blurred over its own h x w grid
    context: Callable[[], AbstractContextManager] = nullcontext  # what the host's globals hold during a call

    def roles(self, kind: str) -> tuple[str, ...]:
        return self.calls.get(kind, JOINT_THEN_IMAGE)


def setup(host: str) -> str:
    """The host tree (and its vendored packages) first on ``sys.path``, ahead of the repo (``python -m`` from the
    repo root put it there); the host's argv."""
    if host == IMITATION:  # nothing to import from a host, no host argv to satisfy
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "support")
    env, default = HOSTS[host]
    tree = os.path.abspath(os.environ.get(env, default))
    extra = {
        "forge2": [f"{tree}/packages_3rdparty", f"{tree}/repositories/huggingface_guess"],
        "neo": [f"{tree}/modules_forge/packages"],  # Neo vendors gguf and huggingface_guess there
        "neo229": [f"{tree}/modules_forge/packages"],
    }.get(host, [])
    first = [os.path.abspath(os.environ.get(*NEO229_PYLIB))] if host == "neo229" else []
    sys.path[:0] = [*first, tree, *extra]
    # The hosts parse argv when imported (Neo rejects unknown flags, and --always-cpu is gone there); the 2.29
    # tree needs SDPA on the CPU: its default there, attention_basic, fails on Qwen-Image 2.1's 2-D masks.
    argv = {"neo": ["--cpu"], "neo229": ["--cpu", "--use-pytorch-cross-attention"], "comfyui": ["--cpu"]}
    sys.argv[1:] = argv.get(host, ["--always-cpu"])  # ComfyUI parses none on import; --cpu if it ever does
    if host == "reforge":
        from ldm_patched.modules import args_parser

        args_parser.args, _ = args_parser.parser.parse_known_args()  # as modules_forge/initialization.py does
    return tree


def randomize(model, seed: int = 0, std: float = 0.1):
    """Every parameter and float buffer random; norm scales around 1 so that q and k stay of order 1."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
                is_norm = name.endswith(".scale") or (".ln_" in name and name.endswith(".weight"))
                tensor.copy_(noise + (1.0 if is_norm else 0.0))
    return model.eval()


def draw_inputs(latent: tuple[int, int], drop: tuple[str, ...] = (), ref: tuple[int, int] | None = None) -> dict:
    """The keyword inputs of the host's ``apply_model`` call (``x`` and ``t`` are passed positionally)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    inputs = {"x": draw(BATCH, 16, *latent), "context": draw(BATCH, N_TXT, 48), "y": draw(BATCH, 32)}
    inputs.update(t=torch.tensor([0.7, 0.4], dtype=torch.float64), guidance=torch.full((BATCH,), 3.5).double())
    if ref is not None:  # reForge's Flux Kontext: reference latents, tokens appended after the image
        inputs["ref_latents"] = [draw(BATCH, 16, *ref)]
    return {key: value for key, value in inputs.items() if key not in drop}


FLUX_SIZES = dict(context_in_dim=48, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2)
FLUX_SIZES.update(depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True)
MMDIT_SIZES = dict(input_size=None, patch_size=2, in_channels=16, depth=2, adm_in_channels=32, num_patches=256)
MMDIT_SIZES.update(pos_embed_max_size=16, pos_embed_scaling_factor=None, qk_norm="rms", register_length=REGISTERS)
MMDIT_SIZES["context_embedder_config"] = {"target": "torch.nn.Linear", "params": dict(in_features=48, out_features=128)}
FLUX_SPECS, MMDIT_SPECS = ("all", "d1", "s0"), ("all", "j0", "j1")


def forge2_cases() -> list[Case]:
    import torch
    from backend.nn.chroma import IntegratedChromaTransformer2DModel
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.mmditx import MMDiTX
    from backend.operations import using_forge_operations
    from backend.state_dict import load_state_dict

    def build(cls, **sizes):
        """As backend/loader.py: built inside using_forge_operations (whose Linear has no weight until a
        state dict is loaded), then given the state dict of a random plain-torch build of the same class."""
        weights = randomize(cls(**sizes).double()).state_dict()
        with using_forge_operations(device=torch.device("cpu"), dtype=torch.float64, manual_cast_enabled=False):
            model = cls(**sizes).double()
        load_state_dict(model, weights)
        assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
        return model.eval()

    flux = build(IntegratedFluxTransformer2DModel, in_channels=16, vec_in_dim=32, guidance_embed=True, **FLUX_SIZES)
    chroma_sizes = dict(in_channels=16, vec_in_dim=32, guidance_out_dim=64, guidance_hidden_dim=96, guidance_n_layers=2)
    chroma = build(IntegratedChromaTransformer2DModel, **chroma_sizes, **FLUX_SIZES)
    mmditx = build(MMDiTX, x_block_self_attn_layers=[0], **MMDIT_SIZES)
    flux_attention = (("backend.nn.flux", "attention_function"),)  # Chroma calls backend.nn.flux.attention
    sd3_inputs = draw_inputs((10, 14), ("guidance",))  # even: MMDiTX drops odd sides and then fails to add
    return [
        Case("Flux", flux, draw_inputs((9, 13)), flux_attention, FLUX_SPECS, rel=ROPE_REL),
        Case("Chroma", chroma, draw_inputs((9, 13), ("y", "guidance")), flux_attention, FLUX_SPECS, rel=ROPE_REL),
        Case("MMDiTX+attn2", mmditx, sd3_inputs, (("backend.nn.mmditx", "attention"),), MMDIT_SPECS, n_ctx=SD3_CTX),
    ]


def reforge_cases() -> list[Case]:
    import torch
    from ldm_patched.ldm.chroma.model import Chroma
    from ldm_patched.ldm.flux.model import Flux
    from ldm_patched.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    from ldm_patched.modules.ops import disable_weight_init  # pick_operations() for float weights, no cast

    def build(cls, **sizes):
        return randomize(cls(dtype=torch.float64, device=torch.device("cpu"), operations=disable_weight_init, **sizes))

    flux_sizes = dict(in_channels=16, out_channels=16, vec_in_dim=32, patch_size=2, guidance_embed=True)
    flux = build(Flux, image_model="flux", **flux_sizes, **FLUX_SIZES)
    chroma_sizes = dict(in_channels=64, out_channels=64, patch_size=2, in_dim=64, out_dim=64, hidden_dim=96, n_layers=2)
    chroma = build(Chroma, image_model="chroma", **chroma_sizes, **FLUX_SIZES)
    mmdit = build(OpenAISignatureMMDITWrapper, out_channels=16, **MMDIT_SIZES)
    sd35 = build(OpenAISignatureMMDITWrapper, out_channels=16, x_block_self_attn_layers=[0], **MMDIT_SIZES)
    flux_attention = (("ldm_patched.ldm.flux.math", "optimized_attention"),)  # flux/chroma layers call math.attention
    mmdit_attention = (("ldm_patched.ldm.modules.diffusionmodules.mmdit", "optimized_attention"),)
    sd3_inputs, kontext = draw_inputs((9, 13), ("guidance",)), draw_inputs((9, 13), ref=(6, 8))
    return [
        Case("Flux", flux, draw_inputs((9, 13)), flux_attention, FLUX_SPECS, rel=ROPE_REL),
        Case("Flux+Kontext", flux, kontext, flux_attention, FLUX_SPECS, n_extra=3 * 4, rel=ROPE_REL),
        Case("Chroma", chroma, draw_inputs((9, 13), ("y",)), flux_attention, FLUX_SPECS, rel=ROPE_REL),
        Case("MMDiT", mmdit, sd3_inputs, mmdit_attention, MMDIT_SPECS, n_ctx=SD3_CTX),
        Case("MMDiT+attn2", sd35, sd3_inputs, mmdit_attention, MMDIT_SPECS, n_ctx=SD3_CTX),
    ]


def imitation_cases() -> list[Case]:
    """The repo's from-scratch DiTs at the host cases' sizes (MMDiT at hidden 64): Flux (also with Kontext
    reference tokens) and MMDiT with and without SD3.5's attn2, padding odd sides as reForge does.  They are
    float64 throughout (their RoPE too, unlike both hosts'), hence the float64 bound for every case."""
    from tests.support.dit_models import TinyFlux, TinyMMDiT

    flux_sizes = dict(hidden=64, heads=2, depth=2, single=2, mlp_ratio=4, axes=(8, 12, 12))
    flux = randomize(TinyFlux(channels=16, context_dim=48, vec_dim=32, **flux_sizes).double())
    mmdit_sizes = dict(channels=16, hidden=64, heads=2, depth=2, pad=True, context_dim=48, y_dim=32, pos_size=16)
    mmdit = randomize(TinyMMDiT(**mmdit_sizes).double())
    sd35 = randomize(TinyMMDiT(attn2_blocks=(0,), **mmdit_sizes).double())
    attention = (("tests.support.dit_blocks", "attention_function"),)  # every imitation block attends through it
    sd3_inputs, kontext = draw_inputs((9, 13), ("guidance",)), draw_inputs((9, 13), ref=(6, 8))
    kontext["ref_latents"] = kontext["ref_latents"][0]  # TinyFlux takes the one reference latent as a tensor
    return [
        Case("Flux", flux, draw_inputs((9, 13)), attention, FLUX_SPECS),
        Case("Flux+Kontext", flux, kontext, attention, FLUX_SPECS, n_extra=3 * 4),
        Case("MMDiT", mmdit, sd3_inputs, attention, MMDIT_SPECS),  # no register tokens: text, then the image
        Case("MMDiT+attn2", sd35, sd3_inputs, attention, MMDIT_SPECS),
    ]


def neo_cases() -> list[Case]:
    """Forge Neo 2.26's own classes (de2193d), float32: Flux.1 (Kontext), Chroma, Flux.2-Klein, Z-Image,
    Lumina 2, Qwen-Image (Edit), Wan (image, video, i2v), Anima, Krea 2, Ernie-Image, PixelDiT and PiD, in
    ``tools/_neo_cases.py`` (a module, not a script)."""
    from tools._neo_cases import neo_cases as cases

    return cases()


def neo229_cases() -> list[Case]:
    """The Neo 2.29 hybrid tree's classes (``tools/_neo229_cases.py``): Z-Image, Lumina 2, Anima, Krea 2,
    Qwen-Image 2.1 on the 2.29 files, Flux.1 / Chroma / Flux.2-Klein, Wan and Qwen-Image on the newer ones."""
    from tools._neo229_cases import neo229_cases as cases

    return cases()


def comfyui_cases() -> list[Case]:
    """ComfyUI's own classes (``tools/_comfy_cases.py``): Flux.1 (Kontext), Chroma, Flux.2-Klein, SD3 / SD3.5, Z-Image
    (Omni reference), Lumina 2, Qwen-Image (Edit, Layered), Wan (image, video, i2v, reference frame), Anima."""
    from tools._comfy_cases import comfyui_cases as cases

    return cases()


CASES = {
    "forge2": forge2_cases,
    "reforge": reforge_cases,
    "neo": neo_cases,
    "neo229": neo229_cases,
    "comfyui": comfyui_cases,
    IMITATION: imitation_cases,
}


def gaussian_1d(sigma: float, side: int):
    """SEG's kernel: ceil(6 sigma) + 1 made odd, at most the side (side + 1 when even) so that reflect
    padding by k // 2 fits; weights exp(-x^2 / 2 sigma^2) at integer offsets, normalised to sum 1."""
    import torch

    six = math.ceil(6.0 * sigma)
    size = min(six + 1 if six % 2 == 0 else six, side + 1 if side % 2 == 0 else side)
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return weights / weights.sum()


def blur_maps(maps, sigma: float):
    """(N, C, h, w) maps blurred as the official SEG code does: reflect pad, dense k_h x k_w depthwise
    convolution with the outer product of the two 1D kernels; sigma > 9999 is the per-map mean."""
    import torch.nn.functional as F

    if sigma > 9999:
        return maps.mean(dim=(-2, -1), keepdim=True).expand_as(maps)
    k_h, k_w = gaussian_1d(sigma, maps.shape[-2]), gaussian_1d(sigma, maps.shape[-1])
    kernel = (k_h[:, None] * k_w[None, :]).to(maps).expand(maps.shape[1], 1, len(k_h), len(k_w))
    padded = F.pad(maps, (len(k_w) // 2, len(k_w) // 2, len(k_h) // 2, len(k_h) // 2), mode="reflect")
    return F.conv2d(padded, kernel, groups=maps.shape[1])


class Reference:
    """Swaps the host's attention function; in the chosen blocks, attention with blurred image logit rows."""

    def __init__(self, case: Case, chosen, grid: tuple[int, int], sigma: float):
        self.case, self.chosen, self.grid, self.sigma = case, set(chosen), grid, sigma
        self.layer, self.calls_in_block, self.explicit = None, 0, 0

    def enter_block(self, layer):
        def pre_hook(*_):
            self.layer, self.calls_in_block = layer, 0

        return pre_hook

    def leave_block(self, *_):
        self.layer = None  # attention calls outside the blocks (refiners, text fusion) are the host's own

    def attention(self, original):
        def attention(*args, **kwargs):
            import torch

            self.calls_in_block += 1
            role = self.role()
            if role == "pass":
                return original(*args, **kwargs)
            q, k, v = args[:3]
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            mask = args[4] if len(args) > 4 else kwargs.get("mask")
            assert len(args) <= 5, (len(args), kwargs)
            dtype = q.dtype  # the reference runs in float64 whatever the model's dtype, and returns that dtype
            q, k, v = (t.double() for t in (q, k, v))
            if not kwargs.get("skip_reshape"):  # (B, L, heads*D), MMDiT's v (B, L, heads, D) -> (B, heads, L, D)
                q, k, v = (t.reshape(*t.shape[:2], -1, q.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
            if k.shape[1] != q.shape[1]:  # grouped k/v heads passed as such: each serves consecutive q heads
                k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            logits = q @ k.transpose(-1, -2) * scale
            rows = self.image_rows(role, logits.shape[2])
            part = logits[:, :, rows]  # (B, heads, frames*h*w, L_k): frame-major, so each frame maps alone
            maps = part.reshape(-1, *self.grid, part.shape[-1]).permute(0, 3, 1, 2)
            logits[:, :, rows] = blur_maps(maps, self.sigma).permute(0, 2, 3, 1).reshape(part.shape)
            if mask is not None:  # after the blur: the host's mask applies to the (blurred) logits, as in SEG
                mask = mask[None, None] if mask.dim() == 2 else mask[:, None] if mask.dim() == 3 else mask
                logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask.double()
            self.explicit += 1
            out = (logits.softmax(dim=-1) @ v).to(dtype)  # (B, heads, L, D)
            return out if kwargs.get("skip_output_reshape") else out.transpose(1, 2).flatten(2)

        return attention

    def role(self) -> str:
        """What this attention call is: "pass" outside the chosen blocks, else the case's role for it."""
        if self.layer not in self.chosen:
            return "pass"
        roles = self.case.roles(self.layer.kind)
        assert self.calls_in_block <= len(roles), f"{self.layer}: attention call {self.calls_in_block} not in {roles}"
        return roles[self.calls_in_block - 1]

    def image_rows(self, role: str, length: int) -> slice:
        n_image = self.case.frames * self.grid[0] * self.grid[1]
        if role == "image":  # image tokens alone (SD3.5's attn2, PixelDiT's pixel blocks)
            assert length == n_image, (self.layer, length, n_image)
            return slice(0, n_image)
        assert role == "joint" and length == self.case.n_ctx + n_image + self.case.n_extra, (self.layer, role, length)
        return slice(self.case.n_ctx, self.case.n_ctx + n_image)


def blocks(model, kinds: tuple[tuple[str, str], ...] = FLUX_BLOCKS):
    """``(DitLayer, block)`` of every block, in run order, from a (kind, ModuleList attribute) list (a case's
    ``blocks``; Flux's and MMDiT's by default, as tools/dit_adapter_smoke.py calls it)."""
    from lib_seg.core.blocks import DitLayer

    for kind, attribute in kinds:
        for index, block in enumerate(getattr(model, attribute, ())):
            yield DitLayer(kind, index), block


def call(case: Case):
    import torch

    with torch.no_grad(), case.context():  # fresh tensors: Krea 2's text fusion adds into its context in place
        inputs = {key: value.clone() if torch.is_tensor(value) else value for key, value in case.inputs.items()}
        return case.model(inputs.pop("x"), inputs.pop("t"), control=None, transformer_options={}, **inputs)


@contextmanager
def reference_attention(case: Case, chosen, grid, sigma) -> Iterator[Reference]:
    """Within the block, every call of ``case.model`` runs the reference attention in the ``chosen`` blocks
    (however it is called: directly or through a host's sampler); ``Reference.explicit`` counts those calls."""
    ref = Reference(case, chosen, grid, sigma)
    handles = []
    for layer, block in blocks(case.model, case.blocks):
        marker = block.get_submodule(case.marker)
        handles += [
            marker.register_forward_pre_hook(ref.enter_block(layer)),
            marker.register_forward_hook(ref.leave_block),
        ]
    swapped = []
    try:
        for name, attribute in case.attention:
            module = importlib.import_module(name)
            swapped.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, ref.attention(swapped[-1][2]))
        yield ref
    finally:
        for module, attribute, original in reversed(swapped):
            setattr(module, attribute, original)
        for handle in handles:
            handle.remove()


def explicit_calls(model, chosen, kinds: tuple[tuple[str, str], ...] = FLUX_BLOCKS) -> int:
    """Reference attention calls one model call makes: one per chosen block, two in SD3.5's attn2 blocks."""
    attn2 = lambda block: bool(getattr(getattr(block, "x_block", None), "x_block_self_attn", False))  # noqa: E731
    return sum(1 + attn2(block) for layer, block in blocks(model, kinds) if layer in set(chosen))


def reference(case: Case, chosen, grid, sigma):
    with reference_attention(case, chosen, grid, sigma) as ref:
        out = call(case)
    expected = explicit_calls(case.model, chosen, case.blocks)
    assert ref.explicit == expected, f"{ref.explicit} explicit attention calls, expected {expected}"
    return out


def no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def run_case(host: str, case: Case, report) -> None:
    from lib_seg.core.blocks import resolve_layers
    from lib_seg.dit.hooks import blurred_dit_queries

    shape = tuple(case.inputs["x"].shape[2:])  # (H, W), or (T, H, W) of a 5-D latent
    latent = shape[-2:]
    grid = (-(-latent[0] // case.patch), -(-latent[1] // case.patch))  # (even latent for Forge's MMDiTX)
    label = f"{host} {case.name} {'x'.join(map(str, shape))}"
    report(no_hooks(case.model), f"{label}: no hooks before")
    seams = lambda: [getattr(importlib.import_module(name), attr) for name, attr in case.attention]  # noqa: E731
    host_functions = seams()  # SEG's wrappers (attention-call families) and the reference's swaps are undone
    plain = call(case)
    scale = float(plain.abs().max())
    skips = []
    for spec in case.specs:
        chosen = resolve_layers(spec, [layer for layer, _ in blocks(case.model, case.blocks)])
        for sigma in SIGMAS:
            where = f"{label} {spec:>3} sigma={sigma}"
            try:
                with blurred_dit_queries(case.model, chosen, sigma, on_skip=lambda *a: skips.append(a)):
                    seg = call(case)
                expected = reference(case, chosen, grid, sigma)
            except Exception as error:  # a failing family stays visible in the report, the other cases still run
                report(False, f"{where}: raised {type(error).__name__}: {error}")
                continue
            err = float((seg - expected).abs().max()) / scale
            effect = float((seg - plain).abs().max()) / scale
            ok = err <= case.rel and effect > EFFECT_FACTOR * case.rel and seg.dtype == plain.dtype
            report(ok, f"{where}: rel err {err:.2e} <= {case.rel:.1e}, effect {effect:.2e}")
    report(not skips, f"{label}: no block skipped {skips}")
    report(no_hooks(case.model), f"{label}: no hooks left")
    restored = all(now is before for now, before in zip(seams(), host_functions, strict=True))
    report(restored, f"{label}: the host's attention functions back in place")
    report(bool(call(case).equal(plain)), f"{label}: plain output bit-identical after")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=sorted(CASES), required=True, help="imitation: no host tree (CI)")
    host = parser.parse_args().host
    tree = setup(host)
    import torch

    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (100x here on a busy 2-core machine)
    failures = []

    def report(ok: bool, line: str) -> None:
        print(("PASS " if ok else "FAIL ") + line, flush=True)
        if not ok:
            failures.append(line)

    print(f"{host} tree {tree}, torch {torch.__version__}")
    for case in CASES[host]():
        run_case(host, case, report)
    print(f"{len(failures)} failed" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
