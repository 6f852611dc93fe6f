"""Fleet-wide caps: namespace shares, per-worker budgets and the order of the pushes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from voicefleet_operator.admission import (
    FleetCap,
    fleet_cap,
    namespace_share,
    pod_budgets,
    push_order,
)
from voicefleet_runtime.admission import OverflowReason, WorkerReport


def report(agent_jobs: int, budget: int = 7, capacity: int = 7, **kwargs: object) -> WorkerReport:
    return WorkerReport(
        agent_jobs=agent_jobs,
        pending_agent_jobs=0,
        overflow_jobs=0,
        budget=budget,
        capacity=capacity,
        jobs_per_worker=capacity,
        load_threshold=1.0,
        registered=True,
        config_hash="",
        limit_reason=OverflowReason(str(kwargs.get("reason", OverflowReason.CAPACITY))),
        overflow_slots=4,
        draining=False,
    )


def test_namespace_shares_add_up_to_the_cap() -> None:
    active = {"a": 3, "b": 1, "c": 0}
    shares = {name: namespace_share(10, name, active, active) for name in active}
    # 6 calls left, 2 each on top of what each runs
    assert shares == {"a": 5, "b": 3, "c": 2}
    assert sum(shares.values()) == 10
    uneven = {name: namespace_share(11, name, active, active) for name in active}
    assert sum(uneven.values()) == 11 and uneven["a"] == 6  # remainder by name
    # Over the cap already: nobody gets more than it runs.
    assert namespace_share(3, "a", active, active) == 3


@given(
    st.integers(min_value=0, max_value=200),
    st.dictionaries(st.sampled_from("abcdefgh"), st.integers(0, 50), min_size=1),
)
def test_namespace_shares_never_exceed_the_cap_unless_running_calls_do(
    cap: int, active: dict[str, int]
) -> None:
    shares = [namespace_share(cap, name, active, active) for name in active]
    assert sum(shares) == max(cap, sum(active.values()))
    assert all(share >= active[name] for share, name in zip(shares, active, strict=True))


@pytest.mark.parametrize(
    ("agent_cap", "share", "expected"),
    [
        (None, None, FleetCap(None, OverflowReason.CAPACITY)),
        (5, None, FleetCap(5, OverflowReason.AGENT_LIMIT)),
        (None, 4, FleetCap(4, OverflowReason.NAMESPACE_LIMIT)),
        (5, 4, FleetCap(4, OverflowReason.NAMESPACE_LIMIT)),
        (3, 4, FleetCap(3, OverflowReason.AGENT_LIMIT)),
    ],
)
def test_the_lower_cap_applies(
    agent_cap: int | None, share: int | None, expected: FleetCap
) -> None:
    assert fleet_cap(agent_cap, share) == expected


def test_pod_budgets_add_up_to_the_cap_and_keep_running_calls() -> None:
    reports = {"p1": report(3), "p2": report(0), "p3": report(6)}
    assert pod_budgets(None, reports) == {"p1": 7, "p2": 7, "p3": 7}
    budgets = pod_budgets(12, reports)
    assert sum(budgets.values()) == 12
    assert all(budgets[pod] >= reports[pod].agent_jobs for pod in reports)
    assert budgets == {"p1": 3, "p2": 3, "p3": 6}  # the free calls go where most room is
    # Running calls above the cap are never cut: the budgets just give no more.
    assert pod_budgets(5, reports) == {"p1": 3, "p2": 0, "p3": 6}
    # A cap above what the pods take: each at its capacity.
    assert pod_budgets(100, reports) == {"p1": 7, "p2": 7, "p3": 7}


@given(
    st.integers(min_value=0, max_value=60),
    st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=6),
)
def test_pod_budgets_property(cap: int, running: list[int]) -> None:
    reports = {f"p{i}": report(jobs) for i, jobs in enumerate(running)}
    budgets = pod_budgets(cap, reports)
    assert sum(budgets.values()) == max(sum(running), min(cap, 7 * len(running)))
    assert all(reports[p].agent_jobs <= b <= reports[p].capacity for p, b in budgets.items())


def test_pushes_lower_budgets_first_and_skip_unchanged_ones() -> None:
    reports = {
        "p1": report(1, budget=7),
        "p2": report(0, budget=2, reason=OverflowReason.AGENT_LIMIT),
        "p3": report(0, budget=3, reason=OverflowReason.AGENT_LIMIT),
    }
    updates = push_order({"p1": 2, "p2": 5, "p3": 3}, reports, OverflowReason.AGENT_LIMIT)
    assert [(pod, u.max_agent_jobs, u.limit_reason) for pod, u in updates] == [
        ("p1", 2, OverflowReason.AGENT_LIMIT),
        ("p2", 5, OverflowReason.AGENT_LIMIT),
    ]
