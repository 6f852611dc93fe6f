"""`make bench`: VoiceFleet's costs against baselines measured in the same run.

  memory     PSS of a runtime worker (main process, forkserver, idle job processes) idle and with
             N calls held, vs a bare livekit-agents AgentServer doing nothing (same process model)
  latency    dispatch to the first audio of the greeting, vs the provider server's own TTS time
             for that greeting (first byte and whole), and dispatch-to-joined vs the bare worker
  reconcile  create VoiceAgent -> reconciled (children applied, status written), vs a bare
             kube-apiserver create + get of a ConfigMap

Needs: livekit-server (started here if not running, stopped again after) and a control plane
(same). Writes <state>/logs/bench.json and prints a table. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from voicefleet_testkit.participant import ParticipantError

from voicefleet_localdev import cluster, paths
from voicefleet_localdev import livekit as stack
from voicefleet_localdev.bench import reconcile, workers
from voicefleet_localdev.procs import CommandError, ComponentError

RESULTS_FILE = paths.logs_dir() / "bench.json"
WORKDIR = paths.state_dir() / "bench"


def say(message: str) -> None:
    print(f"  {message}", flush=True)


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    if "workers" in results:
        w = results["workers"]
        mem, lat = w["memory"], w["latency"]
        ours, base = mem["runtime"], mem["baseline_bare_agentserver"]
        rows += [
            ("idle worker, PSS of all processes (MB)", f"{ours['idle']['pss_total_mb']}",
             f"{base['idle']['pss_total_mb']}", f"{mem['idle_worker_pss_ratio']}x"),
            ("idle worker, main process RSS (MB)", f"{ours['idle']['main_rss_mb']}",
             f"{base['idle']['main_rss_mb']}", f"{mem['idle_main_rss_ratio']}x"),
            (f"per active call, PSS (MB, {w['settings']['active_calls']} calls)",
             f"{ours['per_call_pss_mb']}", f"{base['per_call_pss_mb']}",
             f"{mem['per_call_pss_ratio']}x"),
            ("dispatch -> greeting audio (s, median)",
             f"{lat['runtime_dispatch_to_greeting_median_s']}",
             f"{lat['baseline_provider_tts']['tts_first_byte_s']} (TTS 1st byte)",
             f"{lat['greeting_vs_tts_first_byte_ratio']}x"),
            ("  same, vs whole TTS of the greeting", "",
             f"{lat['baseline_provider_tts']['tts_total_s']} (TTS total)",
             f"{lat['greeting_vs_tts_total_ratio']}x"),
            ("dispatch -> agent joined (s, median)",
             f"{statistics.median(lat['runtime_dispatch_to_joined_s']):.3f}",
             f"{statistics.median(lat['baseline_dispatch_to_joined_s']):.3f}",
             f"{lat['joined_vs_bare_joined_ratio']}x"),
        ]  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_localdev.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", choices=["workers", "reconcile"], action="append")
    parser.add_argument("--calls", type=int, default=3, help="calls held for the memory figure")
    parser.add_argument("--latency-calls", type=int, default=3)
    parser.add_argument("--idle-processes", type=int, default=2)
    parser.add_argument("--voiceagents", type=int, default=10, help="VoiceAgents in the burst")
    args = parser.parse_args(argv)
    wanted = set(args.only or ["workers", "reconcile"])
    started = time.monotonic()
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    stack_started = stack.UpResult()
    cluster_started = False
    try:
        stack.up(("redis", "livekit-server"), result=stack_started)
        if "workers" in wanted:
            print("workers: runtime vs bare AgentServer", flush=True)
            results["workers"] = asyncio.run(
                workers.run(WORKDIR, calls=args.calls, latency_calls=args.latency_calls,
                            idle_processes=args.idle_processes, report=say)
            )  # fmt: skip
        if "reconcile" in wanted:
            print("reconcile: operator vs kube-apiserver round trip", flush=True)
            if cluster.provider().running() is None:
                cluster.up(with_node=False)
                cluster_started = True
            results["reconcile"] = reconcile.run(
                WORKDIR, sequential=5, burst=args.voiceagents, report=say
            )
    except (workers.BenchError, ParticipantError, ComponentError, CommandError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        if cluster_started:
            cluster.down()
        stack.down(tuple(stack_started.started))
    results["total_s"] = round(time.monotonic() - started, 1)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\n{RESULTS_FILE} ({results['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
