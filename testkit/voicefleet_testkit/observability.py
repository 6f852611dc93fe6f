"""The chart's dashboards and alerts as tests and tools see them.

- `dashboards()` / `panel_queries()`: every Grafana panel target and template-variable query of
  charts/voicefleet/dashboards/*.json, with Grafana's variables replaced by PromQL a real
  Prometheus (or promtool) accepts;
- `promtool()`: the promtool binary (Debian's prometheus package, installed by `make infra`);
- `render_chart()` / `alert_rule_groups()`: `helm template` of the chart with the pinned helm, and
  the PrometheusRule's groups as a plain Prometheus rule file.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# testkit/voicefleet_testkit/observability.py -> the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "voicefleet"
DASHBOARDS_DIR = CHART / "dashboards"
RUNBOOKS = CHART / "docs" / "runbooks.md"
PROMETHEUS_OPERATOR_API = "monitoring.coreos.com/v1"
# Debian's prometheus package ships it (the upstream build in the cache has only prometheus).
PROMTOOL_CANDIDATES = (Path("/usr/bin/promtool"),)

LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_]\w*)\)$")


class ToolMissing(RuntimeError):
    pass


def promtool() -> Path:
    found = shutil.which("promtool")
    for candidate in (Path(found) if found else None, *PROMTOOL_CANDIDATES):
        if candidate is not None and candidate.exists():
            return candidate
    raise ToolMissing(
        "promtool not found (looked on PATH and in /usr/bin): run `make infra`, which installs "
        "Debian's prometheus package (localdev/versions.toml [debian]) that ships /usr/bin/promtool"
    )


def helm() -> Path:
    """The pinned helm: `make unit`/`make check` build it and put it on PATH (as `make -s env`
    does), so the test kit needs no knowledge of where the local platform caches binaries."""
    found = shutil.which("helm")
    if found is None:
        raise ToolMissing(
            "helm is not on PATH: run the tests through `make check` (it builds the pinned helm), "
            'or `make infra` and `eval "$(make -s env)"` first'
        )
    return Path(found)


# --- dashboards ----------------------------------------------------------------------------


def dashboards() -> dict[str, dict[str, Any]]:
    """{file name: dashboard JSON} of every dashboard in the chart."""
    return {
        path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def substitute(expr: str, *, rate_interval: str = "5m", time_range: str = "1h") -> str:
    """Grafana variables -> PromQL: every tenant and agent, fixed intervals."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", time_range)
        .replace("$tenant", ".*")
        .replace("$agent", ".*")
    )


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str
    """As written in the dashboard (Grafana variables included)."""
    kind: str = "panel"
    """"panel" for a panel target, "variable" for a template variable's series selector."""

    def promql(self, **intervals: str) -> str:
        return substitute(self.expr, **intervals)

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} [{self.ref}]: {self.expr}"


def panel_queries(board_name: str, board: dict[str, Any]) -> list[PanelQuery]:
    """Every panel target and every label_values() variable of one dashboard."""
    queries = []
    for panel in board.get("panels") or []:
        for target in panel.get("targets") or []:
            queries.append(PanelQuery(board_name, panel["title"], target["refId"], target["expr"]))
    for variable in (board.get("templating") or {}).get("list") or []:
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(text.strip())
        if match is None:
            raise ValueError(
                f"{board_name}: variable {variable['name']}: not label_values(): {text}"
            )
        queries.append(
            PanelQuery(board_name, f"${variable['name']}", "var", match["selector"], "variable")
        )
    return queries


def all_queries() -> list[PanelQuery]:
    return [q for name, board in dashboards().items() for q in panel_queries(name, board)]


# --- chart -----------------------------------------------------------------------------------

BASE_VALUES = [
    "--set", "livekit.url=ws://livekit.example:7880",
    "--set", "livekit.apiKey=devkey",
    "--set", "livekit.apiSecret=devsecret",
    "--set", "desk.apiKey=sk-desk",
]  # fmt: skip


def render_chart(*set_args: str, api_versions: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """`helm template` of the chart with the base values plus `set_args`; the documents."""
    argv = [str(helm()), "template", "vf", str(CHART), "--namespace", "voicefleet-system"]
    argv += [*BASE_VALUES, *set_args]
    for api in api_versions:
        argv += ["--api-versions", api]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}{proc.stdout}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def alert_rule_groups(*set_args: str) -> list[dict[str, Any]]:
    """spec.groups of the chart's PrometheusRule (rendered as if the CRD existed)."""
    docs = render_chart(
        "--set", "monitoring.prometheusRule.enabled=true", *set_args,
        api_versions=(PROMETHEUS_OPERATOR_API,),
    )  # fmt: skip
    rules = [doc for doc in docs if doc.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        raise AssertionError(f"expected one PrometheusRule, got {len(rules)}")
    return list(rules[0]["spec"]["groups"])


def rule_file_text(groups: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"groups": groups}, sort_keys=False)
