"""The VoiceFleet chart on the local cluster: the values that point it at the local stack, and
`helm upgrade --install` / `helm uninstall` with the pinned helm.

Shared by the demo (`python -m voicefleet_localdev.demo`), the benchmarks and the e2e tests, so
they install the
chart the same way:

    values = chart.local_values(watch_namespaces=["acme"])
    chart.upgrade_install("voicefleet", "voicefleet-system", values)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from voicefleet_localdev import images, paths
from voicefleet_localdev.livekit import LIVEKIT_PORT, LiveKitEndpoint
from voicefleet_localdev.procs import CommandError, ComponentError

CHART = paths.REPO_ROOT / "charts" / "voicefleet"


def helm() -> Path:
    binary = paths.binary("helm")
    if not binary.exists():
        raise ComponentError("helm", f"not built at {binary}; run `make infra`")
    return binary


def local_values(
    *,
    watch_namespaces: list[str],
    livekit: LiveKitEndpoint | None = None,
    log_level: str = "INFO",
    desk_tts_url: str | None = None,
) -> dict[str, Any]:
    """Values for the local stack: the images `make images` built (never pulled), LiveKit at the
    host address pods reach, the dev API key pair as the platform Secret, and only
    `watch_namespaces` served (tests run their own operators on other namespaces). The
    platform desk speaks through the OpenAI-compatible TTS at `desk_tts_url` (the local
    provider server, as pods reach it); without one it is off."""
    livekit = livekit or LiveKitEndpoint()
    host = paths.host_address_for_pods()
    if host is None:
        raise ComponentError(
            "chart", "no cluster with a node is up (no hostAddressFromPods); run `make cluster-up`"
        )
    operator_repo, operator_tag = images.PROJECT_IMAGES["operator"].rsplit(":", 1)
    runtime_repo, runtime_tag = images.PROJECT_IMAGES["runtime"].rsplit(":", 1)
    return {
        "livekit": {
            "url": livekit.url_for_pods,
            "apiUrl": f"http://{host}:{LIVEKIT_PORT}",
            "apiKey": livekit.api_key,
            "apiSecret": livekit.api_secret,
        },
        "image": {"repository": operator_repo, "tag": operator_tag, "pullPolicy": "Never"},
        "runtime": {
            "image": {"repository": runtime_repo, "tag": runtime_tag, "pullPolicy": "Never"}
        },
        "watchNamespaces": watch_namespaces,
        "logLevel": log_level,
        "desk": (
            {
                "enabled": True,
                "tts": {"provider": "openai", "baseUrl": desk_tts_url},
                "apiKey": "sk-local-desk",
            }
            if desk_tts_url
            else {"enabled": False}
        ),
    }


def upgrade_install(
    release: str,
    namespace: str,
    values: dict[str, Any],
    *,
    kubeconfig: Path | None = None,
    timeout_seconds: int = 300,
    skip_crds: bool = False,
) -> str:
    """`helm upgrade --install --wait` of the chart; returns helm's output (with the NOTES).

    The values (they hold the LiveKit secret) go through an owner-only file, never argv.
    `skip_crds` for a caller that applies charts/voicefleet/crds itself (server-side, taking
    the CRD over from whoever applied it last on a shared cluster)."""
    values_file = paths.state_dir() / f"helm-values-{namespace}-{release}.json"
    values_file.parent.mkdir(parents=True, exist_ok=True)
    values_file.touch(mode=0o600)
    values_file.chmod(0o600)
    values_file.write_text(json.dumps(values))
    argv = [
        str(helm()),
        "upgrade",
        "--install",
        release,
        str(CHART),
        f"--kubeconfig={kubeconfig or paths.kubeconfig()}",
        *("--namespace", namespace, "--create-namespace"),
        *("--values", str(values_file)),
        *("--wait", "--timeout", f"{timeout_seconds}s"),
        # The CRD is cluster-wide: the demo's release and each test's share it, and after a
        # `git pull` the newest chart takes it over instead of failing on the older copy's owner.
        "--force-conflicts",
        *(("--skip-crds",) if skip_crds else ()),
    ]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_seconds + 60, check=False
        )
    finally:
        values_file.unlink(missing_ok=True)
    if done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr + done.stdout)
    return done.stdout


def uninstall(release: str, namespace: str, *, kubeconfig: Path | None = None) -> bool:
    """`helm uninstall --wait`; False if the release was not installed."""
    argv = [
        str(helm()),
        "uninstall",
        release,
        f"--kubeconfig={kubeconfig or paths.kubeconfig()}",
        *("--namespace", namespace, "--wait", "--ignore-not-found"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=360, check=False)
    if done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr + done.stdout)
    return "not found" not in done.stdout + done.stderr
