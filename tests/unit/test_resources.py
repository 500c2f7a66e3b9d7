"""resources.ExitStack unwinds exactly as contextlib.ExitStack does: the same scenario, run
with each, gives the same order of exits, the same exception (or none) out of the with
statement, the same __context__ chain, the same suppression."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlayctl.resources import ExitStack


class CM:
    def __init__(self, log: list[str], name: str, fail: bool, suppress: bool) -> None:
        self.log, self.name, self.fail, self.suppress = log, name, fail, suppress

    def __enter__(self) -> str:
        self.log.append(f"enter {self.name}")
        return self.name

    def __exit__(self, et: Any, ev: BaseException | None, tb: Any) -> bool:
        self.log.append(f"exit {self.name} seeing {ev!r}")
        if self.fail:
            raise RuntimeError(f"exit of {self.name}")
        return self.suppress


# (kind, fail, suppress): kind "cm" or "cb"; a failing callback raises.
Step = tuple[str, bool, bool]


def run(stack_type: Any, steps: list[Step], body_fails: bool) -> tuple[list[str], Any]:
    log: list[str] = []

    def cb(name: str, fail: bool) -> None:
        log.append(f"callback {name}")
        if fail:
            raise ValueError(f"callback {name}")

    def chain(e: BaseException | None) -> list[str]:
        out = []
        while e is not None:
            out.append(repr(e))
            e = e.__context__
        return out

    try:
        with stack_type() as stack:
            for i, (kind, fail, suppress) in enumerate(steps):
                if kind == "cm":
                    log.append(f"got {stack.enter_context(CM(log, str(i), fail, suppress))}")
                else:
                    assert stack.callback(cb, str(i), fail=fail) is cb
            if body_fails:
                raise KeyError("body")
        return log, None
    except BaseException as e:
        return log, chain(e)


steps_strategy = st.lists(st.tuples(st.sampled_from(["cm", "cb"]), st.booleans(), st.booleans()),
                          max_size=6)


@given(steps_strategy, st.booleans())
def test_same_as_contextlib(steps: list[Step], body_fails: bool) -> None:
    assert run(ExitStack, steps, body_fails) == run(contextlib.ExitStack, steps, body_fails)


@pytest.mark.parametrize("body_fails", [False, True])
def test_a_failing_exit_does_not_stop_the_others(body_fails: bool) -> None:
    log, chain = run(ExitStack, [("cb", False, False), ("cm", True, False), ("cb", True, False)],
                     body_fails)
    assert next(x for x in log if x.startswith(("callback", "exit"))) == "callback 2"
    assert "callback 0" in log
    assert chain[0] == "RuntimeError('exit of 1')"   # the last exit to fail wins
    if body_fails:
        assert chain[1:] == ["ValueError('callback 2')", "KeyError('body')"]


def test_close_unwinds_and_empties() -> None:
    calls: list[int] = []
    s = ExitStack()
    s.callback(calls.append, 1)
    s.callback(calls.append, 2)
    s.close()
    s.close()
    assert calls == [2, 1]


def test_enter_context_refuses_what_is_no_context_manager() -> None:
    with ExitStack() as s, pytest.raises(TypeError, match="context manager protocol"):
        s.enter_context(object())  # type: ignore[arg-type]


def test_pop_all_hands_everything_over() -> None:
    from overlayctl.resources import ExitStack
    done: list[str] = []
    with ExitStack() as outer:
        with ExitStack() as inner:
            inner.callback(done.append, "a")
            inner.callback(done.append, "b")
            outer.enter_context(inner.pop_all())
        assert done == []              # the inner stack gave them away
    assert done == ["b", "a"]          # the outer one ran them, last in first out
