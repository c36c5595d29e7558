"""Batch rows of a model call, in one place: the SEG rows' layout and mapping row-wise tensors through the
containers hosts pass them in.

A batched SEG call holds ``[cond rows (n), SEG rows (n, copies of the cond rows), uncond rows]`` (A1111's
layout; the uncond rows stay last because the host's CFG reads them from the end) or appends the SEG rows
(the Forge family).  Whatever the layout, code that slims or widens a call's arguments works through a
:data:`RowMap` the caller gives, applied to every tensor of the expected row count, inside tuples, lists,
dicts and dataclasses (Chroma's and Flux.2's shared modulations are tuples of ``ModulationOut`` dataclasses;
A1111's SDXL conds are dicts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

RowMap = Callable[[torch.Tensor], torch.Tensor]
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def with_seg_rows(t: torch.Tensor, n_cond: int) -> torch.Tensor:
    """Insert copies of the first ``n_cond`` rows right after them."""
    return torch.cat([t[:n_cond], t[:n_cond], t[n_cond:]])


def without_seg_rows(t: torch.Tensor, n_cond: int) -> torch.Tensor:
    """Drop the ``n_cond`` rows after the first ``n_cond`` (the inverse of :func:`with_seg_rows`)."""
    return torch.cat([t[:n_cond], t[2 * n_cond :]])


def is_rows(value: object, rows: int) -> bool:
    """A tensor with ``rows`` rows (its first axis)."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows


def is_record(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def children(value: object) -> list:
    """What a tuple, list, dict or dataclass holds (nothing for anything else)."""
    if isinstance(value, tuple | list):
        return list(value)
    if isinstance(value, dict):
        return list(value.values())
    if is_record(value):
        return [getattr(value, field.name) for field in dataclasses.fields(value)]
    return []


def has_rows(value: object, rows: int) -> bool:
    return is_rows(value, rows) or any(has_rows(child, rows) for child in children(value))


def map_rows(value: Any, rows: int, fn: RowMap) -> Any:
    """``value`` with ``fn`` applied to every tensor of ``rows`` rows in it, containers rebuilt (a dict
    subclass keeps its class: A1111's ``DictWithShape``)."""
    if is_rows(value, rows):
        return fn(value)
    if isinstance(value, tuple | list):
        mapped = [map_rows(item, rows, fn) for item in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    if isinstance(value, dict):
        mapped = {key: map_rows(item, rows, fn) for key, item in value.items()}
        if type(value) is dict:
            return mapped
        rebuilt = value.copy()  # a dict subclass (a property-carrying cond): keep its class
        rebuilt.update(mapped)
        return rebuilt
    if is_record(value):
        changes = {f.name: map_rows(getattr(value, f.name), rows, fn) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value
