"""`make bench`'s pure parts: statistics, ratios, calls per core, the table; and the baseline
agent: plain livekit-agents (nothing of VoiceFleet imported) doing what the VoiceAgent under
test does (same instructions, greeting, plugins and models)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
from voicefleet_localdev.bench import baseline_agent, compare, scale, stats
from voicefleet_operator.api import VoiceAgentSpec
from voicefleet_operator.render import VoiceAgentRef, runtime_config

BASELINE_FILE = Path(baseline_agent.__file__)


# --- statistics ----------------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 50) == 3.0
    assert stats.percentile(values, 100) == 5.0
    assert stats.percentile(values, 95) == pytest.approx(4.8)
    assert stats.percentile([1.0, 2.0], 50) == 1.5
    assert stats.percentile([7.0], 95) == 7.0


def test_percentile_refuses_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        stats.percentile([], 50)
    with pytest.raises(ValueError, match=r"0\.\.100"):
        stats.percentile([1.0], 101)


def test_summary_of_values_and_of_none() -> None:
    found = stats.summary([0.5, 1.0, 1.5, 2.0], digits=2)
    assert found == {"n": 4, "p50": 1.25, "p95": 1.93, "values": [0.5, 1.0, 1.5, 2.0]}
    assert stats.summary([]) == {"n": 0, "p50": None, "p95": None, "values": []}
    assert stats.summary(x for x in (1, 2, 3))["p50"] == 2.0


def test_ratio_is_voicefleet_over_baseline_and_none_when_meaningless() -> None:
    assert stats.ratio(1.1, 1.0) == 1.1
    assert stats.ratio(0.5, 2.0) == 0.25
    assert stats.ratio(1.0, 3.0) == 0.33
    assert stats.ratio(None, 1.0) is None
    assert stats.ratio(1.0, None) is None
    assert stats.ratio(1.0, 0) is None


def test_ratios_cover_the_issue_keys() -> None:
    ours = {
        "dispatch_to_joined_s": stats.summary([1.0, 2.0]),
        "dispatch_to_greeting_s": stats.summary([2.0]),
        "turn_latency_s": stats.summary([1.0, 1.0, 4.0]),
        "idle_pss_mb": stats.summary([600.0]),
        "per_call_pss_mb": stats.summary([80.0]),
        "cpu_s_per_call_minute": stats.summary([12.0]),
    }
    base = {
        "dispatch_to_joined_s": stats.summary([1.0]),
        "dispatch_to_greeting_s": stats.summary([1.0]),
        "turn_latency_s": stats.summary([1.0, 1.0, 2.0]),
        "idle_pss_mb": stats.summary([500.0]),
        "per_call_pss_mb": stats.summary([]),
        "cpu_s_per_call_minute": stats.summary([10.0]),
    }
    found = stats.ratios(ours, base)
    for key in (
        "dispatch_to_greeting_p50",
        "turn_latency_p50",
        "turn_latency_p95",
        "idle_memory",
        "memory_per_call",
        "cpu_per_call_minute",
    ):
        assert key in found
    assert found["dispatch_to_joined_p50"] == 1.5
    assert found["dispatch_to_greeting_p50"] == 2.0
    assert found["turn_latency_p50"] == 1.0
    assert found["turn_latency_p95"] == stats.ratio(
        stats.percentile([1, 1, 4], 95), stats.percentile([1, 1, 2], 95)
    )
    assert found["idle_memory"] == 1.2
    assert found["memory_per_call"] is None  # the baseline has no figure: no ratio
    assert found["cpu_per_call_minute"] == 1.2


def test_max_calls_stops_at_the_first_level_over_the_limit() -> None:
    # single-call p95 1.0 s: the limit is 1.5 s
    levels = {1: 1.0, 2: 1.4, 4: 1.6, 6: 1.2}
    assert stats.max_calls_within(1.0, levels, 1.5) == 2  # 6 is within, but 4 was not
    assert stats.max_calls_within(1.0, {1: 1.5, 2: 1.5}, 1.5) == 2  # the limit itself is in
    assert stats.max_calls_within(1.0, {4: 1.0, 1: 1.0, 2: 2.0}, 1.5) == 1  # sorted by level
    assert stats.max_calls_within(1.0, {1: 1.0, 2: None, 4: 1.0}, 1.5) == 1  # failed level
    assert stats.max_calls_within(None, {1: 1.0}, 1.5) == 0
    assert stats.max_calls_within(1.0, {}, 1.5) == 0


def test_calls_per_core() -> None:
    found = stats.calls_per_core(1.0, {1: 1.1, 2: 1.3, 4: 1.45, 8: 3.0}, cores=2)
    assert found["max_concurrent_calls"] == 4
    assert found["calls_per_core"] == 2.0
    assert found["turn_latency_limit_s"] == 1.5
    assert found["ramp_turn_latency_p95_s"] == {"1": 1.1, "2": 1.3, "4": 1.45, "8": 3.0}
    assert stats.calls_per_core(None, {1: 1.0}, cores=2)["calls_per_core"] == 0.0


def test_per_call_and_cpu_per_call_minute() -> None:
    assert stats.per_call(700.0, 600.0, 4) == 25.0
    with pytest.raises(ValueError, match="at least one call"):
        stats.per_call(700.0, 600.0, 0)
    assert stats.cpu_per_call_minute(3.0, 30.0) == 6.0
    assert stats.cpu_per_call_minute(3.0, 0.0) is None


def test_markdown_table_marks_the_goals_missed() -> None:
    figures = {
        "dispatch_to_joined_s": stats.summary([1.0]),
        "dispatch_to_greeting_s": stats.summary([2.0]),
        "turn_latency_s": stats.summary([1.0]),
        "idle_pss_mb": stats.summary([600.0]),
        "per_call_pss_mb": stats.summary([80.0]),
        "cpu_s_per_call_minute": stats.summary([12.0]),
    }
    baseline = {**figures, "dispatch_to_greeting_s": stats.summary([1.0])}
    result = {
        "voicefleet": figures,
        "baseline": baseline,
        "ratios": {**stats.ratios(figures, baseline), "calls_per_core": 0.5},
        "calls_per_core": {
            "voicefleet": {"calls_per_core": 1.0, "max_concurrent_calls": 2},
            "baseline": {"calls_per_core": 2.0, "max_concurrent_calls": 4},
        },
    }
    table = stats.markdown_table(result).splitlines()
    assert table[0].startswith("| figure | VoiceFleet p50")
    assert len(table) == 2 + len(stats.TABLE_ROWS) + 1
    greeting = next(line for line in table if line.startswith("| dispatch -> first greeting"))
    assert "2.00x (over 1.10)" in greeting
    joined = next(line for line in table if line.startswith("| dispatch -> agent joined"))
    assert "1.00x |" in joined and "over" not in joined
    assert "0.50x (under 0.91)" in table[-1]


# --- the baseline ---------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, at any depth (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {path}: the baseline stands alone"
            found.add(node.module or "")
    return found


def test_baseline_imports_nothing_of_voicefleet() -> None:
    modules = imported_modules(BASELINE_FILE)
    assert "livekit.agents" in modules
    assert not [m for m in modules if m.split(".")[0].startswith("voicefleet")], modules
    # and no other local helper either: the standard library and livekit only
    assert {m.split(".")[0] for m in modules} <= {"__future__", "os", "typing", "livekit"}


def test_imported_modules_sees_nested_imports(tmp_path: Path) -> None:
    source = tmp_path / "agent.py"
    source.write_text("import os\n\ndef f():\n    from voicefleet_runtime import worker\n")
    assert imported_modules(source) == {"os", "voicefleet_runtime"}


@pytest.mark.parametrize("provider_path", compare.PROVIDER_PATHS)
def test_voiceagent_under_test_does_what_the_baseline_does(provider_path: str) -> None:
    providers = SimpleNamespace(url="http://127.0.0.1:1", base_url="http://127.0.0.1:1/v1")
    spec = compare.voiceagent_spec(providers, provider_path, idle_processes=2)
    config = runtime_config(
        VoiceAgentRef("bench", "bench-x", "bench"), VoiceAgentSpec.model_validate(spec)
    )
    (agent,) = config.agents
    assert agent.instructions == baseline_agent.INSTRUCTIONS
    assert agent.greeting == baseline_agent.GREETING
    assert not config.tools and not agent.tools
    pipeline = config.pipeline
    assert pipeline.stt.model == baseline_agent.STT_MODEL[provider_path]
    assert pipeline.stt.language == baseline_agent.LANGUAGE
    assert pipeline.llm.model == baseline_agent.LLM_MODEL
    assert pipeline.tts.model == baseline_agent.TTS_MODEL[provider_path]
    expected = ("openai", "openai") if provider_path == "openai" else ("deepgram", "elevenlabs")
    assert (pipeline.stt.provider, pipeline.tts.provider) == expected
    assert pipeline.noise_cancellation.mode == "none"
    assert pipeline.preemptive_generation is False  # the baseline turns it off too
    assert config.worker.idle_processes == 2
    assert config.worker.jobs_per_worker == compare.JOBS_PER_WORKER


# --- scale mode (bench/scale.py) -----------------------------------------------------------------


def test_scale_spreads_voiceagents_round_robin_over_namespaces() -> None:
    placed = scale.spread(5, ["a", "b"])
    assert placed == [("a", "va-0000"), ("b", "va-0001"), ("a", "va-0002"),
                      ("b", "va-0003"), ("a", "va-0004")]  # fmt: skip
    assert len({name for _, name in scale.spread(1000, ["a", "b", "c"])}) == 1000


def test_scale_counts_api_errors_in_the_message_not_the_timestamp() -> None:
    lines = [
        # milliseconds 500/409 in the timestamp, no API failure in the message
        "[2026-11-30 08:08:52,500] kopf.objects [WARNING ] Daemon 'x' is cancelled. Will escalate.",
        "[2026-11-30 08:08:52,409] kopf.objects [INFO    ] Handler 'x' failed: 500 nothing",
        "[2026-11-30 08:08:53,001] kopf.objects [ERROR   ] Request attempt #1 failed; will retry",
        "[2026-11-30 08:08:53,002] voicefleet_operator. [WARNING ] ns/a: not reconciled "
        "(ApplyFailed): applying Deployment 'a' failed: PATCH /x: 429 TooManyRequests",
        "[2026-11-30 08:08:53,003] kopf.objects [WARNING ] Patching failed with inconsistencies",
        "[2026-11-30 08:08:53,004] kopf.objects [ERROR   ] APIConflictError: 409 Conflict",
    ]
    assert scale.api_errors(lines) == lines[2:]


def _size(**overrides: object) -> dict[str, object]:
    figures = scale.size_figures(
        1000, apply_s=19.44, reconciled_after_apply_s=40.0, rss_idle_mb=100.0,
        rss_peak_mb=180.0, rss_settled_mb=150.0, settle_cpu_percent=12.34, delete_s=30.0,
        worker_namespaces_gone_s=None, errors=[], leftovers={"voiceagents": 0, "secrets": 0},
        floor_apply_s=3.0, floor_delete_s=1.5, floor_children=(24.044, 9.0), create_cpu_s=49.96,
        delete_cpu_s=20.0, load_average=3.21,
    )  # fmt: skip
    figures.update(overrides)
    return figures


def test_scale_figures_per_voiceagent_and_total() -> None:
    figures = _size()
    assert figures["rss_per_voiceagent_mb"] == 0.08  # (180 - 100) / 1000
    assert figures["all_reconciled_s"] == 59.44
    assert figures["settled_cpu_percent"] == 12.3
    assert figures["worker_namespaces_gone_s"] is None
    assert figures["floor"] == {
        "apply_s": 3.0, "delete_all_s": 1.5, "children_apply_s": 24.04, "children_delete_s": 9.0
    }  # fmt: skip
    assert figures["operator_cpu_s"] == {"create": 50.0, "delete": 20.0}
    assert figures["load_average_1m"] == 3.2
    below_idle = scale.size_figures(
        10, apply_s=1, reconciled_after_apply_s=1, rss_idle_mb=100, rss_peak_mb=90,
        rss_settled_mb=90, settle_cpu_percent=0, delete_s=1, worker_namespaces_gone_s=2,
        errors=["e"] * 7, leftovers={}, floor_apply_s=1, floor_delete_s=1,
    )  # fmt: skip
    assert below_idle["rss_per_voiceagent_mb"] == 0.0
    assert below_idle["floor"]["children_apply_s"] is None  # not measured
    assert below_idle["api_errors"] == 7 and len(below_idle["api_error_samples"]) == 5


def test_scale_targets_missed_and_met() -> None:
    assert scale.missed_targets(_size()) == []
    missed = scale.missed_targets(
        _size(all_reconciled_after_last_apply_s=63.5, rss_peak_mb=629.0, delete_all_s=116.0,
              api_errors=2, leftovers={"voiceagents": 0, "secrets": 3})
    )  # fmt: skip
    assert missed == [
        "all_reconciled_after_last_apply_s 63.5 > 60",
        "rss_peak_mb 629.0 > 200",
        "delete_all_s 116.0 > 60",
        "api_errors 2",
        "leftovers {'voiceagents': 0, 'secrets': 3}",
    ]


def test_scale_table_has_a_row_per_size_with_the_floor() -> None:
    text = scale.table([_size(voiceagents=100, rss_peak_mb=120.0), _size()])
    header, rule, small, large = text.splitlines()
    assert "peak RSS MB" in header and "floor apply s" in header and set(rule) <= {"-", " "}
    assert small.split()[0] == "100" and large.split()[0] == "1000"
    assert large.split() == ["1000", "19.4", "40.0", "180", "0.080", "150", "12", "30.0",
                             "3.0", "1.5", "24.0", "0", "0", "50", "20", "3.2"]  # fmt: skip


def test_scale_a_failed_size_is_a_row_and_a_missed_target() -> None:
    failed = {"voiceagents": 1000, "error": "1000 reconciled: not within 300s (517 seen)"}
    text = scale.table([_size(voiceagents=300), failed])
    assert text.splitlines()[-1].split() == ["1000", "failed"]
    assert scale.missed_targets(failed) == ["failed: 1000 reconciled: not within 300s (517 seen)"]
