"""`make plot` / `python -m voicefleet_localdev.plot`: turn latency and active calls over time,
as a PNG.

Reads the local stack's Prometheus (or --prometheus URL) over the last --minutes (or
--start/--end, unix seconds) and draws two panels sharing the time axis: the turn latency
(end of the caller's speech to the agent's reply; p50, p95 and the mean over a sliding window,
per agent) and the calls in progress (per agent). The same series as the "Call quality" and
"Fleet overview" dashboards, for when there is no Grafana at hand.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from voicefleet_localdev import paths
from voicefleet_localdev.prometheus import BASE_URL, PrometheusClient, PrometheusError

DEFAULT_OUTPUT = paths.logs_dir() / "voicefleet-calls.png"
MAX_POINTS = 400


@dataclass(frozen=True)
class Line:
    label: str
    times: list[datetime]
    values: list[float]


def _selector(tenant: str | None) -> str:
    return f'{{tenant=~"{tenant}"}}' if tenant else ""


def queries(window: str, tenant: str | None = None) -> dict[str, dict[str, str]]:
    """{panel: {legend suffix: PromQL}}; series are split by tenant and agent."""
    sel = _selector(tenant)
    by = "tenant, agent"
    latency = f"voicefleet_turn_latency_seconds_bucket{sel}"

    def quantile(q: float) -> str:
        # Not str.format: the tenant selector's braces would be taken for fields.
        return f"histogram_quantile({q}, sum by ({by}, le) (rate({latency}[{window}])))"

    return {
        "latency": {
            "p50": quantile(0.5),
            "p95": quantile(0.95),
            "mean": (
                f"sum by ({by}) (rate(voicefleet_turn_latency_seconds_sum{sel}[{window}]))"
                f" / sum by ({by}) (rate(voicefleet_turn_latency_seconds_count{sel}[{window}]))"
            ),
        },
        "calls": {"active": f"sum by ({by}) (voicefleet_active_jobs{sel})"},
    }


def fetch(
    client: PrometheusClient, start: float, end: float, window: str, tenant: str | None = None
) -> dict[str, list[Line]]:
    step = max(5.0, math.ceil((end - start) / MAX_POINTS))
    panels: dict[str, list[Line]] = {}
    for panel, exprs in queries(window, tenant).items():
        lines = panels.setdefault(panel, [])
        for suffix, expr in exprs.items():
            for labels, points in client.query_range(expr, start, end, step):
                name = f"{labels.get('tenant', '?')}/{labels.get('agent', '?')}"
                lines.append(
                    Line(
                        f"{name} {suffix}" if panel == "latency" else name,
                        [datetime.fromtimestamp(t) for t, _ in points],
                        [v for _, v in points],
                    )
                )
    return panels


def render(panels: dict[str, list[Line]], output: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    figure, (latency_axes, calls_axes) = plt.subplots(
        2, 1, sharex=True, figsize=(11, 7), height_ratios=(3, 2), layout="constrained"
    )
    styles = {"p50": "-", "p95": "--", "mean": ":"}
    for line in panels.get("latency", []):
        style = styles.get(line.label.rsplit(" ", 1)[-1], "-")
        latency_axes.plot(line.times, line.values, style, marker=".", label=line.label)
    latency_axes.set_ylabel("turn latency (s)")
    latency_axes.set_ylim(bottom=0)
    latency_axes.set_title("Turn latency: end of the caller's speech to the agent's reply")
    for line in panels.get("calls", []):
        calls_axes.step(line.times, line.values, where="post", label=line.label)
    calls_axes.set_ylabel("active calls")
    peak = max((v for line in panels.get("calls", []) for v in line.values), default=0.0)
    calls_axes.set_ylim(0, max(2.0, peak + 1))  # whole calls, with headroom above the peak
    calls_axes.yaxis.get_major_locator().set_params(integer=True)
    calls_axes.set_title("Calls in progress")
    calls_axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    for axes in (latency_axes, calls_axes):
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="upper left", fontsize="small", ncols=2)
        else:
            axes.text(0.5, 0.5, "no data in this time range", ha="center",
                      transform=axes.transAxes)  # fmt: skip
    figure.suptitle(title)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def plot(
    output: Path = DEFAULT_OUTPUT,
    *,
    start: float | None = None,
    end: float | None = None,
    minutes: float = 30,
    window: str = "1m",
    tenant: str | None = None,
    client: PrometheusClient | None = None,
) -> tuple[Path, dict[str, list[Line]]]:
    """Query and draw; returns the PNG's path and the lines drawn."""
    client = client or PrometheusClient()
    end = end if end is not None else time.time()
    start = start if start is not None else end - minutes * 60
    panels = fetch(client, start, end, window, tenant)
    span = f"{datetime.fromtimestamp(start):%Y-%m-%d %H:%M} to {datetime.fromtimestamp(end):%H:%M}"
    title = f"VoiceFleet {tenant or 'all tenants'}, {span} (from {client.base_url})"
    return render(panels, output, title), panels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_localdev.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", "--out", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--minutes", type=float, default=30, help="time range ending now")
    parser.add_argument(
        "--start", "--since", type=float, help="unix seconds (instead of --minutes)"
    )
    parser.add_argument("--end", type=float, help="unix seconds (default: now)")
    parser.add_argument("--window", default="1m", help="sliding window of the latency quantiles")
    parser.add_argument("--tenant", help="regular expression of tenants (default: all)")
    parser.add_argument("--prometheus", default=BASE_URL)
    args = parser.parse_args(argv)
    try:
        output, panels = plot(
            args.output,
            start=args.start,
            end=args.end,
            minutes=args.minutes,
            window=args.window,
            tenant=args.tenant,
            client=PrometheusClient(args.prometheus),
        )
    except PrometheusError as error:
        print(f"cannot read Prometheus at {args.prometheus} ({error}); is it running? "
              "`make livekit-up` starts the local stack's", file=sys.stderr)  # fmt: skip
        return 1
    counts = {panel: len(lines) for panel, lines in panels.items()}
    print(f"wrote {output} ({counts['latency']} latency lines, {counts['calls']} call lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
