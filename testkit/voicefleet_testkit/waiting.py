"""The one polling helper of tests, the demo and the benchmarks.

`wait_for` (blocking) and `wait_until` (async) poll a probe until it holds and fail with a message
naming what was awaited, how long, and the last value or error seen. A probe that raises
`AssertionError` fails the wait at once: a wrong answer is a failure, not a reason to keep polling
until the timeout (other exceptions, and CommandFailed, are taken as transient while things
come up).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """What was awaited did not happen in time (an AssertionError, so pytest reports it plainly)."""


class CommandFailed(AssertionError):
    """A command or request a test made failed (e.g. kubectl exited non-zero): reported like a
    failed assertion, but retried by a wait, since the object asked for may not exist yet."""


def _message(what: str, timeout: float, last: Any, describe: Callable[[], str] | None) -> str:
    message = f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"
    if describe is not None:
        message += f"\n{describe()}"
    return message


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 120,
    interval: float = 1.0,
    *,
    describe: Callable[[], str] | None = None,
    fatal: tuple[type[BaseException], ...] = (),
    error: Callable[[str], Exception] = WaitTimeout,
) -> T:
    """Poll `probe` until it returns a truthy value and return that value.

    `describe` adds context to the timeout message (e.g. the pods' state); exceptions in `fatal`
    (besides AssertionError) end the wait at once; `error` builds the timeout exception."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except CommandFailed as exc:
            last = exc
        except AssertionError:
            raise
        except Exception as exc:  # transient while objects and servers come up, unless fatal
            if isinstance(exc, fatal):
                raise
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise error(_message(what, timeout, last, describe))
        time.sleep(interval)


async def wait_until(
    what: str,
    check: Callable[[], bool | Awaitable[bool]],
    within: float = 60,
    interval: float = 0.2,
    *,
    describe: Callable[[], str] | None = None,
) -> None:
    """The async twin of `wait_for`: poll `check` (sync or async) on the running loop for at most
    `within` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while True:
        try:
            result = check()
            last = await result if isinstance(result, Awaitable) else result
        except CommandFailed as exc:
            last = exc
        except AssertionError:
            raise
        except Exception as exc:
            last = exc
        else:
            if last:
                return
        if time.monotonic() >= deadline:
            raise WaitTimeout(_message(what, within, last, describe))
        await asyncio.sleep(interval)
