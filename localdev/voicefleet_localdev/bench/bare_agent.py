"""The baseline worker: a bare livekit-agents AgentServer whose jobs join the room and do nothing.

    LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... \\
    python -m voicefleet_localdev.bench.bare_agent start --agent-name bench-bare \
        --idle-processes 2 --port 8091

Same process model as the runtime (a main process, a forkserver, warm idle job processes), no
pipeline: what VoiceFleet's runtime costs on top of livekit-agents itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from livekit.agents import AgentServer, JobContext, cli


async def entrypoint(ctx: JobContext) -> None:
    """Join the room and stay until it goes (module level: job processes unpickle it)."""
    await ctx.connect()
    left = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: left.set())
    await left.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m voicefleet_localdev.bench.bare_agent")
    parser.add_argument("--agent-name", required=True)
    parser.add_argument("--idle-processes", type=int, default=2)
    parser.add_argument("--jobs-per-worker", type=int, default=10)
    parser.add_argument("--port", type=int, default=8091, help="health port (/worker)")
    args, rest = parser.parse_known_args()

    # Load as the runtime reports it (jobs over capacity), not livekit-agents' default of the
    # machine's CPU, which on a busy test machine marks the worker full before any call.
    server = AgentServer(
        num_idle_processes=args.idle_processes,
        port=args.port,
        load_fnc=lambda worker: len(worker.active_jobs) / args.jobs_per_worker,
    )

    server.rtc_session(entrypoint, agent_name=args.agent_name)

    sys.argv = [sys.argv[0], *rest]
    cli.run_app(server)


if __name__ == "__main__":
    main()
