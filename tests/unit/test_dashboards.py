"""Grafana dashboards in the chart: valid JSON, every query parses (promtool), only metric names
the code exports, tenant and agent variables, and ConfigMaps the Grafana sidecar picks up."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from voicefleet_operator import metrics as operator_metrics
from voicefleet_runtime import metrics as runtime_metrics
from voicefleet_testkit import observability
from voicefleet_testkit.observability import PanelQuery

EXPECTED = {"fleet-overview.json", "call-quality.json", "usage.json", "operator-health.json"}
# PromQL words that look like metric names in a query but are not.
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "rate", "increase", "histogram_quantile", "by",
    "without", "on", "ignoring", "and", "or", "unless", "le", "bool", "offset",
}  # fmt: skip


def exported_names() -> set[str]:
    """Every sample name the runtime and the operator can expose."""
    names: set[str] = set()
    collectors = [*runtime_metrics.ALL_METRICS]
    collectors += [c for c in vars(operator_metrics).values() if isinstance(c, MetricWrapperBase)]
    for metric in collectors:
        base = metric._name
        kind = metric._type
        if kind == "counter":
            names.add(f"{base}_total")
        elif kind == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        else:
            names.add(base)
    return names


def metric_names(expr: str) -> set[str]:
    """Identifiers used as metric names (outside label matchers and strings)."""
    stripped = re.sub(r'"[^"]*"', '""', expr)
    stripped = re.sub(r"\{[^}]*\}", "{}", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", stripped))
    return {w for w in words if w not in PROMQL_WORDS and not re.fullmatch(r"\d.*", w)}


def test_the_four_dashboards_are_valid_json_with_unique_uids() -> None:
    boards = observability.dashboards()
    assert set(boards) == EXPECTED
    uids = [board["uid"] for board in boards.values()]
    assert len(set(uids)) == len(uids)
    for name, board in boards.items():
        assert board["title"].startswith("VoiceFleet / "), name
        ids = [panel["id"] for panel in board["panels"]]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for panel in board["panels"]:
            assert panel["targets"], f"{name}: panel {panel['title']!r} has no query"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_dashboard_has_tenant_and_agent_variables() -> None:
    for name, board in observability.dashboards().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert {"datasource", "tenant", "agent"} <= set(variables), name
        for label in ("tenant", "agent"):
            query = variables[label]["query"]["query"]
            assert query.startswith("label_values(") and query.endswith(f", {label})"), query
        assert '{tenant=~"$tenant"}' in variables["agent"]["query"]["query"]
        for panel in board["panels"]:
            for target in panel["targets"]:
                assert 'tenant=~"$tenant"' in target["expr"], (name, panel["title"])


def test_every_query_uses_only_exported_metric_names() -> None:
    known = exported_names()
    for query in observability.all_queries():
        unknown = metric_names(query.expr) - known
        assert not unknown, f"{query}: no such metric in the code: {sorted(unknown)}"


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    try:
        promtool = observability.promtool()
    except observability.ToolMissing as error:
        pytest.fail(str(error), pytrace=False)
    queries = observability.all_queries()
    # Each query becomes a recording rule: `promtool check rules` parses every expression.
    rules = [
        {"record": f"dashboard:query:{index}", "expr": query.promql()}
        for index, query in enumerate(queries)
    ]
    rule_file = tmp_path / "dashboards.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [str(promtool), "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        numbered = "\n".join(f"{i}: {q}" for i, q in enumerate(queries))
        pytest.fail(f"promtool rejected a query:\n{result.stdout}{result.stderr}\n{numbered}")
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_really_rejects_a_broken_query(tmp_path: Path) -> None:
    """The check above would pass vacuously if promtool accepted anything."""
    promtool = observability.promtool()
    broken = PanelQuery(
        "x", "broken", "A", 'sum by (tenant (voicefleet_active_jobs{tenant=~"$tenant"})'
    )
    rule_file = tmp_path / "broken.yml"
    rule = {"record": "dashboard:broken", "expr": broken.promql()}
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "b", "rules": [rule]}]}))
    result = subprocess.run(
        [str(promtool), "check", "rules", str(rule_file)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "parse error" in result.stdout + result.stderr


def test_dashboards_configmaps_for_the_grafana_sidecar() -> None:
    assert not [doc for doc in observability.render_chart() if doc["kind"] == "ConfigMap"], (
        "dashboards are off by default"
    )
    docs = observability.render_chart(
        "--set", "monitoring.dashboards.enabled=true",
        "--set", "monitoring.dashboards.namespace=grafana",
    )  # fmt: skip
    maps = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    assert len(maps) == len(EXPECTED)
    boards = observability.dashboards()
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["namespace"] == "grafana"
        ((key, text),) = config_map["data"].items()
        assert yaml.safe_load(text) == boards[key]  # the JSON arrives intact


def test_panels_cover_what_platform_teams_asked_for() -> None:
    """Fleet overview, call quality, usage and operator health each show their metrics."""
    wanted = {
        "fleet-overview.json": [
            "voicefleet_active_jobs", "voicefleet_jobs_capacity", "voicefleet_worker_load",
            "voicefleet_dispatch_rejected_total", "voicefleet_operator_worker_replicas",
            # callers beyond capacity, and the capacity that was asked for but does not exist
            "voicefleet_agent_capacity", "voicefleet_calls_overflowed_total",
            "voicefleet_operator_unschedulable_workers",
        ],
        "call-quality.json": [
            "voicefleet_turn_latency_seconds_bucket", "voicefleet_llm_ttft_seconds_bucket",
            "voicefleet_tts_ttfb_seconds_bucket", "voicefleet_stt_delay_seconds_bucket",
        ],
        "usage.json": [
            "voicefleet_llm_prompt_tokens_total", "voicefleet_llm_completion_tokens_total",
            "voicefleet_tts_characters_total", "voicefleet_stt_audio_seconds_total",
            "voicefleet_call_seconds_total",
        ],
        "operator-health.json": [
            "voicefleet_operator_reconciles_total", "voicefleet_operator_reconcile_errors_total",
            "voicefleet_operator_reconcile_duration_seconds_bucket",
            "voicefleet_operator_voiceagent_phase", "voicefleet_operator_voiceagent_condition",
            "voicefleet_operator_scaling_decisions_total",
            "voicefleet_operator_telephony_errors_total",
        ],
    }  # fmt: skip
    boards = observability.dashboards()
    for name, names in wanted.items():
        used = set().union(
            *(metric_names(q.expr) for q in observability.panel_queries(name, boards[name]))
        )
        assert set(names) <= used, f"{name} lacks {sorted(set(names) - used)}"
    quality = " ".join(
        q.expr for q in observability.panel_queries("q", boards["call-quality.json"])
    )
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le) (rate(voicefleet_turn_latency" in quality
        )
