"""The baseline worker: a bare livekit-agents AgentServer whose jobs join the room and do nothing.

    LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... \\
    python -m e2e.bench.bare_agent start --agent-name bench-bare --idle-processes 2 --port 8091

Same process model as the runtime (a main process, a forkserver, warm idle job processes), no
pipeline: what VoiceFleet's runtime costs on top of livekit-agents itself.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from livekit.agents import AgentServer, JobContext, cli


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench.bare_agent")
    parser.add_argument("--agent-name", required=True)
    parser.add_argument("--idle-processes", type=int, default=2)
    parser.add_argument("--port", type=int, default=8091, help="health port (/worker)")
    args, rest = parser.parse_known_args()

    server = AgentServer(num_idle_processes=args.idle_processes, port=args.port)

    @server.rtc_session(agent_name=args.agent_name)
    async def entrypoint(ctx: JobContext) -> None:
        await ctx.connect()
        left = asyncio.Event()
        ctx.room.on("disconnected", lambda *_: left.set())
        await left.wait()

    sys.argv = [sys.argv[0], *rest]
    cli.run_app(server)


if __name__ == "__main__":
    main()
