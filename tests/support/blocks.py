"""Block lists written as the spec grammar names them: ``d(7, 8)`` = double blocks 7 and 8 (lib_seg.core.blocks)."""

from lib_seg.core.blocks import DitLayer


def d(*indices: int) -> tuple[DitLayer, ...]:
    return tuple(DitLayer("double", i) for i in indices)


def s(*indices: int) -> tuple[DitLayer, ...]:
    return tuple(DitLayer("single", i) for i in indices)


def j(*indices: int) -> tuple[DitLayer, ...]:
    return tuple(DitLayer("joint", i) for i in indices)
