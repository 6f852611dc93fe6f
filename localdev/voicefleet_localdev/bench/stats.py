"""The pure arithmetic of `make bench`: summaries, ratios, calls per core, the table.

No I/O here (tests/unit/test_bench.py covers it). Conventions:
  - a summary is {"n", "p50", "p95", "values"}; p95 by linear interpolation between closest
    ranks (numpy's default), so 10 samples give a p95 between the two largest;
  - a ratio is VoiceFleet / baseline, rounded to 2 places; None when either side is missing or
    the baseline is 0 (a ratio of nothing says nothing);
  - calls per core: the most concurrent calls at which each side's p95 turn latency stays
    within LATENCY_HEADROOM x its own single-call p95, divided by the cores the machine has.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

LATENCY_HEADROOM = 1.5
GOAL_RATIO = 1.10
"""Issue 17's goal: VoiceFleet within 10% of the baseline on every figure."""

RATIO_KEYS = (
    ("dispatch_to_joined_p50", "dispatch_to_joined_s", "p50"),
    ("dispatch_to_joined_p95", "dispatch_to_joined_s", "p95"),
    ("dispatch_to_greeting_p50", "dispatch_to_greeting_s", "p50"),
    ("dispatch_to_greeting_p95", "dispatch_to_greeting_s", "p95"),
    ("turn_latency_p50", "turn_latency_s", "p50"),
    ("turn_latency_p95", "turn_latency_s", "p95"),
    ("idle_memory", "idle_pss_mb", "p50"),
    ("memory_per_call", "per_call_pss_mb", "p50"),
    ("cpu_per_call_minute", "cpu_s_per_call_minute", "p50"),
)
"""(ratio name, figure, statistic): the ratios bench.json carries, VoiceFleet / baseline."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """{"n", "p50", "p95", "values"}; p50/p95 None when there are no values."""
    found = [float(v) for v in values]
    if not found:
        return {"n": 0, "p50": None, "p95": None, "values": []}
    return {
        "n": len(found),
        "p50": round(percentile(found, 50), digits),
        "p95": round(percentile(found, 95), digits),
        "values": [round(v, digits) for v in found],
    }


def ratio(value: float | None, baseline: float | None) -> float | None:
    """VoiceFleet / baseline, 2 places; None when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    return round(value / baseline, 2)


def ratios(ours: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    """The RATIO_KEYS ratios of two sides' figures (each a summary per figure name)."""
    found: dict[str, float | None] = {}
    for name, figure, statistic in RATIO_KEYS:
        left, right = ours.get(figure) or {}, base.get(figure) or {}
        found[name] = ratio(left.get(statistic), right.get(statistic))
    return found


def max_calls_within(
    single_p95: float | None, p95_by_level: Mapping[int, float | None], headroom: float
) -> int:
    """The most concurrent calls at which p95 turn latency stays <= headroom x single_p95.

    Levels are taken in increasing order and the first level over the limit (or without a
    figure: its calls failed) ends the count; 0 when there is no single-call figure."""
    if single_p95 is None:
        return 0
    limit = headroom * single_p95
    best = 0
    for level in sorted(p95_by_level):
        p95 = p95_by_level[level]
        if p95 is None or p95 > limit:
            break
        best = level
    return best


def calls_per_core(
    single_p95: float | None,
    p95_by_level: Mapping[int, float | None],
    cores: int,
    headroom: float = LATENCY_HEADROOM,
) -> dict[str, Any]:
    calls = max_calls_within(single_p95, p95_by_level, headroom)
    return {
        "max_concurrent_calls": calls,
        "cores": cores,
        "calls_per_core": round(calls / cores, 2) if cores else None,
        "turn_latency_limit_s": round(headroom * single_p95, 3) if single_p95 else None,
        "ramp_turn_latency_p95_s": {str(k): v for k, v in sorted(p95_by_level.items())},
    }


def per_call(active: float, idle: float, calls: int) -> float:
    """What each of `calls` calls adds over the idle figure."""
    if calls <= 0:
        raise ValueError("per_call needs at least one call")
    return (active - idle) / calls


def cpu_per_call_minute(cpu_seconds: float, call_seconds: float) -> float | None:
    """CPU seconds spent per minute of calls; None without any call time."""
    if call_seconds <= 0:
        return None
    return cpu_seconds / (call_seconds / 60)


# --- the table --------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}{unit}" if abs(value) < 10 else f"{value:.1f}{unit}"
    return f"{value}{unit}"


def _verdict(value: float | None, *, higher_is_better: bool = False) -> str:
    """The ratio, marked when it misses the goal (<= 1.10; >= 1/1.10 where more is better)."""
    if value is None:
        return "n/a"
    if higher_is_better:
        return f"{value:.2f}x" + ("" if value >= round(1 / GOAL_RATIO, 2) else " (under 0.91)")
    return f"{value:.2f}x" + ("" if value <= GOAL_RATIO else " (over 1.10)")


TABLE_ROWS = (
    ("dispatch -> agent joined (s)", "dispatch_to_joined_s", "dispatch_to_joined"),
    ("dispatch -> first greeting audio (s)", "dispatch_to_greeting_s", "dispatch_to_greeting"),
    ("turn latency: caller stops -> agent audio (s)", "turn_latency_s", "turn_latency"),
    ("idle worker memory, PSS all processes (MB)", "idle_pss_mb", "idle_memory"),
    ("memory per active call, PSS (MB)", "per_call_pss_mb", "memory_per_call"),
    ("CPU seconds per call-minute", "cpu_s_per_call_minute", "cpu_per_call_minute"),
)


def markdown_table(result: Mapping[str, Any]) -> str:
    """One markdown table: each figure's p50 and p95 for both sides and the p50 ratio (and the
    p95 ratio where bench.json has one), then calls per core."""
    ours, base, found = result["voicefleet"], result["baseline"], result["ratios"]
    lines = [
        "| figure | VoiceFleet p50 | VoiceFleet p95 | baseline p50 | baseline p95 | "
        "ratio p50 | ratio p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, figure, key in TABLE_ROWS:
        left, right = ours.get(figure) or {}, base.get(figure) or {}
        p95_ratio = found.get(f"{key}_p95")
        p50_ratio = found.get(f"{key}_p50", found.get(key))
        lines.append(
            f"| {label} | {_fmt(left.get('p50'))} | {_fmt(left.get('p95'))} | "
            f"{_fmt(right.get('p50'))} | {_fmt(right.get('p95'))} | {_verdict(p50_ratio)} | "
            f"{_verdict(p95_ratio) if f'{key}_p95' in found else ''} |"
        )
    cores = result.get("calls_per_core", {})
    left, right = cores.get("voicefleet", {}), cores.get("baseline", {})
    lines.append(
        f"| calls per core (p95 turn <= {LATENCY_HEADROOM}x single call) | "
        f"{_fmt(left.get('calls_per_core'))} ({_fmt(left.get('max_concurrent_calls'))} calls) | | "
        f"{_fmt(right.get('calls_per_core'))} ({_fmt(right.get('max_concurrent_calls'))} calls) "
        f"| | {_verdict(found.get('calls_per_core'), higher_is_better=True)} | |"
    )
    return "\n".join(lines)
