"""The one kubectl of the demo, the benchmarks and the tests, and the one diagnostics dump.

Always the pinned kubectl (`make infra`) against the local cluster's kubeconfig unless another is
given, so what a test does is what a user types after `eval "$(make -s env)"`.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from voicefleet_testkit.waiting import CommandFailed

from voicefleet_localdev import paths


class KubectlError(CommandFailed):
    """kubectl exited non-zero. A CommandFailed: a test reports it as a failure, while a wait
    retries it (the object it asks for may not exist yet)."""


def kubectl(
    *args: str,
    kubeconfig: Path | None = None,
    timeout: float = 60,
    check: bool = True,
    stdin: str | None = None,
) -> str:
    """Run kubectl; return stdout. Non-zero exit raises KubectlError with its output (unless
    `check` is false)."""
    argv = [
        str(paths.binary("kubernetes", "kubectl")),
        f"--kubeconfig={kubeconfig or paths.kubeconfig()}",
        *args,
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, input=stdin, check=False
    )
    if check and done.returncode != 0:
        raise KubectlError(
            f"kubectl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}{done.stdout}"
        )
    return done.stdout


def kubectl_json(*args: str, kubeconfig: Path | None = None) -> Any:
    return json.loads(kubectl(*args, "-o", "json", kubeconfig=kubeconfig))


def diagnostics(
    namespace: str,
    *,
    log_selector: str | None = "app.kubernetes.io/name",
    kubeconfig: Path | None = None,
    limit: int = 12000,
) -> str:
    """Pods, VoiceAgents, recent logs and events of `namespace`, for a failure message."""
    commands: list[tuple[str, ...]] = [
        ("get", "pods", "-o", "wide"),
        ("get", "voiceagents", "-o", "yaml"),
    ]
    if log_selector:
        commands.append(("logs", "--tail=80", "--all-containers", "--prefix", "-l", log_selector))
    commands.append(("get", "events", "--sort-by=.lastTimestamp"))
    parts = []
    for args in commands:
        try:
            out = kubectl("-n", namespace, *args, kubeconfig=kubeconfig)
        except (KubectlError, OSError, subprocess.TimeoutExpired) as error:
            out = str(error)
        parts.append(f"$ kubectl -n {namespace} {' '.join(args)}\n{out}")
    return "\n".join(parts)[-limit:]
