"""Frozen, slotted records: what dataclasses(frozen=True) gives, without their start-up
cost (importing dataclasses pulls in inspect, and creating each class runs exec).

A record lists its fields in __slots__ and sets them in a typed __init__ with
``fill(self, locals())``; ``replace(**changes)`` makes a variant."""

from __future__ import annotations

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any, Self

_set = object.__setattr__


class Record:
    __slots__: tuple[str, ...] = ()

    def _fill(self, values: dict[str, Any]) -> None:
        for name in self.__slots__:
            _set(self, name, values[name])

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen; use replace()")

    def replace(self, **changes: Any) -> Self:
        new = object.__new__(type(self))
        for name in self.__slots__:
            _set(new, name, changes.pop(name) if name in changes else getattr(self, name))
        if changes:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(changes))!r}")
        return new

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, n)) for n in self.__slots__))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({inner})"
