"""The one way tests and benchmarks run the operator: `python -m voicefleet_operator` as a host
process, configured exactly as the chart configures its pod (VOICEFLEET_* variables).

A real process (not a thread of the test) so it can be SIGKILLed mid-reconcile, restarted, run
twice for leader election, and measured (RSS, /metrics) as the pod runs it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from voicefleet_operator.settings import ENV_PREFIX, PlatformSettings
from voicefleet_testkit.net import free_port
from voicefleet_testkit.waiting import wait_for

from voicefleet_localdev import paths


def settings_environment(settings: PlatformSettings) -> dict[str, str]:
    """The VOICEFLEET_* variables that make `PlatformSettings.from_environment` read `settings`
    back (the inverse of what the chart's Deployment sets)."""
    env = {}
    for name in PlatformSettings.model_fields:
        value: Any = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, dict):
            # Maps as the chart writes them: key=value,key=value (label selectors, call caps).
            value = ",".join(f"{key}={item}" for key, item in value.items())
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[ENV_PREFIX + name.upper()] = str(value)
    return env


def _new_log() -> Path:
    paths.logs_dir().mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix="operator-", suffix=".log", dir=paths.logs_dir())
    os.close(handle)
    return Path(name)


class OperatorProcess:
    """`python -m voicefleet_operator` with `settings`, logging to `log` (default: a new file in
    the local platform's logs directory).

    Its /healthz port is chosen here (`health_port`), its /metrics port too unless the settings
    disable metrics (port 0). `start()` returns once /healthz answers; `kill()` is SIGKILL of its
    process group (a crash), `stop()` a clean stop (SIGINT, as the kubelet's SIGTERM is handled).
    """

    def __init__(
        self,
        settings: PlatformSettings,
        kubeconfig: Path,
        log: Path | None = None,
        *,
        python_args: tuple[str, ...] = ("-m", "voicefleet_operator"),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.log = log if log is not None else _new_log()
        self.env = {
            **os.environ,
            **settings_environment(settings),
            "KUBECONFIG": str(kubeconfig),
            "VOICEFLEET_LIVENESS_PORT": str(free_port()),
            "VOICEFLEET_METRICS_PORT": str(free_port() if settings.metrics_port != 0 else 0),
            **(extra_env or {}),
        }
        self.health_port = int(self.env["VOICEFLEET_LIVENESS_PORT"])
        self.metrics_port = int(self.env["VOICEFLEET_METRICS_PORT"])
        self.python_args = python_args
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self) -> OperatorProcess:
        """Start the process without waiting for it (e.g. one meant to die at a kill point)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, *self.python_args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def start(self, timeout: float = 60) -> OperatorProcess:
        """Start it and wait until its /healthz answers; fail with its log if it exits first."""
        self.launch()

        def healthy() -> bool:
            if not self.running():
                raise AssertionError(
                    f"the operator exited ({self.returncode()}) before it was healthy:\n"
                    f"{self.tail()}"
                )
            with contextlib.suppress(OSError):
                url = f"http://127.0.0.1:{self.health_port}/healthz"
                with urllib.request.urlopen(url, timeout=1) as response:
                    return bool(response.status == 200)
            return False

        wait_for("the operator's /healthz", healthy, timeout, interval=0.2, describe=self.tail)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: float) -> int:
        """Wait for the process to end by itself; its exit status (raises TimeoutExpired)."""
        if self.process is None:
            raise AssertionError("the operator was never launched")
        return self.process.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM, as the kubelet sends it when it deletes the pod."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill: no cleanup runs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout: float = 30) -> int | None:
        """A clean stop; SIGKILL if it does not end within `timeout`. Returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def metrics(self) -> str:
        if not self.metrics_port:
            raise AssertionError("this operator runs without metrics (metrics_port 0)")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.log} ---\n" + "\n".join(text.splitlines()[-lines:])
