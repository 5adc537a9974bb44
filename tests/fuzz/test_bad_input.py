"""Bad input to every public coroutine method: a ChatkeepError, nothing written, no hang.

For each method of :data:`~tests.fuzz.specs.CLASSES`, hypothesis replaces one argument of
a call that would succeed with a bad value (:mod:`tests.fuzz.strategies`), and checks:

* only :class:`~chatkeep.errors.ChatkeepError` subclasses escape (never a ``TypeError``,
  ``AttributeError``, ``RecursionError`` or a driver's error);
* a value of a type the parameter does not take is refused with ``InvalidInput`` naming
  the parameter, and any ``InvalidInput`` names it;
* a failing call wrote nothing: every row of every table and every Redis key under the
  test prefix are the same before and after (a key whose TTL ran out meanwhile excepted);
* the call returns within :data:`CALL_TIMEOUT` seconds.

``CHATKEEP_FUZZ_EXAMPLES`` sets the examples per method (default 5, seeded so CI runs are
reproducible; any other value draws fresh random examples): ``CHATKEEP_FUZZ_EXAMPLES=500
pytest tests/fuzz`` is the long run.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import reprlib
import time
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatkeep.errors import ChatkeepError, InvalidInput
from tests.fuzz.conftest import World, snapshot
from tests.fuzz.specs import CLASSES, SPECS, Spec
from tests.fuzz.strategies import bad_values

DEFAULT_EXAMPLES = 5
EXAMPLES = int(os.environ.get("CHATKEEP_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
CALL_TIMEOUT = 10.0
FOREVER_TIMEOUT = 0.5
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlevel, _short.maxlist = 3, 4


def public_coroutines() -> dict[str, inspect.Signature]:
    """``Class.method`` -> signature of every public coroutine method of CLASSES."""
    found: dict[str, inspect.Signature] = {}
    for cls in CLASSES:
        for name, method in inspect.getmembers(cls, inspect.iscoroutinefunction):
            if not name.startswith("_"):
                found[f"{cls.__name__}.{name}"] = inspect.signature(method)
    return found


def parameters(signature: inspect.Signature) -> set[str]:
    return {name for name in signature.parameters if name != "self"}


def test_every_public_method_has_a_bad_input_spec() -> None:
    methods = public_coroutines()
    missing = sorted(set(methods) - set(SPECS))
    stale = sorted(set(SPECS) - set(methods))
    assert not missing, f"public methods without a bad-input spec in tests/fuzz/specs.py: {missing}"
    assert not stale, f"specs of methods that no longer exist: {stale}"
    for name, signature in methods.items():
        spec = SPECS[name]
        assert set(spec.params) == parameters(signature), f"{name}: spec params differ"
    # The suite below covers these many methods; the list is in the test ids.
    assert len(methods) >= 100


FUZZED = sorted(name for name, spec in SPECS.items() if spec.params)


def _call(spec: Spec, name: str, world: World, param: str, value: Any) -> Any:
    target = spec.target(world)
    method = getattr(target, name.rpartition(".")[2])
    kwargs = spec.valid(world)
    signature = inspect.signature(method)
    star = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_POSITIONAL), None)
    kwargs[param] = (value,) if param == star else value
    args = kwargs.pop(star) if star is not None else ()
    return method(*args, **kwargs)


def _compare(before: dict[str, Any], after: dict[str, Any], elapsed_ms: float) -> list[str]:
    problems = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            ttl = before[key][1] if key.startswith("key ") else -1
            if not 0 <= ttl <= elapsed_ms + 1000:  # not a TTL running out meanwhile
                problems.append(f"{key} was deleted")
        elif key not in before:
            problems.append(f"{key} was created: {_short.repr(after[key])}")
        elif key.startswith("key ") and before[key][0] != after[key][0]:
            problems.append(
                f"{key} changed: {_short.repr(before[key][0])} -> {_short.repr(after[key][0])}"
            )
        elif key.startswith("table ") and before[key] != after[key]:
            gone = set(before[key]) - set(after[key])
            new = set(after[key]) - set(before[key])
            problems.append(f"{key} changed: -{_short.repr(gone)} +{_short.repr(new)}")
    return problems


async def check_call(
    spec: Spec, name: str, world: World, conn: asyncpg.Connection, param: str, value: Any
) -> None:
    """One bad call: the assertions of the module docstring."""
    shown = f"{name}({param}={_short.repr(value)})"
    accepted_type = spec.params[param].accepts(value)
    blamed = {param, *spec.params[param].blames}
    before = await snapshot(conn, world.chat)
    started = time.monotonic()
    raised: Exception | None = None
    try:
        async with asyncio.timeout(FOREVER_TIMEOUT if spec.forever else CALL_TIMEOUT) as deadline:
            result = await _call(spec, name, world, param, value)
    except TimeoutError:
        if not deadline.expired():
            raise
        if spec.forever and accepted_type:
            return  # a good value: the loop runs until cancelled, as it should
        pytest.fail(f"{shown} did not return within {CALL_TIMEOUT} s")
    except Exception as exc:
        raised = exc
    if raised is None:
        close = getattr(result, "aclose", None)
        if close is not None:  # a subscription: do not leave it open
            await close()
        assert accepted_type, f"{shown} accepted a value of the wrong type"
        return
    if not isinstance(raised, ChatkeepError):
        pytest.fail(f"{shown} leaked {type(raised).__name__}: {_short.repr(str(raised))}")
    elapsed_ms = (time.monotonic() - started) * 1000
    problems = _compare(before, await snapshot(conn, world.chat), elapsed_ms)
    assert not problems, f"{shown} raised {raised!r} but wrote: {problems}"
    if not accepted_type:
        assert isinstance(raised, InvalidInput), f"{shown}: expected InvalidInput, got {raised!r}"
    if isinstance(raised, InvalidInput):
        assert raised.field in blamed, f"{shown}: InvalidInput names {raised.field!r}"


@pytest.mark.parametrize("name", FUZZED)
@settings(
    max_examples=EXAMPLES,
    derandomize=EXAMPLES == DEFAULT_EXAMPLES,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_bad_input(
    name: str, world: World, snapshot_conn: asyncpg.Connection, data: st.DataObject
) -> None:
    spec = SPECS[name]
    param = data.draw(st.sampled_from(sorted(spec.params)), label="param")
    value = data.draw(bad_values(world.cursors), label="value")
    await check_call(spec, name, world, snapshot_conn, param, value)
