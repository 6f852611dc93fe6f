"""A worker as a host process for the benchmarks (compare.py runs two of them side by side).

Memory is PSS (proportional set size: shared pages split between the processes sharing them),
summed over each worker's process tree; job processes are forked from a forkserver, so their RSS
counts the same libraries and models many times over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

REGISTER_TIMEOUT_S = 180.0  # a busy 2-core box: the runtime took 74 s once
MB = 2**20


class BenchError(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    """One worker as a host process, its log in the bench directory."""

    label: str
    argv: list[str]
    env: dict[str, str]
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.label}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{text}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )

    async def wait_registered(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < REGISTER_TIMEOUT_S:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.label} worker exited ({self.process.returncode}) before registering\n"
                    + self.tail()
                )
            if "registered worker" in self.log():
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        raise BenchError(f"{self.label} worker did not register\n{self.tail()}")

    def memory(self) -> dict[str, Any]:
        """PSS of the whole process tree, RSS of the main process, and the number of processes."""
        assert self.process is not None
        main = psutil.Process(self.process.pid)
        tree = [main, *main.children(recursive=True)]
        pss = 0
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                pss += process.memory_full_info().pss
        return {
            "pss_total_mb": round(pss / MB, 1),
            "main_rss_mb": round(main.memory_info().rss / MB, 1),
            "processes": len(tree),
        }

    def stop(self, timeout_s: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
