"""`make bench`'s pure parts: statistics, ratios, calls per core, the table; and the baseline
agent: plain livekit-agents (nothing of VoiceFleet imported) doing what the VoiceAgent under
test does (same instructions, greeting, plugins and models)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
from voicefleet_localdev.bench import baseline_agent, compare, stats
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
