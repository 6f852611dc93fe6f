"""Run the provider servers as a process:
`python -m voicefleet_testkit.providers --host 0.0.0.0 --port 8300`.

Runtime pods reach it through the host's bridge address; tests and the demo script it over
the control API (see server.py). Stops cleanly on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from voicefleet_testkit.providers.server import ProviderServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_testkit.providers", description=__doc__
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8300, help="port to bind (default 8300)")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require requests to carry the bearer key held in this environment variable",
    )
    parser.add_argument("--default-transcript", help="transcript when none is scripted")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: that variable is empty or unset")
    server = ProviderServer(
        args.host, args.port, api_key=api_key, default_transcript=args.default_transcript
    )
    await server.start()
    logging.getLogger("voicefleet_testkit.providers").info(
        "provider servers listening on %s:%d (OpenAI base URL %s, control %s/_control)",
        args.host,
        server.port,
        server.base_url,
        server.url,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
