"""`make bench`: VoiceFleet against the agent a team would write without it, same work, one run.

  compare    the VoiceFleet runtime and bench/baseline_agent.py (plain livekit-agents, the same
             plugins, models, options, instructions and greeting) side by side: scripted calls
             alternating between them, then a ramp of concurrent calls; per side p50/p95 of
             dispatch -> joined, dispatch -> greeting, turn latency, idle PSS, PSS per call, CPU
             per call-minute, and calls per core; ratios VoiceFleet / baseline (bench/compare.py)
             Once per provider path: Deepgram + ElevenLabs, then OpenAI STT/TTS.
  reconcile  create VoiceAgent -> reconciled (children applied, status written), vs a bare
             kube-apiserver create + get of a ConfigMap
  scale      100, 300 and 1000 VoiceAgents over 20 namespaces (--sizes, --namespaces): apply,
             all reconciled, operator peak RSS and per VoiceAgent, delete all, API errors and
             leftovers, against the API server's floor (as many bare ConfigMap applies)
             (bench/scale.py). Not run by default: `--only scale` (make bench ONLY=scale).

Needs: livekit-server (started here if not running, stopped again after) and a control plane
(same). Writes <state>/logs/bench.json and prints a table. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from voicefleet_testkit.participant import ParticipantError

from voicefleet_localdev import cluster, leases, paths
from voicefleet_localdev import livekit as stack
from voicefleet_localdev.bench import compare, reconcile, scale, stats, workers
from voicefleet_localdev.procs import CommandError, ComponentError

RESULTS_FILE = paths.logs_dir() / "bench.json"
TABLE_FILE = paths.logs_dir() / "bench.md"
WORKDIR = paths.state_dir() / "bench"


def say(message: str) -> None:
    print(f"  {message}", flush=True)


def table(results: dict[str, Any]) -> str:
    """The reconcile figures as a plain table (the comparison prints its own markdown)."""
    rows: list[tuple[str, str, str, str]] = []
    if "reconcile" in results:
        r = results["reconcile"]
        rows += [
            ("reconcile per VoiceAgent (s, median, one at a time)", f"{r['reconcile_median_s']}",
             f"{r['apiserver_create_get_median_s']} (create+get)",
             f"{r['reconcile_vs_apiserver_ratio']}x"),
            (f"reconcile per VoiceAgent ({r['burst']['voiceagents']} at once)",
             f"{r['burst']['per_voiceagent_s']}", f"{r['apiserver_create_get_median_s']}",
             f"{r['burst']['per_voiceagent_vs_apiserver_ratio']}x"),
        ]  # fmt: skip
    header = ("figure", "VoiceFleet", "baseline", "ratio")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def hold_control_plane() -> bool:
    """Hold the control plane as a test session does (a lease: no other session's teardown
    stops it under the benchmark); start it when none runs. True if started here."""
    with cluster.exclusive():
        leases.hold(leases.TEST_SESSION)
        running = cluster.provider().running()
    if running is not None:
        return False
    cluster.up(with_node=False)
    cluster.record_starter("startedBy", os.getpid())
    return True


def write_partial(results: dict[str, Any]) -> None:
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps({**results, "partial": True}, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_localdev.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", choices=["compare", "reconcile", "scale"], action="append")
    parser.add_argument("--calls", type=int, default=10, help="single calls per side")
    parser.add_argument(
        "--ramp", default="1,2,4,6,8", help="concurrent calls per ramp level, comma-separated"
    )
    parser.add_argument(
        "--providers", choices=compare.PROVIDER_PATHS, action="append",
        help="provider path(s) to run (default: both, one after the other)",
    )  # fmt: skip
    parser.add_argument("--idle-processes", type=int, default=2)
    parser.add_argument("--voiceagents", type=int, default=10, help="VoiceAgents in the burst")
    parser.add_argument(
        "--sizes", default=",".join(map(str, scale.DEFAULT_SIZES)),
        help="scale: VoiceAgents per size, comma-separated",
    )  # fmt: skip
    parser.add_argument("--namespaces", type=int, default=scale.DEFAULT_NAMESPACES)
    parser.add_argument("--parallel", type=int, default=scale.DEFAULT_PARALLEL)
    args = parser.parse_args(argv)
    wanted = set(args.only or ["compare", "reconcile"])
    ramp = [int(level) for level in args.ramp.split(",") if level.strip()]
    started = time.monotonic()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    stack_started = stack.UpResult()
    cluster_started = False
    try:
        stack.up(("redis", "livekit-server"), result=stack_started)
        if "compare" in wanted:
            results["compare"] = {}
            for path in args.providers or compare.PROVIDER_PATHS:
                print(f"compare ({path}): VoiceFleet runtime vs the plain agent", flush=True)
                results["compare"][path] = asyncio.run(
                    compare.run(WORKDIR / path, calls=args.calls, ramp=ramp,
                                idle_processes=args.idle_processes, provider_path=path,
                                report=say)
                )  # fmt: skip
                # Kept as each path ends: a run stopped later still leaves what it measured.
                write_partial(results)
            # The headline ratios: the example's providers when they ran, else the one path.
            first = results["compare"].get("deepgram-elevenlabs") or next(
                iter(results["compare"].values())
            )
            results["ratios"] = first["ratios"]
        if "reconcile" in wanted:
            print("reconcile: operator vs kube-apiserver round trip", flush=True)
            cluster_started = hold_control_plane() or cluster_started
            results["reconcile"] = reconcile.run(
                WORKDIR, sequential=5, burst=args.voiceagents, report=say
            )
        if "scale" in wanted:
            cluster_started = hold_control_plane() or cluster_started
            sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
            results["scale"] = scale.run(
                WORKDIR / "scale", sizes=sizes, namespaces=args.namespaces,
                parallel=args.parallel, report=say,
            )  # fmt: skip
    except (workers.BenchError, ParticipantError, ComponentError, CommandError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        leases.release(leases.TEST_SESSION)
        if cluster_started:
            cluster.down_unless_held(excluding_pid=os.getpid())
        stack.down(tuple(stack_started.started))
    results["total_s"] = round(time.monotonic() - started, 1)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(results, indent=2))
    if "compare" in results:
        markdown = "\n\n".join(
            f"### {path}: {compared['started']}, {compared['machine']['cpus']} CPUs, "
            f"load average {compared['machine']['load_average_before'][0]} -> "
            f"{compared['machine']['load_average_after'][0]}\n\n{stats.markdown_table(compared)}"
            for path, compared in results["compare"].items()
        )
        TABLE_FILE.write_text(markdown + "\n")
        print(f"\n{markdown}\n\n{TABLE_FILE}")
    if "reconcile" in results:
        print()
        print(table(results))
    if "scale" in results:
        print()
        print(scale.table(results["scale"]["sizes"]))
        for size in results["scale"]["sizes"]:
            missed = scale.missed_targets(size)
            if missed:
                print(f"{size['voiceagents']}: misses {'; '.join(missed)}")
    print(f"\n{RESULTS_FILE} ({results['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
