"""Who holds the local platform: every test session and the demo hold a lease on it.

A lease is a file `<state>/leases/<kind>-<pid>`, alive while process `pid` lives: a test session
holds one for its pytest process; the demo for its provider server, which runs as long as the
demo is up (`make demo` starts it, `make demo-down` stops it). Whoever would stop the cluster or
the LiveKit stack asks `holders()` first, so a test session never takes down what the demo (or
another session) uses, and `make demo-down` never pulls the cluster from under a test session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from voicefleet_localdev import paths

TEST_SESSION = "test-session"
DEMO = "demo"


@dataclass(frozen=True)
class Holder:
    kind: str
    pid: int
    lease: Path

    def __str__(self) -> str:
        what = {TEST_SESSION: "a test session", DEMO: "the demo (`make demo`)"}
        return f"{what.get(self.kind, self.kind)} (pid {self.pid})"


def leases_dir() -> Path:
    return paths.state_dir() / "leases"


def hold(kind: str, pid: int | None = None) -> Path:
    """Take a lease for `kind`, alive as long as process `pid` (default: this one)."""
    lease = leases_dir() / f"{kind}-{pid or os.getpid()}"
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.touch()
    return lease


def release(kind: str, pid: int | None = None) -> None:
    (leases_dir() / f"{kind}-{pid or os.getpid()}").unlink(missing_ok=True)


def holders(*, excluding_pid: int | None = None) -> list[Holder]:
    """Live holders, oldest first; leases of processes that died are removed on the way."""
    found = []
    if not leases_dir().exists():
        return []
    for lease in sorted(leases_dir().iterdir(), key=lambda p: p.stat().st_mtime):
        kind, _, pid_text = lease.name.rpartition("-")
        if not kind or not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if not Path(f"/proc/{pid}").exists():
            lease.unlink(missing_ok=True)  # its process died without releasing it
        elif pid != excluding_pid:
            found.append(Holder(kind, pid, lease))
    return found
