"""The DiT families' test table, in the shape of diffusers' ``PipelineTesterMixin``: one :class:`FamilyCase` per
family that lib_seg.dit blurs, run by tests/dit/test_family_table.py.

A case says how to build the family's tiny model (tests/support/dit_*.py, float64, random weights), how to draw
the arguments the host calls it with, where the image tokens sit in a chosen block's attention call
(:class:`Place`) and which object holds the :class:`tests.support.dit_blocks.Hooks` that attention honours.  From
those, :func:`slow` is the float64 reference that never touches a query (the chosen attentions blur the image rows
of their pre-softmax logits, frame by frame, with the dense blur of tests/support/slow_seg.py), :func:`seg` is the
model under ``blurred_dit_queries`` and :func:`recorded` the q, k, v entering one attention.  The case lists
(:class:`Exact`, :class:`Batched`, :class:`Prefix`, :class:`Skipped`, :class:`Queries`, :class:`Unpatched`) say
which models, latents and block choices each common property runs on; what only one family has (its token
layout, references, frames, id checks) stays in its own test file, which takes its model and helpers from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any

import torch
from torch import nn

from lib_seg.core.blocks import DitLayer
from lib_seg.dit.attention_call import NEVER_CALLED
from lib_seg.dit.families.anima import ANIMA
from lib_seg.dit.families.base import DitFamily
from lib_seg.dit.families.ernie import ERNIE
from lib_seg.dit.families.flux import FLUX1, FLUX2
from lib_seg.dit.families.krea import KREA2
from lib_seg.dit.families.mmdit import MMDIT
from lib_seg.dit.families.nextdit import LUMINA2, ZIMAGE
from lib_seg.dit.families.pixeldit import PIXELDIT
from lib_seg.dit.families.qwen import QWEN_IMAGE
from lib_seg.dit.families.qwen21 import QWEN21
from lib_seg.dit.families.wan import WAN
from lib_seg.dit.geometry import patch_grid
from lib_seg.dit.hooks import blurred_dit_queries
from lib_seg.dit.prefix import shared_prefix
from lib_seg.unet.prefix import with_seg_rows, without_seg_rows
from tests.core.test_blur import reference_blur
from tests.support import dit_anima, dit_ernie, dit_krea, dit_nextdit, dit_qwen21
from tests.support.dit_anima import TinyAnima
from tests.support.dit_blocks import Hooks
from tests.support.dit_ernie import ErnieAttention, TinyErnie
from tests.support.dit_flux2 import TinyFlux2
from tests.support.dit_krea import TinyKrea2
from tests.support.dit_models import TinyFlux, TinyMMDiT, randomize
from tests.support.dit_nextdit import TinyNextDiT
from tests.support.dit_pixeldit import TinyPixelDiT
from tests.support.dit_qwen import TinyQwen
from tests.support.dit_qwen21 import TinyQwen21
from tests.support.dit_wan import TinyWan
from tests.support.slow_seg import blur_frame_rows

SIGMAS = (0.9, 3.0, math.inf)
LATENTS = ((6, 6), (9, 13), (5, 12), (1, 7))  # square, odd sides, non-square, one patch row
NEVER_REACHED = "never reached SEG"  # the report of a block whose attention call bypassed every seam
F64 = torch.float64


@dataclass(frozen=True)
class Place:
    """Where a chosen block's attention call holds the image: ``frames`` consecutive ``grid`` frames (each
    row-major) from token ``start``."""

    start: int
    grid: tuple[int, int]
    frames: int = 1

    @property
    def image(self) -> slice:
        return slice(self.start, self.start + self.frames * self.grid[0] * self.grid[1])


def _label(value: Any) -> str:
    if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, tuple | list):
        return "+".join(_label(v) for v in value) or "none"
    return str(value)


@dataclass(frozen=True)
class Setup:
    """One model and one call: the family's ``variant`` with extra ``build`` keywords, the latent (image, video)
    size, the call's extra ``draw`` keywords (references, CLIP features, ...) and its batch rows."""

    latent: tuple[int, ...]
    variant: str = ""
    build: dict = field(default_factory=dict)
    draw: dict = field(default_factory=dict)
    batch: int = 2

    @property
    def id(self) -> str:
        words = [self.variant, *(f"{k}={_label(v)}" for k, v in self.build.items()), _label(self.latent)]
        words += [k if v is True else f"{k}={_label(v)}" for k, v in self.draw.items()]
        return "-".join(w for w in [*words, "" if self.batch == 2 else f"batch={self.batch}"] if w)


@dataclass(frozen=True)
class Exact:
    """SEG equals :func:`slow` for every block choice of ``specs`` (None: the family's), and changes the output."""

    setup: Setup
    sigma: float
    specs: tuple[str, ...] | None = None

    @property
    def id(self) -> str:
        return "-".join([self.setup.id, f"sigma={self.sigma}", *(self.specs or ())])


@dataclass(frozen=True)
class Batched:
    """SEG rows in a doubled batch equal the plain call and the separate SEG call."""

    setup: Setup
    spec: str

    @property
    def id(self) -> str:
        return f"{self.setup.id}-{self.spec}"


@dataclass(frozen=True)
class Prefix:
    """Prefix reuse: ``probe(model)`` lists modules in call order; the batch rows entering each are ``rows``."""

    setup: Setup
    spec: str
    probe: Callable[[nn.Module], list[nn.Module]]
    rows: tuple[int, ...]
    options: Callable[[], dict] | None = None  # the call's transformer_options
    label: str = ""

    @property
    def id(self) -> str:
        return "-".join(w for w in (self.label, self.setup.id, self.spec) if w)


ANY = object()


@dataclass(frozen=True)
class Skipped:
    """A block SEG cannot place: the output stays the plain one bit for bit, every chosen block is reported, in
    order (``once``: exactly once), each report naming every one of ``reasons`` (``verbatim``: the one reason is
    the whole message; none: a 3-tuple report, the query count that holds no grid), ``queries`` and ``grid`` where
    given.  ``mangle`` changes the built model."""

    setup: Setup
    spec: str
    reasons: tuple[str, ...] = ()
    verbatim: bool = False
    queries: int | None = None
    grid: Any = ANY
    once: bool = True
    mangle: Callable[[nn.Module], Any] | None = None
    label: str = ""

    @property
    def id(self) -> str:
        return "-".join(w for w in (self.label, self.setup.id, self.spec) if w)


@dataclass(frozen=True)
class Queries:
    """Entering the attention of the one block ``spec``: its ``tokens`` queries, keys and values as the plain
    call's but for the image queries, which are the dense blur of the plain ones."""

    setup: Setup
    spec: str
    tokens: int
    sigma: float = 2.0

    @property
    def id(self) -> str:
        return f"{self.setup.id}-{self.spec}-sigma={self.sigma}"


@dataclass(frozen=True)
class Unpatched:
    """Without a ``patch_size`` attribute SEG reads the patch from the model (``patch``: what
    ``model_patch_size`` says, None where the family reads another module) and is still exact."""

    setup: Setup
    patch: int | None = None

    @property
    def id(self) -> str:
        return self.setup.id


@dataclass(frozen=True)
class FamilyCase:
    """One family of the table.  ``build(**keywords)``: the float64 model in eval mode; ``draw(model, latent,
    batch, seed, **extras)``: the call's keyword arguments; ``place(model, inputs, layer)``: where that block's
    attention holds the image; ``attention(model, layer)``: the object whose ``hooks`` it honours.  ``options``:
    the host calls the model with ``transformer_options`` (Neo's KModel); ``seams``: the (module, name) globals
    SEG wraps while armed (the attention-call families); ``defining``: the attribute of a module the family's
    structure needs (deleted, no family claims the model); ``narrow(family, **counts)``: the family's model, narrow,
    with a released model's block counts (``family.released``); ``middle``: the default of the tiny model."""

    family: DitFamily
    build: Callable[..., nn.Module]
    draw: Callable[..., dict]
    place: Callable[[nn.Module, dict, DitLayer], Place]
    attention: Callable[[nn.Module, DitLayer], Any]
    specs: tuple[str, ...]
    variants: dict[str, dict] = field(default_factory=lambda: {"": {}})
    families: dict[str, DitFamily] = field(default_factory=dict)  # variants another family claims
    options: bool = False
    seams: tuple[tuple[ModuleType, str], ...] = ()
    defining: str = ""  # a module without which no registered family claims the model
    narrow: Callable[..., nn.Module] | None = None  # (family, **block counts): a narrow model of those blocks
    middle: str = ""  # what ``middle`` selects on the first variant's tiny model
    published: bool = False  # the family's default is a published block choice (else: the middle block)
    blur: Callable[[Place, float, Any], Hooks] | None = None  # the reference's hooks (None: :func:`logit_blur`)
    exact: tuple[Exact, ...] = ()
    batched: tuple[Batched, ...] = ()
    prefix: tuple[Prefix, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    queries: tuple[Queries, ...] = ()
    unpatched: tuple[Unpatched, ...] = ()
    label: str = ""  # the test ids' name of the family (default: the family's)

    @property
    def name(self) -> str:
        return self.label or self.family.name

    def model(self, setup: Setup) -> nn.Module:
        return self.build(**self.variants[setup.variant], **setup.build)

    def inputs(self, model: nn.Module, setup: Setup, seed: int = 0) -> dict:
        return self.draw(model, setup.latent, batch=setup.batch, seed=seed, **setup.draw)

    def make(self, setup: Setup) -> tuple[nn.Module, dict]:
        """The model of ``setup`` and the arguments of its call."""
        model = self.model(setup)
        return model, self.inputs(model, setup)

    def family_of(self, variant: str) -> DitFamily:
        return self.families.get(variant, self.family)


def call(case: FamilyCase, model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model called as its host calls it, without autograd."""
    with torch.no_grad():
        return model(**{"transformer_options": {}, **inputs}) if case.options else model(**inputs)


def seg(case: FamilyCase, model, inputs, chosen, sigma: float, rows=None, on_skip=None) -> torch.Tensor:
    """The call with SEG's query blur armed on ``chosen``."""
    with blurred_dit_queries(model, chosen, sigma, rows, on_skip):
        return call(case, model, inputs)


@contextmanager
def hooked(case: FamilyCase, model, layers, make: Callable[[DitLayer], Hooks]) -> Iterator[list[Hooks]]:
    """Within the block, the attention of each of ``layers`` honours the :class:`Hooks` that ``make`` gives."""
    hooks = [make(layer) for layer in layers]
    try:
        for layer, hook in zip(layers, hooks, strict=True):
            case.attention(model, layer).hooks = hook
        yield hooks
    finally:
        for layer in layers:
            case.attention(model, layer).hooks = Hooks()


def logit_blur(place: Place, sigma: float, rows=None) -> Hooks:
    """The reference's hooks: softmax(logits) computed explicitly, each image frame's logit rows blurred over its
    grid (paper Prop. 3.1: the same as blurring those queries)."""
    return Hooks(logits=blur_frame_rows(place.start, place.grid, place.frames, sigma, rows))


def slow(case: FamilyCase, model, inputs, chosen, sigma: float, rows=None) -> torch.Tensor:
    """The reference: the chosen attentions honour :func:`logit_blur` (or the family's ``blur``); no query is
    touched."""
    blur = case.blur or logit_blur
    with hooked(case, model, chosen, lambda layer: blur(case.place(model, inputs, layer), sigma, rows)):
        return call(case, model, inputs)


def recorded(case: FamilyCase, model, inputs, layer: DitLayer, sigma: float | None = None) -> dict:
    """q, k, v (B, heads, L, D) as they entered ``layer``'s attention: in the plain call, or with SEG blurring
    that layer at ``sigma``."""
    with hooked(case, model, [layer], lambda _: Hooks(seen={})) as (hooks,):
        if sigma is None:
            call(case, model, inputs)
        else:
            seg(case, model, inputs, [layer], sigma)
    return hooks.seen


def blurred_image_queries(q: torch.Tensor, place: Place, sigma: float) -> torch.Tensor:
    """The image queries of ``q`` (B, heads, L, D), each frame blurred over its grid with the dense reference."""
    h, w = place.grid
    frames = q[:, :, place.image].unflatten(2, (place.frames, h * w))  # (B, heads, frames, N, D)
    tokens = frames.permute(0, 2, 3, 1, 4).flatten(3).flatten(0, 1)  # (B * frames, N, heads * D)
    blurred = reference_blur(tokens, h, w, sigma).unflatten(0, (q.shape[0], place.frames))
    return blurred.unflatten(-1, (q.shape[1], -1)).permute(0, 3, 1, 2, 4).flatten(2, 3)


def per_row(inputs: dict, batch: int, change: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """``change`` applied to every argument with one row per image (a tensor, or a list of them, of ``batch``
    rows); shared arguments (references of one row, image slots) are left as they are."""

    def rows(value):
        if torch.is_tensor(value):
            return change(value) if value.shape[0] == batch else value
        if isinstance(value, list) and value and all(torch.is_tensor(v) for v in value):
            return [rows(v) for v in value]
        return value

    return {key: rows(value) for key, value in inputs.items()}


def prefix_run(case: FamilyCase, model, inputs, chosen, batch: int, probe, options=None):
    """The (cond, SEG) batch of ``inputs`` under SEG, plainly and with prefix reuse: both outputs and the rows
    entering each ``probe`` module in the prefix-reuse call."""
    both = per_row(inputs, batch, partial(with_seg_rows, n_cond=batch))  # (cond, SEG) rows, as Forge appends them
    if options is not None:
        both["transformer_options"] = options
    seen: list[int] = []
    drop, expand = partial(without_seg_rows, n_cond=batch), partial(with_seg_rows, n_cond=batch)
    with blurred_dit_queries(model, chosen, 2.0, rows=slice(batch, 2 * batch)):
        full = call(case, model, both)
        handles = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0])) for m in probe(model)]
        try:
            with shared_prefix(model, chosen, 2 * batch, batch, drop, expand):
                shared = call(case, model, both)
        finally:
            for handle in handles:
                handle.remove()
    return full, shared, seen


def _randomized(cls: type[nn.Module], seed: int) -> Callable[..., nn.Module]:
    return lambda **kwargs: randomize(cls(**kwargs), seed=seed).double().eval()


class Draw:
    """Float64 draws from one seeded generator: ``draw(*shape)`` normal, ``draw.uniform(n)`` in [0, 1)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=F64)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=F64)


def _neo_options() -> dict:
    """The per-row entries Neo's ``transformer_options`` carry in a batched call."""
    return {"cond_or_uncond": [0, 0], "sigmas": torch.ones(4, dtype=F64)}


def _sweep(setups, sigmas=SIGMAS, specs=None) -> tuple[Exact, ...]:
    return tuple(Exact(setup, sigma, specs) for setup in setups for sigma in sigmas)


def attention_call(module: ModuleType) -> dict:
    """The fields of an attention-call family (Neo's NextDiT, Qwen-Image 2.1, Anima, Krea 2): Neo's KModel calls
    the model with ``transformer_options``, and the model file's module-global ``attention_function`` is the seam
    SEG wraps while armed."""
    return {"options": True, "seams": ((module, "attention_function"),)}


def _blocks(kind: str, attribute: str = "") -> Callable[[nn.Module, DitLayer], Any]:
    """The block ``layer`` of ``model.<kind>`` (or its ``attribute``)."""

    def attention(model, layer):
        block = getattr(model, kind)[layer.index]
        return getattr(block, attribute) if attribute else block

    return attention


def stream_block(model, layer: DitLayer) -> nn.Module:
    """Flux's block ``layer`` of its stream (``double_blocks`` / ``single_blocks``): its ``hooks`` are its
    attention's."""
    return getattr(model, f"{layer.kind}_blocks")[layer.index]


# --- Flux.1 / Chroma and SD3 / SD3.5 (MMDiT): tests/support/dit_models.py ------------------------------------


def _flux_draw(model, latent, batch=2, seed=0, ref=False) -> dict:
    """Forge 2.x's Flux call: ``(x, timestep, context, y)``; ``ref``: reForge's Kontext reference latent."""
    draw = Draw(seed)
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, 5, 12), "y": draw(batch, 8)}
    inputs["timestep"] = draw.uniform(batch)
    if ref:
        inputs["ref_latents"] = draw(batch, 4, 4, 6)
    return inputs


def _mmdit_draw(model, latent, batch=2, seed=0) -> dict:
    """The hosts' MMDiT call: ``(x, t, y=, context=)``."""
    draw = Draw(seed)
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, 5, 12), "y": draw(batch, 8)}
    inputs["t"] = draw.uniform(batch)
    return inputs


def _mmdit_blur(place: Place, sigma: float, rows=None) -> Hooks:
    """MMDiT's joint attention ``[context | image]``, and SD3.5's ``attn2`` over the image alone (``logits2``)."""
    joint = logit_blur(place, sigma, rows)
    joint.logits2 = blur_frame_rows(0, place.grid, place.frames, sigma, rows)
    return joint


_SPATIAL = ((6, 6), (7, 9), (5, 12))  # square, odd sides, non-square

FLUX1_CASE = FamilyCase(
    family=FLUX1,
    build=_randomized(TinyFlux, seed=3),
    draw=_flux_draw,
    place=lambda model, inputs, layer: Place(5, patch_grid(*inputs["x"].shape[-2:], pad=True)),
    attention=stream_block,
    specs=("d1,s0", "all", "s2"),
    exact=(
        *_sweep(Setup(latent) for latent in _SPATIAL),
        # reForge's Flux Kontext: reference tokens follow the image in both streams; only the image is blurred
        *_sweep((Setup((7, 6), draw={"ref": True}),), sigmas=(2.0, math.inf), specs=("all",)),
    ),
    batched=(Batched(Setup((7, 9)), "all"),),
    queries=(Queries(Setup((5, 6)), "d1", 5 + 9),),
    narrow=lambda family, double, single: TinyFlux(hidden=8, heads=1, depth=double, single=single, axes=(2, 2, 4)),
    middle="d1,s1",  # the published d7-9,s7-9 are not there: the middle of each stream
    published=True,
)

MMDIT_VARIANTS = {
    "sd3-no-pad": {"pad": False},  # Forge 2.x MMDiTX, A1111
    "sd3-pad": {"pad": True},  # reForge
    "sd3-identity-ln": {"qk_norm": False},  # A1111's SD3 Medium
    "sd35-attn2": {"attn2_blocks": (0, 1)},  # SD3.5 Medium's dual attention
}

MMDIT_CASE = FamilyCase(
    family=MMDIT,
    variants=MMDIT_VARIANTS,
    build=_randomized(TinyMMDiT, seed=3),
    draw=_mmdit_draw,
    place=lambda model, inputs, layer: Place(5, patch_grid(*inputs["x"].shape[-2:], pad=model.pad)),
    attention=_blocks("joint_blocks"),
    specs=("j1", "all"),
    exact=_sweep(Setup(latent, v) for v in MMDIT_VARIANTS for latent in _SPATIAL),
    batched=(Batched(Setup((7, 9), "sd35-attn2"), "all"),),
    queries=tuple(Queries(Setup((5, 6), v), "j1", 5 + 6) for v in ("sd3-no-pad", "sd35-attn2")),
    narrow=lambda family, joint: TinyMMDiT(hidden=8, heads=1, depth=joint),
    middle="j1",
    published=True,
    blur=_mmdit_blur,
)


# --- Flux.2 (Klein): tests/support/dit_flux2.py ---------------------------------------------------------------


def _flux2_draw(model, latent, batch=2, seed=0, ref=False) -> dict:
    draw = Draw(seed)
    inputs = {"x": draw(batch, model.channels, *latent), "context": draw(batch, 5, 12)}
    inputs["timestep"] = draw.uniform(batch)
    if ref:
        inputs["ref_latents"] = draw(batch, model.channels, 3, 5)
    return inputs


def _flux2_place(model, inputs, layer) -> Place:
    return Place(5, patch_grid(*inputs["x"].shape[-2:], model.patch, pad=True))


FLUX2_CASE = FamilyCase(
    family=FLUX2,
    build=_randomized(TinyFlux2, seed=5),
    draw=_flux2_draw,
    place=_flux2_place,
    attention=stream_block,
    specs=("d1,s0", "all", "s2"),
    exact=_sweep(Setup(latent, draw={"ref": True} if ref else {}) for ref in (False, True) for latent in LATENTS),
    batched=(Batched(Setup((7, 9), draw={"ref": True}), "d1,s1"),),
    prefix=(Prefix(Setup((6, 7)), "s1", lambda m: [b.img_attn.qkv for b in m.double_blocks], (2, 2)),),
    skipped=(Skipped(Setup((9, 13), build={"patch_attr": 2}), "all", ("position ids", "5x7"), once=False),),
    queries=(Queries(Setup((5, 7), draw={"ref": True}), "d1", 5 + 35 + 15), Queries(Setup((5, 7)), "s1", 5 + 35)),
    unpatched=tuple(Unpatched(Setup((7, 10), build={"patch": p, "expose_patch": False}), p) for p in (1, 2)),
    narrow=lambda family, double, single: TinyFlux2(hidden=8, heads=1, depth=double, single=single, axes=(2,) * 4),
    middle="d1,s1",  # the middle of each stream
)


# --- NextDiT (Z-Image, Lumina 2): tests/support/dit_nextdit.py -------------------------------------------------


def _nextdit_draw(model, latent, batch=2, seed=0) -> dict:
    draw = Draw(seed)
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, 5, 12)}
    inputs["timesteps"] = draw.uniform(batch)
    return inputs


def nextdit_n_cap(model) -> int:
    """The caption tokens before the image: 5, padded to the model's ``pad_tokens_multiple``."""
    multiple = model.pad_tokens_multiple or 1
    return -(-5 // multiple) * multiple


def _plain_rope_embedder(model) -> None:
    """``rope_embedder`` a plain function: no module hook sees the ids."""
    rotations = model.rope_embedder
    del model.rope_embedder
    model.rope_embedder = lambda ids: rotations(ids)


NEXTDIT_VARIANTS = {
    "z-image": dict(z_image=True, pad_multiple=4),  # caption 5 -> 8 tokens, image padded to a multiple of 4
    "lumina2": dict(z_image=False, pad_multiple=None, kv_heads=1),  # grouped k/v heads, no pad tokens
    "no-qk-norm": dict(z_image=False, pad_multiple=4, qk_norm=False),  # q- and k-norm one shared Identity
    "z-image-2.29": dict(z_image=True, pad_multiple=4, fused=True),  # Neo >= 2.27: ck.rms_rope, no q-norm call
    "lumina2-2.29": dict(z_image=False, pad_multiple=None, kv_heads=1, fused=True),  # ck.rms_rope1 (grouped)
    "override-only": dict(z_image=True, pad_multiple=4, fused=True, kernel="attribute"),  # no module global
}
_NEO_229 = ("z-image-2.29", "lumina2-2.29", "override-only")  # the same seam: an odd and a square latent do


def _nextdit_tokens(variant: str, n_image: int) -> int:
    padded = NEXTDIT_VARIANTS[variant]["pad_multiple"] is not None
    return (8 + -(-n_image // 4) * 4) if padded else 5 + n_image


def _nextdit_all(model) -> list[nn.Module]:
    return [b.attention.qkv for b in (*model.context_refiner, *model.noise_refiner, *model.layers)]


NEXTDIT_CASE = FamilyCase(
    label="nextdit",  # Z-Image and Lumina 2
    family=ZIMAGE,
    variants=NEXTDIT_VARIANTS,
    families={v: LUMINA2 for v, kwargs in NEXTDIT_VARIANTS.items() if not kwargs["z_image"]},
    **attention_call(dit_nextdit),
    defining="noise_refiner",  # a module with ``layers`` but no refiners is no NextDiT
    build=lambda **kwargs: dit_nextdit.build(seed=3, **kwargs),
    draw=_nextdit_draw,
    place=lambda model, inputs, layer: Place(
        nextdit_n_cap(model), patch_grid(*inputs["x"].shape[-2:], model.patch, pad=True)
    ),
    attention=_blocks("layers", "attention"),
    specs=("l1", "all", "l0,l2"),
    exact=_sweep(
        Setup(latent, variant=v) for v in NEXTDIT_VARIANTS for latent in (LATENTS[:2] if v in _NEO_229 else LATENTS)
    ),
    batched=(Batched(Setup((7, 9), variant="z-image"), "l0,l2"),),
    prefix=(  # the refiners and the main layers before the first chosen one run on the main rows only
        Prefix(
            Setup((6, 7), "z-image", build={"layers": 4}),
            "l2",
            lambda m: [b.attention.qkv for b in (*m.noise_refiner, *m.layers[:3])],
            (2, 2, 2, 2, 4),
            _neo_options,
        ),
        # l0 chosen: the prefix is the two refiner streams alone, each whole again before the host joins them;
        # l1: the slim streams are joined and widened after l0
        Prefix(Setup((5, 7), "z-image"), "l0", _nextdit_all, (2, 2, 2, 2, 4, 4, 4), _neo_options),
        Prefix(Setup((5, 7), "z-image"), "l1", _nextdit_all, (2, 2, 2, 2, 2, 4, 4), _neo_options),
    ),
    skipped=(
        # patch_size 1 on a model that patchifies by 2: the ids put 5x7 tokens where 9x13 would be
        Skipped(Setup((9, 13), "z-image", build={"patch_attr": 1}), "all", ("position ids", "9x13")),
        # without position ids to check, the image slice must still fit
        Skipped(
            Setup((9, 13), "z-image", build={"patch_attr": 1}),
            "l0,l2",
            queries=8 + 36,
            grid=(9, 13),
            mangle=_plain_rope_embedder,
            label="no-ids",
        ),
        Skipped(Setup((6, 6), "z-image", build={"fused": True, "kernel": "private"}), "l1-2", (NEVER_REACHED,)),
    ),
    queries=tuple(Queries(Setup((9, 13), variant=v), "l1", _nextdit_tokens(v, 35)) for v in NEXTDIT_VARIANTS),
    unpatched=(Unpatched(Setup((7, 10), "z-image")),),
    narrow=lambda family, layer: TinyNextDiT(
        hidden=8,
        heads=1,
        axes=(2, 2, 4),
        layers=layer,
        adaln_dim=4,
        **NEXTDIT_VARIANTS["lumina2" if family is LUMINA2 else "z-image"],
    ),
    middle="l1",
)


# --- Qwen-Image (Edit): tests/support/dit_qwen.py --------------------------------------------------------------

QWEN_REFS = ((3, 5), (4, 4))  # Qwen-Image-Edit reference latents (other sizes than the image)


def _qwen_draw(model, latent, batch=2, seed=0, refs=()) -> dict:
    """6 text tokens, the last 2 the same pad embedding (Neo pads to min_length); 5D latents (T = 1)."""
    draw = Draw(seed)
    context = draw(batch, 6, 12)
    context[:, 4:] = draw(1, 1, 12)
    inputs = {"x": draw(batch, 4, 1, *latent), "context": context}
    inputs["timesteps"] = draw.uniform(batch)
    if refs:
        inputs["ref_latents"] = [draw(batch, 4, 1, *ref) for ref in refs]
    return inputs


def qwen_grid(latent) -> tuple[int, int]:
    return (latent[-2] + 1) // 2, (latent[-1] + 1) // 2  # the host pads odd sides to the 2x2 patch


def _plain_pe_embedder(model) -> None:
    """``pe_embedder`` a plain callable: no module hook can record the ids."""
    embedder = model.pe_embedder
    del model.pe_embedder
    model.pe_embedder = embedder.forward


QWEN_CASE = FamilyCase(
    family=QWEN_IMAGE,
    build=_randomized(TinyQwen, seed=7),
    draw=_qwen_draw,
    place=lambda model, inputs, layer: Place(6, qwen_grid(inputs["x"].shape)),
    attention=_blocks("transformer_blocks", "attn"),
    specs=("j1", "all", "j0,j2"),
    exact=(
        *_sweep(Setup(latent, draw={"refs": refs}) for refs in ((), QWEN_REFS[:1]) for latent in LATENTS),
        Exact(Setup((7, 10), draw={"refs": QWEN_REFS}), 2.0, ("all",)),  # two references of other sizes
    ),
    batched=(Batched(Setup((7, 9), draw={"refs": QWEN_REFS[:1]}), "j1,j2"),),
    prefix=(Prefix(Setup((6, 7)), "j2", lambda m: [b.attn.to_q for b in m.transformer_blocks], (2, 2, 4)),),
    skipped=(
        # patch 4 claimed, patchified by 2: the 3x4 grid fits the image stream, the centred ids do not
        Skipped(Setup((9, 13), build={"patch_attr": 4}, draw={"refs": QWEN_REFS[:1]}), "all", ("position ids", "3x4")),
        # patch 1 claimed, no ids to check: the 9x13 grid needs more queries than the block has
        Skipped(Setup((9, 13), build={"patch_attr": 1}), "j1", queries=35, grid=(9, 13), mangle=_plain_pe_embedder),
    ),
    queries=tuple(Queries(Setup((7, 9), draw={"refs": QWEN_REFS[:1]}), "j1", 6 + 20 + 6, s) for s in (1.5, math.inf)),
    unpatched=(Unpatched(Setup((7, 10)), 2),),
    narrow=lambda family, joint: TinyQwen(hidden=8, heads=1, depth=joint, axes=(2, 2, 4)),
    middle="j1",
)


# --- Qwen-Image 2.1: tests/support/dit_qwen21.py ----------------------------------------------------------------

# (reference sizes, image slots): none; one of another size; two, the first of the target's own size (its call has
# as many queries as the target's, but fewer keys), text before each and after the last
QWEN21_REFS = {
    "no-refs": ((), ()),
    "one-ref": (((3, 4),), (2,)),
    "two-refs": (("target", (4, 3)), (1, 4)),
    "refs-first": (("target", (2, 5)), (0, 0)),  # no text before the references: image segments back to back
}


def _qwen21_draw(model, latent, batch=2, seed=0, refs="no-refs") -> dict:
    draw = Draw(seed)
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, 6, 8)}
    inputs["timesteps"] = draw.uniform(batch)
    sizes, slots = QWEN21_REFS[refs]
    if sizes:
        inputs["ref_latents"] = [draw(1, 4, *(latent if ref == "target" else ref)) for ref in sizes]
        inputs["image_slots"] = list(slots)
    return inputs


class _TargetSegment:
    """Qwen-Image 2.1's attention attends segment by segment: its ``hooks`` are the target's (the last)."""

    def __init__(self, attn: nn.Module):
        self.attn = attn

    @property
    def hooks(self) -> Hooks:
        return self.attn.segment_hooks.get(-1, Hooks())

    @hooks.setter
    def hooks(self, hooks: Hooks) -> None:
        self.attn.segment_hooks = {-1: hooks}


def mangled_ids(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[nn.Module], Any]:
    """A pre-hook on ``pe_embedder`` that changes the ids the model (and SEG, registered after it) sees."""
    return lambda model: model.pe_embedder.register_forward_pre_hook(lambda _m, args: (change(args[0].clone()),))


def _transpose_target(ids, grid=(5, 7)):
    """The target's ids say 7x5 (row-major on the transposed grid): the token count fits, the grid does not."""
    n = grid[0] * grid[1]
    target = ids[:, -n:, 1:3].reshape(1, *grid, 2).transpose(1, 2).reshape(1, n, 2)  # column-major
    ids[:, -n:, 1:3] = target.flip(-1)
    return ids


def _vary_index(ids, n=35):
    ids[:, -n:, 0] += torch.arange(n, dtype=ids.dtype) % 2
    return ids


def _continue_index(ids, n=35):
    ids[:, -n - 1, 0] = ids[:, -1, 0]
    return ids


_QWEN21_FULL = ("no-refs", "two-refs")  # every latent; the other layouts on the odd, non-square one
_QWEN21_LATENTS = ((6, 6), (5, 7), (1, 9))  # square, odd and non-square, one row
_QWEN21_IDS = {
    "transposed": (_transpose_target, "do not lay its last 35 tokens on the 5x7 grid"),
    "index-varies": (_vary_index, "not one image (axis 0 varies)"),
    "index-runs-on": (_continue_index, "image ids run on before its last 35 tokens"),
}

QWEN21_CASE = FamilyCase(
    family=QWEN21,
    **attention_call(dit_qwen21),
    defining="modulation",  # the model-wide modulation is part of the structure
    build=lambda **kwargs: dit_qwen21.build(seed=3, **kwargs),
    draw=_qwen21_draw,
    place=lambda model, inputs, layer: Place(0, tuple(inputs["x"].shape[-2:])),  # the target's own call
    attention=lambda model, layer: _TargetSegment(model.transformer_blocks[layer.index].attn),
    specs=("s1", "all", "s0,s2"),
    exact=_sweep(
        (
            Setup(latent, draw={"refs": refs})
            for refs in QWEN21_REFS
            for latent in (_QWEN21_LATENTS if refs in _QWEN21_FULL else _QWEN21_LATENTS[1:2])
        ),
        sigmas=(0.9, math.inf),
    ),
    batched=(Batched(Setup((5, 7), draw={"refs": "two-refs"}), "s0,s2"),),
    prefix=(
        Prefix(
            Setup((5, 6), build={"layers": 4}, draw={"refs": "two-refs"}),
            "s2",
            lambda m: [b.attn.to_q for b in m.transformer_blocks[:3]],
            (2, 2, 4),
            _neo_options,
        ),
    ),
    skipped=(
        Skipped(
            Setup((6, 6), build={"kernel": "private"}, draw={"refs": "one-ref"}), "s1-2", (NEVER_CALLED,), verbatim=True
        ),
        *(
            Skipped(Setup((5, 7), draw={"refs": "one-ref"}), "s0,s2", (reason,), mangle=mangled_ids(f), label=label)
            for label, (f, reason) in _QWEN21_IDS.items()
        ),
    ),
    queries=(Queries(Setup((5, 7), draw={"refs": "two-refs"}), "s1", 35),),
    narrow=lambda family, single: TinyQwen21(hidden=8, heads=1, layers=single, axes=(2, 2, 4)),
    middle="s1",
)


# --- Wan 2.1 / 2.2: tests/support/dit_wan.py --------------------------------------------------------------------

WAN_VIDEOS = ((1, 6, 6), (1, 9, 13), (3, 5, 8), (2, 7, 4))  # (T, H, W): one-frame square, odd sides, videos


def _wan_draw(model, video, batch=2, seed=0, i2v=False, concat=0) -> dict:
    draw = Draw(seed)
    inputs = {"x": draw(batch, 4, *video), "context": draw(batch, 5, 12)}
    inputs["timestep"] = draw.uniform(batch)
    if i2v:
        inputs["clip_fea"] = draw(batch, 3, 6)
    if concat:
        inputs["time_dim_concat"] = draw(batch, 4, concat, *video[1:])
    return inputs


def video_grid(video) -> tuple[int, int]:
    return -(-video[-2] // 2), -(-video[-1] // 2)  # Neo pads H and W to the patch


def _video_place(model, inputs, layer) -> Place:
    """Every frame of the 5-D latent, from the sequence's start (what follows: concatenated or reference frames)."""
    return Place(0, video_grid(inputs["x"].shape), inputs["x"].shape[2])


# Wan and Anima: 5-D latents, each block's self-attention over every frame, its hooks on the block
VIDEO = dict(place=_video_place, attention=_blocks("blocks"), specs=("b1", "all"))


WAN_CASE = FamilyCase(
    family=WAN,
    variants={"t2v": {}, "i2v": {"model_type": "i2v"}},
    build=_randomized(TinyWan, seed=7),
    draw=_wan_draw,
    **VIDEO,
    exact=(
        *_sweep(Setup(video, "t2v") for video in WAN_VIDEOS),
        # i2v: the cross-attention also attends to CLIP image tokens; time_dim_concat: two more frames follow the
        # video in the self-attention.  Neither is blurred.
        *_sweep(
            (
                Setup(video, "i2v", draw={"i2v": True}) if i2v else Setup(video, "t2v", draw={"concat": 2})
                for i2v in (True, False)
                for video in ((1, 9, 13), (2, 7, 4))
            ),
            sigmas=(0.9, math.inf),
            specs=("b0,b2",),
        ),
        Exact(Setup((2, 5, 6), "t2v", build={"qk_norm": False}), 2.0, ("all",)),  # the Identity norm is hooked
    ),
    batched=(Batched(Setup((2, 5, 7), "i2v", draw={"i2v": True}), "b0,b2"),),
    prefix=(Prefix(Setup((2, 5, 6), "t2v"), "b2", lambda m: [b.self_attn.q for b in m.blocks[:2]], (2, 2)),),
    skipped=(
        # a sequence longer than the grid (an extension's tokens after the video)
        Skipped(
            Setup((2, 5, 8), "t2v", build={"extra_tokens": 2}), "all", queries=2 * 3 * 4 + 2, grid=(3, 4), once=False
        ),
        # ids with rows and columns swapped (non-square)
        Skipped(Setup((2, 5, 8), "t2v", build={"swap_ids": True}), "all", ("position ids",), once=False),
    ),
    queries=(Queries(Setup((2, 5, 6), "i2v", draw={"i2v": True, "concat": 1}), "b1", 2 * 9 + 9),),
    narrow=lambda family, block: TinyWan(dim=12, num_heads=1, ffn_dim=8, num_layers=block),
    middle="b1",
)


# --- Anima: tests/support/dit_anima.py --------------------------------------------------------------------------

ANIMA_LATENTS = ((1, 6, 6), (1, 9, 13), (1, 5, 12), (2, 5, 7))  # (T, H, W): square, odd, non-square, two frames
ANIMA_VARIANTS = {"2.26": {}, "2.29": {"fused": True}}  # Neo 2.29: q-norm and RoPE one kernel, no q-norm module call


def _anima_draw(model, latent, batch=2, seed=0, refs=0) -> dict:
    draw = Draw(seed)
    inputs = {"x": draw(batch, 4, *latent), "context": draw(batch, 6, 12)}
    inputs["timesteps"] = draw.uniform(batch)
    if refs:  # Neo's reference (edit) latents, one frame each, follow the image as frames
        inputs["ref_latents"] = [draw(batch, 4, 1, *latent[1:]) for _ in range(refs)]
    return inputs


ANIMA_CASE = FamilyCase(
    family=ANIMA,
    variants=ANIMA_VARIANTS,
    **attention_call(dit_anima),
    build=_randomized(TinyAnima, seed=11),
    draw=_anima_draw,
    **VIDEO,
    exact=(
        *_sweep(Setup(latent, v) for v in ANIMA_VARIANTS for latent in ANIMA_LATENTS),
        *(  # the reference latents are left alone
            Exact(Setup(latent, v, draw={"refs": refs}), sigma, ("b0,b2",))
            for v in ANIMA_VARIANTS
            for refs in (1, 2)
            for latent, sigma in (((1, 7, 6), 2.0), ((2, 5, 6), math.inf))
        ),
    ),
    batched=(Batched(Setup((1, 7, 9), "2.29", draw={"refs": 1}), "b0,b2"),),
    prefix=(  # the blocks' rotations are one row for all (left as they are); every per-row argument is slimmed
        Prefix(Setup((1, 5, 6), "2.29"), "b2", lambda m: [b.self_attn.q_proj for b in m.blocks[:2]], (2, 2)),
    ),
    skipped=tuple(
        Skipped(Setup((1, 6, 6), v, build={"kernel": "private"}), "b0,b2", (NEVER_REACHED,), queries=9)
        for v in ANIMA_VARIANTS
    ),
    queries=tuple(Queries(Setup((1, 5, 6), v, draw={"refs": 1}), "b1", 2 * 9) for v in ANIMA_VARIANTS),
    narrow=lambda family, block: TinyAnima(model_channels=12, num_heads=1, num_blocks=block, adaln_lora_dim=2),
    middle="b1",
)


# --- Krea 2: tests/support/dit_krea.py --------------------------------------------------------------------------

KREA_REFERENCES = ((3, 5), (4, 4))  # latent sizes of the reference images (2.29 resizes them to the image's)
KREA_VARIANTS = {"2.26": {"layout": "2.26"}, "2.29": {"layout": "2.29"}}


def _krea_draw(model, latent, batch=2, seed=0, refs=0, frames=0, own_grid=False) -> dict:
    """2.26: 4-D latents (5-D with ``frames``), 3 tapped text layers side by side; 2.29: ``(B, C, 1, H, W)`` and
    the 4-D context.  ``refs`` reference latents ``(1, C, h, w)``, of the image's size with ``own_grid``."""
    draw = Draw(seed)
    frames = frames or (1 if model.layout == "2.29" else 0)
    x = draw(batch, 4, frames, *latent) if frames else draw(batch, 4, *latent)
    inputs = {"x": x, "timesteps": draw.uniform(batch)}
    context = draw(batch, 5, 3, 8)
    inputs["context"] = context if model.layout == "2.29" else context.flatten(2)
    if refs:
        inputs["ref_latents"] = [draw(1, 4, *(latent if own_grid else KREA_REFERENCES[i % 2])) for i in range(refs)]
    return inputs


def krea_image(model: TinyKrea2, inputs: dict) -> Place:
    """Where the test model puts the image: after the text (2.26), after the text and the references (2.29)."""
    grid = patch_grid(*inputs["x"].shape[-2:], model.real_patch, pad=True)
    n_image = grid[0] * grid[1]
    return Place(5 + (n_image * len(inputs.get("ref_latents", [])) if model.layout == "2.29" else 0), grid)


def _krea_prefix(variant: str, refs: int, options: dict, rows, label: str) -> Prefix:
    setup = Setup((6, 7), variant, build={"layers": 4}, draw={"refs": refs} if refs else {})
    return Prefix(setup, "s2", lambda m: [b.attn.wq for b in m.blocks], rows, lambda: dict(options), label)


KREA_CASE = FamilyCase(
    family=KREA2,
    variants=KREA_VARIANTS,
    **attention_call(dit_krea),
    defining="txtfusion",  # a single-stream ``blocks`` model without Krea's text fusion is not Krea 2
    build=_randomized(TinyKrea2, seed=11),
    draw=_krea_draw,
    place=lambda model, inputs, layer: krea_image(model, inputs),
    attention=_blocks("blocks", "attn"),
    specs=("s1", "all"),
    exact=(  # every latent without references, a square and an odd one with 1 and 2; 3 sigmas, then 2
        *_sweep(Setup(latent, v) for v in KREA_VARIANTS for latent in LATENTS),
        *_sweep(
            (Setup(latent, v, draw={"refs": refs}) for v in KREA_VARIANTS for latent in LATENTS[:2] for refs in (1, 2)),
            sigmas=(0.9, math.inf),
        ),
    ),
    batched=tuple(Batched(Setup((7, 9), v, draw={"refs": 2}), "s0,s2") for v in KREA_VARIANTS),
    prefix=(
        _krea_prefix("2.26", 0, {}, (2, 2, 4, 4), "slimmed"),
        _krea_prefix("2.26", 1, {}, (4, 4, 4, 4), "reference-path-calls-no-block-module"),
        _krea_prefix("2.26", 0, {"patches": object()}, (4, 4, 4, 4), "opaque-options"),
        _krea_prefix("2.29", 1, {}, (2, 2, 4, 4), "references"),
    ),
    skipped=(
        # a patch attribute that lies (1 or 4 on a patch-2 model): one grid has more tokens than the sequence
        # holds, the other fits a part of it, but the model's own ids say no
        *(
            Skipped(
                Setup((9, 13), v, build={"patch_attr": patch}, draw={"refs": 1}),
                "all",
                (f"hold no {grid} image, ids (0, row, column) row-major, after its 5 text tokens",),
            )
            for v in KREA_VARIANTS
            for patch, grid in ((1, "9x13"), (4, "3x4"))
        ),
        *(  # the reported tokens: text, image, reference
            Skipped(
                Setup((6, 6), v, build={"kernel": "private"}, draw={"refs": 1}),
                "s0,s2",
                (NEVER_REACHED,),
                queries=5 + 9 + (9 if v == "2.29" else 2 * 3),
            )
            for v in KREA_VARIANTS
        ),
    ),
    # references of the image's size hold ids (i + 1, row, col), the same (row, col) as the image's (0, row, col)
    queries=tuple(
        Queries(Setup((5, 7), v, draw={"refs": refs, "own_grid": True}), "s1", 5 + (refs + 1) * 12)
        for v in KREA_VARIANTS
        for refs in (1, 2)
    ),
    narrow=lambda family, single: TinyKrea2(features=16, heads=1, kvheads=1, layers=single),
    middle="s1",
)


# --- Ernie-Image: tests/support/dit_ernie.py --------------------------------------------------------------------


def _ernie_draw(model, latent, batch=2, seed=0) -> dict:
    draw = Draw(seed)
    x, context = draw(batch, model.channels, *latent), draw(batch, 5, 12)
    return {"x": x, "timesteps": draw.uniform(batch), "context": context}


class UnreachableErnieAttention(ErnieAttention):
    """A host whose attention calls its kernel by a qualified name: no module-global seam to wrap."""

    def forward(self, x, attention_mask=None, image_rotary_emb=None):
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        q, k = (dit_ernie.apply_split_half(t, image_rotary_emb).flatten(2) for t in (q, k))
        return self.to_out[0](dit_ernie.attention_function(q, k, self.to_v(x), self.heads))


def _unreachable(model) -> None:
    model.layers[1].self_attention.__class__ = UnreachableErnieAttention


ERNIE_CASE = FamilyCase(
    family=ERNIE,
    seams=((dit_ernie, "attention_function"),),
    defining="pos_embed",
    build=_randomized(TinyErnie, seed=3),
    draw=_ernie_draw,
    place=lambda model, inputs, layer: Place(  # the image first: its tokens from 0
        0, patch_grid(*inputs["x"].shape[-2:], model.x_embedder.patch_size, pad=False)
    ),
    attention=_blocks("layers", "self_attention"),
    specs=("l1", "all", "l0,l2"),
    exact=_sweep(
        Setup(latent, build={"patch": patch})
        for patch, latent in (*((1, latent) for latent in LATENTS), (2, (6, 10)), (2, (4, 2)))
    ),
    batched=(Batched(Setup((7, 9)), "l0,l2"),),
    prefix=(
        Prefix(
            Setup((6, 7), build={"layers": 4}), "l2", lambda m: [b.self_attention.to_q for b in m.layers], (2, 2, 4, 4)
        ),
    ),
    skipped=(
        Skipped(Setup((9, 13), build={"patch_attr": 2}), "all", ("do not hold 4x6 image and 5 text tokens",)),
        Skipped(
            Setup((9, 13), build={"transpose_ids": True}), "all", ("do not lay its image tokens on the 9x13 grid",)
        ),
        Skipped(Setup((4, 5)), "l1", (NEVER_REACHED,), queries=20 + 5, grid=None, mangle=_unreachable, label="no-seam"),
    ),
    queries=(Queries(Setup((5, 7)), "l1", 35 + 5),),
    narrow=lambda family, layer: TinyErnie(hidden=16, heads=1, layers=layer),
    middle="l1",
)


# --- PixelDiT / PiD: tests/support/dit_pixeldit.py --------------------------------------------------------------

PIXELDIT_IMAGES = ((12, 12), (13, 22), (8, 20), (3, 9))  # 3x3 patches, padded odd 4x6, non-square 2x5, one row 1x3
PIXELDIT_VARIANTS = {"PixelDiT": {}, "PiD": {"lq": True}}


def _pixeldit_build(**kwargs) -> TinyPixelDiT:
    model = _randomized(TinyPixelDiT, seed=2)(**kwargs)
    if hasattr(model, "lq_proj"):  # PiD: Neo's ``dynamic_args.lq_latent``, one row per image
        model.lq_latent = torch.randn(1, 3, 2, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    return model


def _pixeldit_draw(model, size, batch=2, seed=0) -> dict:
    draw = Draw(seed)
    x, context = draw(batch, 3, *size), draw(batch, 5, 12)
    return {"x": x, "timesteps": draw.uniform(batch), "context": context}


def _pixeldit_place(model, inputs, layer) -> Place:
    """Patch blocks: ``[text | image]``; pixel blocks: the patch tokens alone."""
    return Place(5 if layer.kind == "joint" else 0, patch_grid(*inputs["x"].shape[-2:], model.patch, pad=True))


PIXELDIT_CASE = FamilyCase(
    family=PIXELDIT,
    variants=PIXELDIT_VARIANTS,
    defining="s_embedder",
    build=_pixeldit_build,
    draw=_pixeldit_draw,
    place=_pixeldit_place,
    attention=lambda model, layer: (
        getattr(model, "patch_blocks" if layer.kind == "joint" else "pixel_blocks")[layer.index].attn
    ),
    specs=("j1", "b0", "all", "j0,b1"),
    exact=_sweep(  # PiD: one row per LQ image, as Neo runs it
        Setup(size, v, batch=1 if v == "PiD" else 2) for v in PIXELDIT_VARIANTS for size in PIXELDIT_IMAGES
    ),
    # PiD: the SEG rows ride with the cond rows; the LQ features (one row per image) are tiled to them
    batched=tuple(Batched(Setup((13, 10), v, batch=1), "j0,b1") for v in PIXELDIT_VARIANTS),
    # the host mixes rows between blocks (PiD's LQ gate, ``t_emb`` between the streams; the pixel blocks see
    # B * Hs * Ws rows): no block is slimmed
    prefix=tuple(
        Prefix(Setup((8, 12), v, batch=1), "j2,b1", lambda m: [b.attn.qkv_x for b in m.patch_blocks], (2, 2, 2))
        for v in PIXELDIT_VARIANTS
    ),
    skipped=(
        # a lying patch_size: 7x11 patches for a 4x6 sequence
        Skipped(Setup((13, 22), "PixelDiT", build={"patch_attr": 2}), "all"),
        Skipped(
            Setup((8, 20), "PixelDiT", build={"swap_rope": True}),
            "all",
            ("rotations do not lay its image tokens on the 2x5 grid",),
        ),
    ),
    queries=(Queries(Setup((13, 22), "PixelDiT"), "j1", 5 + 24), Queries(Setup((13, 22), "PixelDiT"), "b0", 24)),
    narrow=lambda family, joint, block: TinyPixelDiT(
        hidden_size=8, num_groups=1, patch_depth=joint, pixel_depth=block, lq=True
    ),
    middle="j1",  # the middle patch block
)

CASES = (
    FLUX1_CASE,
    MMDIT_CASE,
    FLUX2_CASE,
    NEXTDIT_CASE,
    QWEN_CASE,
    QWEN21_CASE,
    WAN_CASE,
    ANIMA_CASE,
    KREA_CASE,
    ERNIE_CASE,
    PIXELDIT_CASE,
)
