"""The owner of a call's resources: ExitStack, the part of contextlib.ExitStack that
overlayctl uses (enter_context, callback, pop_all, close), unwinding as contextlib's does: last in,
first out; every exit runs even when an earlier one fails; an exit that raises replaces the
exception in flight, which becomes the new one's __context__; a context manager whose
__exit__ returns true suppresses the exception in flight.

Why not contextlib: it imports collections and functools, about a quarter of what a
1-extension merge costs on top of the interpreter (docs/performance.md)."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager
    from types import TracebackType
    from typing import Any, ParamSpec, Self, TypeVar

    P = ParamSpec("P")
    T = TypeVar("T")
    R = TypeVar("R")


class ExitStack:
    __slots__ = ("_exits",)

    def __init__(self) -> None:
        # (None, fn, args, kwargs) for a callback, (exit, cm, (), {}) for a context manager
        self._exits: list[tuple[Any, Any, tuple[Any, ...], dict[str, Any]]] = []

    def __enter__(self) -> Self:
        return self

    def enter_context(self, cm: AbstractContextManager[T]) -> T:
        """Enter CM; its __exit__ runs when the stack unwinds."""
        t = type(cm)
        try:
            enter, leave = t.__enter__, t.__exit__
        except AttributeError:
            raise TypeError(f"'{t.__module__}.{t.__qualname__}' object does not support the "
                            "context manager protocol") from None
        value: T = enter(cm)
        self._exits.append((leave, cm, (), {}))
        return value

    def callback(self, fn: Callable[P, R], /, *args: P.args,
                 **kwargs: P.kwargs) -> Callable[P, R]:
        """Call FN(*ARGS, **KWARGS) when the stack unwinds."""
        self._exits.append((None, fn, args, kwargs))
        return fn

    def pop_all(self) -> ExitStack:
        """A new stack that owns everything this one did; this one is left empty (so a
        resource built up under a local stack can be handed to the caller's)."""
        new = ExitStack()
        new._exits, self._exits = self._exits, []
        return new

    def close(self) -> None:
        self.__exit__(None, None, None)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> bool | None:
        received = ev is not None
        frame_exc = sys.exc_info()[1]
        pending = ev            # the exception in flight
        raising = False         # pending is one an exit raised
        suppressed = False
        while self._exits:
            leave, obj, args, kwargs = self._exits.pop()
            try:
                if leave is None:
                    obj(*args, **kwargs)
                elif leave(obj, type(pending) if pending is not None else None, pending,
                           pending.__traceback__ if pending is not None else None):
                    suppressed, raising, pending = True, False, None
            except BaseException as new:
                _chain(new, pending, frame_exc)
                pending, raising = new, True
        if raising:
            assert pending is not None
            context = pending.__context__
            try:
                raise pending
            except BaseException:
                pending.__context__ = context   # raise set it to frame_exc: put it back
                raise
        # (bool | None, as typeshed types contextlib.ExitStack: not "may swallow" to mypy)
        return received and suppressed


def _chain(new: BaseException, old: BaseException | None,
           frame_exc: BaseException | None) -> None:
    """Make OLD the context at the end of NEW's chain, where Python put the exception that
    was being handled when the stack began to unwind."""
    while True:
        context = new.__context__
        if context is None or context is old:
            return
        if context is frame_exc:
            break
        new = context
    new.__context__ = old
