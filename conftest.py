"""Session-wide pytest hooks for every test tier."""

from __future__ import annotations

import os
import sys

import pytest

_exit_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config: pytest.Config) -> None:
    # The livekit rtc SDK's native library can abort the interpreter while it is torn down
    # ("panic in a function that cannot unwind"), turning a passed run into SIGABRT. By now every
    # fixture has stopped what it started and the summary is printed, so leave with pytest's own
    # status without running native finalizers.
    if _exit_status is not None and "livekit.rtc" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
