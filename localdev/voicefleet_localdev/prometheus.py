"""Prometheus for the local stack: config, command line and a small HTTP API client.

Prometheus runs on the host at http://127.0.0.1:9090 with data under <state>/prometheus. It
scrapes itself, livekit-server and livekit-sip, and every pod of the cluster (found with
kubernetes_sd_configs through paths.kubeconfig()) annotated `prometheus.io/scrape: "true"`,
honouring `prometheus.io/port`, `prometheus.io/path` and `prometheus.io/scheme`.

The binary is upstream Prometheus built by `make infra` (see localdev/versions.toml): Debian's
package
is built without Kubernetes discovery. It starts without a cluster: discovery then finds nothing.
Prometheus reads the kubeconfig only when it loads its config, so
`PrometheusClient.sync_discovery()` reloads it whenever the kubeconfig or the cluster changed (a
cluster came up, came up again, or got new certificates).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from voicefleet_localdev import paths

PORT = 9090
BASE_URL = f"http://127.0.0.1:{PORT}"
SCRAPE_INTERVAL = "5s"
# Metrics ports of the stack's own processes (see livekit.py).
STACK_TARGETS = {"livekit-server": "127.0.0.1:6789", "livekit-sip": "127.0.0.1:6790"}


def binary() -> Path:
    return paths.binary("prometheus")


def data_dir() -> Path:
    return paths.state_dir() / "prometheus"


def config_file() -> Path:
    return data_dir() / "prometheus.yml"


def rules_dir() -> Path:
    """Alerting/recording rule files (*.yml) Prometheus loads; see PrometheusClient.load_rules."""
    return data_dir() / "rules"


def _loaded_kubeconfig_record() -> Path:
    return data_dir() / "kubeconfig.loaded"


def kubeconfig_fingerprint() -> str:
    """Identity of the cluster discovery talks to: its kubeconfig and its incarnation.

    A cluster brought down and up again keeps its kubeconfig (the PKI survives), but Prometheus'
    discovery watch on the old incarnation never recovers, so cluster.json (rewritten by every
    `cluster up`) is part of the identity too.
    """
    digest = hashlib.sha256()
    for file in (paths.kubeconfig(), paths.cluster_state_file()):
        try:
            digest.update(file.read_bytes())
            digest.update(str(file.stat().st_mtime_ns).encode())
        except FileNotFoundError:
            digest.update(b"absent")
    return digest.hexdigest()


def discovery_kubeconfig() -> Path:
    """A copy of the kubeconfig named for the cluster's identity.

    A new identity changes the discovery config itself, and only a changed discovery config makes
    a reload start a fresh discovery (an unchanged one keeps its stale watch).
    """
    target = data_dir() / f"kubeconfig-{kubeconfig_fingerprint()[:16]}"
    if not target.exists():
        data_dir().mkdir(parents=True, exist_ok=True)
        for stale in data_dir().glob("kubeconfig-*"):
            stale.unlink()
        if paths.kubeconfig().exists():
            shutil.copyfile(paths.kubeconfig(), target)
            target.chmod(0o600)
    return target


def pod_scrape_job() -> dict[str, Any]:
    """The conventional prometheus.io/* annotation-driven pod job."""
    annotation = "__meta_kubernetes_pod_annotation_prometheus_io_"
    return {
        "job_name": "kubernetes-pods",
        "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(discovery_kubeconfig())}],
        "relabel_configs": [
            {"source_labels": [annotation + "scrape"], "action": "keep", "regex": "true"},
            {
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "action": "drop",
                "regex": "Pending|Succeeded|Failed",
            },
            {
                "source_labels": [annotation + "scheme"],
                "action": "replace",
                "regex": "(https?)",
                "target_label": "__scheme__",
            },
            {
                "source_labels": [annotation + "path"],
                "action": "replace",
                "regex": "(.+)",
                "target_label": "__metrics_path__",
            },
            {
                "source_labels": ["__address__", annotation + "port"],
                "action": "replace",
                "regex": r"([^:]+)(?::\d+)?;(\d+)",
                "replacement": "$1:$2",
                "target_label": "__address__",
            },
            {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ],
    }


def config_text() -> str:
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(rules_dir() / "*.yml")],
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{PORT}"]}]},
            *(
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in STACK_TARGETS.items()
            ),
            pod_scrape_job(),
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def argv() -> list[str]:
    return [
        str(binary()),
        f"--config.file={config_file()}",
        f"--storage.tsdb.path={data_dir() / 'data'}",
        "--storage.tsdb.retention.time=2d",
        f"--web.listen-address=0.0.0.0:{PORT}",
        # /-/reload, used when the cluster's kubeconfig changes.
        "--web.enable-lifecycle",
    ]


def prepare() -> None:
    (data_dir() / "data").mkdir(parents=True, exist_ok=True)
    rules_dir().mkdir(parents=True, exist_ok=True)
    _loaded_kubeconfig_record().write_text(kubeconfig_fingerprint())


def ready() -> bool:
    try:
        with urllib.request.urlopen(f"{BASE_URL}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class PrometheusError(RuntimeError):
    pass


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class PrometheusClient:
    base_url: str = BASE_URL

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            raise PrometheusError(f"GET {url}: {error.code} {error.read()[:500]!r}") from error
        except (urllib.error.URLError, OSError) as error:
            raise PrometheusError(f"GET {url}: {error}") from error
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[Sample]:
        """Instant query; one Sample per series of the resulting vector (or the scalar)."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] in ("scalar", "string"):
            return [Sample(labels={}, value=float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PrometheusError(f"query {expr!r} gave a {data['resultType']}, not a vector")
        return [
            Sample(labels=item["metric"], value=float(item["value"][1])) for item in data["result"]
        ]

    def query_range(
        self, expr: str, start: float, end: float, step: float
    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """Range query: (labels, [(unix time, value)]) per series of the resulting matrix."""
        params = {"query": expr, "start": str(start), "end": str(end), "step": str(step)}
        data = self._get("/api/v1/query_range", params)
        return [
            (item["metric"], [(float(t), float(v)) for t, v in item["values"]])
            for item in data["result"]
        ]

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts (labels, annotations, state, activeAt, value)."""
        return list(self._get("/api/v1/alerts")["alerts"])

    def load_rules(self, name: str, text: str) -> list[str]:
        """Write rule file `name`.yml (Prometheus rule-file YAML) and reload; returns the names
        of the rule groups Prometheus then has. A Prometheus started from an older config
        without rule_files gets the current config first."""
        rules_dir().mkdir(parents=True, exist_ok=True)
        (rules_dir() / f"{name}.yml").write_text(text)
        if config_file().read_text() != config_text():
            config_file().write_text(config_text())
        self.reload()
        return [group["name"] for group in self._get("/api/v1/rules")["groups"]]

    def remove_rules(self, name: str) -> None:
        (rules_dir() / f"{name}.yml").unlink(missing_ok=True)
        self.reload()

    def active_targets(self) -> list[dict[str, Any]]:
        """Active scrape targets as the /api/v1/targets API lists them (labels, health...)."""
        return list(self._get("/api/v1/targets", {"state": "active"})["activeTargets"])

    def reload(self) -> None:
        request = urllib.request.Request(f"{self.base_url}/-/reload", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30):
                pass
        except urllib.error.HTTPError as error:
            raise PrometheusError(f"reload failed: {error.read()[:500]!r}") from error

    def sync_discovery(self) -> bool:
        """Reload Prometheus if the kubeconfig changed since it last loaded; True if reloaded."""
        current = kubeconfig_fingerprint()
        record = _loaded_kubeconfig_record()
        if record.exists() and record.read_text() == current:
            return False
        config_file().write_text(config_text())  # names the new incarnation's kubeconfig copy
        self.reload()
        record.write_text(current)
        return True

    def wait_for_targets(
        self, job: str, match: dict[str, str], timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """Active targets of `job` whose labels include `match`, waiting until there is one."""
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            self.sync_discovery()
            found = [
                target
                for target in self.active_targets()
                if target["labels"].get("job") == job
                and all(target["labels"].get(k) == v for k, v in match.items())
            ]
            if found:
                return found
            time.sleep(1)
        raise PrometheusError(
            f"no active target of job {job} with labels {match} after {timeout:.0f} s; "
            f"targets: {[t['labels'] for t in self.active_targets()]}"
        )
