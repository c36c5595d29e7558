"""SEG rows inside the Forge-family hosts' main UNet call, and replaying them through the host's batching.

The hosts (classic Forge, new Forge, reForge) run every UNet call of a step through
``model_options["model_function_wrapper"](apply_model, {"input", "timestep", "c", "cond_or_uncond"})``
when one is set: ``input`` holds ``len(cond_or_uncond)`` chunks of equal size, and a chunk flagged 0
is a cond chunk (new/classic: ``COND = 0``; reForge: index 0 of ``conds``, which is the cond list).
The wrapper must return one output row per input row.

Batched step: the wrapper appends one copy of every cond chunk to the call (inputs, sigma, every
per-row conditioning tensor, ControlNet residuals); the target blurs only those rows (attn1 patches read
them from the call's ``transformer_options`` (:data:`SEG_ROWS`)); it returns the main rows to the host and
keeps the SEG rows.

Replay: the post-CFG function does not average the kept rows itself.  It calls the host's own
cond-only batching again with a wrapper that hands back the kept rows instead of running the UNet,
so area conds, masks, AND strengths and the ``1e-37`` count are applied by the host, exactly as in
the separate SEG pass.  If that replay asks for other chunks than the ones kept (the host split the
main call, a cond was skipped), :class:`ReplayMismatch` is raised and the caller makes the separate
pass instead.

What blocks batching (the caller then makes the separate pass, which is always exact):
conditioning keys we do not know how to copy, tensors whose rows we cannot tell, and attention-level
patches of other extensions (they see ``cond_or_uncond`` and may mix rows, e.g. StyleAlign).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from lib_seg.step import RowLayout

SEG_ROWS = "sd_webui_seg_rows"  # transformer_options key: (start, stop) of the SEG rows of this call
COND = 0
CONDITIONING_KEYS = frozenset(
    {"c_crossattn", "c_concat", "y", "c_adm", "guidance", "transformer_options", "control", "control_model"}
    | {"num_tokens", "attention_mask"}
)  # "guidance": Flux's distilled-guidance value, one per row (Forge 2.x ``condition.py``, reForge ``model_base``);
# ComfyUI's Lumina 2 / Z-Image (``model_base.Lumina2.extra_conds``, model_base.py:1224-1235): "num_tokens", a
# ``CONDConstant`` int that every row of a call shares (conds with another value never share a call), and
# "attention_mask", the text mask, one row per row.
ROW_PATCH_KINDS = ("attn1_patch", "attn2_patch", "attn1_output_patch", "attn2_output_patch")


class ReplayMismatch(RuntimeError):
    """The host's replay asked for chunks the main call did not keep SEG rows for."""


@dataclass(frozen=True)
class KeptRows:
    """The SEG rows of one main call: its denoiser step, the cond-chunk shape and the outputs."""

    step: object  # the step's key (lib_seg.forge.seg_pass clocks)
    chunk_shape: torch.Size
    outputs: torch.Tensor  # n cond chunks stacked, in the order they had in the main call


def cond_chunks(cond_or_uncond: Sequence[int]) -> list[int]:
    return [index for index, flag in enumerate(cond_or_uncond) if flag == COND]


def with_chunks(t: torch.Tensor, chunks: Sequence[int], chunk_rows: int) -> torch.Tensor:
    """``t`` with copies of its ``chunks`` (each ``chunk_rows`` rows) appended."""
    return torch.cat([t, *(t[i * chunk_rows : (i + 1) * chunk_rows] for i in chunks)])


def _rows_copy(value: object, chunks: Sequence[int], chunk_rows: int, rows: int) -> tuple[bool, object]:
    """(ok, value with SEG rows) for a per-row tensor, a broadcast (1-row) tensor, None or lists/dicts of them."""
    if value is None or isinstance(value, bool | int | float):  # a constant shared by every row of the call
        return True, value
    if torch.is_tensor(value):
        if value.dim() > 0 and value.shape[0] == rows:
            return True, with_chunks(value, chunks, chunk_rows)
        return (value.dim() > 0 and value.shape[0] == 1), value
    if isinstance(value, list | tuple):
        copies = [_rows_copy(item, chunks, chunk_rows, rows) for item in value]
        return all(ok for ok, _ in copies), type(value)(item for _, item in copies)
    if isinstance(value, Mapping):
        copies = {key: _rows_copy(item, chunks, chunk_rows, rows) for key, item in value.items()}
        return all(ok for ok, _ in copies.values()), {key: item for key, (_, item) in copies.items()}
    return False, value


def attention_patched(transformer_options: Mapping) -> bool:
    """Whether another extension patches attention (replaces, or per-row attention patches)."""
    replaces = transformer_options.get("patches_replace") or {}
    patches = transformer_options.get("patches") or {}
    return any(bool(v) for v in replaces.values()) or any(patches.get(kind) for kind in ROW_PATCH_KINDS)


def _flags_options(options: dict, flags: list[int], chunks: list[int], sigmas: object) -> None:
    """Refresh the per-call row bookkeeping the hosts keep in transformer_options for the appended chunks."""
    flags = flags + [COND] * len(chunks)
    options["cond_or_uncond"] = flags
    if "uuids" in options:  # reForge: one uuid per chunk
        options["uuids"] = [*options["uuids"], *(options["uuids"][i] for i in chunks)]
    per_chunk = int(sigmas.shape[0]) if torch.is_tensor(sigmas) and sigmas.dim() == 1 else None
    if per_chunk is None:
        return
    if "cond_mark" in options:  # classic/new Forge: one 0/1 flag per row
        options["cond_mark"] = torch.tensor([f for f in flags for _ in range(per_chunk)]).to(sigmas)
    if "cond_indices" in options or "uncond_indices" in options:
        rows = [(f, i * per_chunk + r) for i, f in enumerate(flags) for r in range(per_chunk)]
        options["cond_indices"] = [row for f, row in rows if f == COND]
        options["uncond_indices"] = [row for f, row in rows if f != COND]


@dataclass(frozen=True)
class BatchedCall:
    """The main call with the SEG rows: ``input[main_rows:]`` copies ``chunks`` of ``chunk_rows`` rows."""

    input: torch.Tensor
    timestep: torch.Tensor
    c: dict
    main_rows: int
    chunks: tuple[int, ...]
    chunk_rows: int

    def drop(self, t: torch.Tensor) -> torch.Tensor:
        return t[: self.main_rows]

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        return with_chunks(t, self.chunks, self.chunk_rows)

    @property
    def layout(self) -> RowLayout:
        """Where the SEG rows sit, for :meth:`lib_seg.step.SegStep.main_call`: appended after the host's rows."""
        total = self.input.shape[0]
        return RowLayout(total, slice(self.main_rows, total), self.drop, self.expand)


def batched_call(args: Mapping) -> BatchedCall | None:
    """The main call with one SEG chunk per cond chunk appended, or None when it cannot be batched.

    The target blurs the appended rows (:meth:`lib_seg.targets.QueryTarget.blurring`)."""
    x, timestep, c, flags = args["input"], args["timestep"], args["c"], list(args["cond_or_uncond"])
    chunks = cond_chunks(flags)
    if not chunks or not set(c) <= CONDITIONING_KEYS or x.shape[0] % len(flags):
        return None
    options = dict(c.get("transformer_options") or {})
    if attention_patched(options):
        return None
    rows, chunk_rows = x.shape[0], x.shape[0] // len(flags)
    expanded = {}
    for key, value in c.items():
        if key in ("transformer_options", "control_model"):
            expanded[key] = value
            continue
        ok, expanded[key] = _rows_copy(value, chunks, chunk_rows, rows)
        if not ok:
            return None
    _flags_options(options, flags, chunks, options.get("sigmas"))
    expanded["transformer_options"] = options
    seg_x, seg_t = with_chunks(x, chunks, chunk_rows), with_chunks(timestep, chunks, chunk_rows)
    return BatchedCall(seg_x, seg_t, expanded, rows, tuple(chunks), chunk_rows)


def replay_wrapper(kept: KeptRows) -> Callable:
    """A ``model_function_wrapper`` that answers the host's cond-only batching with the kept SEG rows."""
    served = []

    def wrapper(_apply_model: Callable, args: Mapping) -> torch.Tensor:
        flags = list(args["cond_or_uncond"])
        n_chunks = kept.outputs.shape[0] // kept.chunk_shape[0]
        fits = not served and flags == [COND] * n_chunks
        if (
            not fits
            or args["input"].shape[0] != kept.outputs.shape[0]
            or args["input"].shape[1:] != kept.chunk_shape[1:]
        ):
            raise ReplayMismatch(f"the host asked for chunks {flags} of {tuple(args['input'].shape)}")
        served.append(True)
        return kept.outputs

    return wrapper
