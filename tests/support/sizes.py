"""The sizes of a tiny test DiT (tests/support/dit_*.py), stated once.

Every model there has widths and counts of the same kinds, which :attr:`Sizes.SHARED` names once:
``channels`` (latent channels), ``hidden`` (the token width), ``heads``, ``depth`` (the main stack's
blocks), ``context_dim`` (the text width), ``mlp_ratio``, ``axes`` (the RoPE axes) and ``patch``; a
family adds its own (Flux's ``single``, MMDiT's ``y_dim``, ...).  A model states its defaults as one
class attribute, ``SIZES = Sizes(channels=4, hidden=32, heads=2, depth=2, single=3)``, takes the
caller's overrides as ``**sizes`` and builds from :meth:`Sizes.for_call`.  Where a model keeps its
host's keyword names (Wan's ``dim``, Anima's ``model_channels``, ``layers`` for ``depth``), its
``HOST_NAMES`` maps them to the shared ones, so calls written with either name build the same model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Sizes:
    """A frozen set of named sizes: the ones a model has, with their values (``None`` is a value)."""

    SHARED = ("channels", "hidden", "heads", "depth", "context_dim", "mlp_ratio", "axes", "patch")

    __slots__ = ("_values",)

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"these sizes have no {name!r} (they have {', '.join(self._values)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Sizes are frozen: use with_({name}=...) for other sizes")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Sizes are frozen")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sizes) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return f"Sizes({', '.join(f'{name}={value!r}' for name, value in self._values.items())})"

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def with_(self, **overrides: Any) -> Sizes:
        """These sizes with some values replaced; a name these sizes do not have is a TypeError."""
        unknown = [name for name in overrides if name not in self._values]
        if unknown:
            raise TypeError(f"unknown size(s) {', '.join(map(repr, unknown))}; the sizes are {', '.join(self._values)}")
        return Sizes(**{**self._values, **overrides})

    def plus(self, **more: Any) -> Sizes:
        """These sizes and a family's own beside them; a shared name (state it in the constructor) or one these
        sizes have is a TypeError."""
        clash = [name for name in more if name in self._values or name in self.SHARED]
        if clash:
            raise TypeError(f"size(s) {', '.join(map(repr, clash))} are shared or already given: not the family's own")
        return Sizes(**self._values, **more)

    def for_call(self, owner: type, overrides: Mapping[str, Any]) -> Sizes:
        """:meth:`with_` for the ``**sizes`` of a call to the model class ``owner``: a host's name in its
        ``HOST_NAMES`` stands for the shared size it maps to (either name may be used); naming one size
        twice, or a size the model does not have, is a TypeError."""
        host_names: Mapping[str, str] = getattr(owner, "HOST_NAMES", {})
        chosen: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, value in overrides.items():
            size = host_names.get(key, key)
            if size not in self._values:
                by_size = {size: host for host, size in host_names.items()}
                names = ", ".join(by_size.get(size, size) for size in self._values)
                raise TypeError(f"{owner.__name__}() got an unexpected keyword argument {key!r}; its sizes are {names}")
            if size in chosen:
                raise TypeError(f"{owner.__name__}() got the size {size!r} twice (as {given_as[size]!r} and {key!r})")
            chosen[size], given_as[size] = value, key
        return self.with_(**chosen)
