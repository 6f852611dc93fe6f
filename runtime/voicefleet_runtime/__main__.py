"""`python -m voicefleet_runtime start|console|check|download-files|desk`.

  start           run the worker (what the pod runs); SIGTERM drains running calls
  desk            run the platform desk (desk.py; the chart's desk Deployment), no config file
  console         run the same config locally in a terminal (livekit-agents console)
  check           validate the config and the environment it needs, then exit
  download-files  fetch the turn-detector model files (needs network; used by the image build)

The config file is named by VOICEFLEET_CONFIG; secrets come from environment variables. An
invalid config exits with status 2 and one line per bad field, naming the field and the fix.

Order matters here: PROMETHEUS_MULTIPROC_DIR is put into the environment before anything imports
prometheus_client (livekit-agents does, on import). prometheus_client picks its storage when
imported; job processes inherit the environment, and without the directory their metrics
would stay in their own memory, never reaching the main process's /metrics.

The config is pinned at start: `start` and `console` copy the file they validated to a private
path and point VOICEFLEET_CONFIG there, so every job process reads the config the main process
checked. The mounted ConfigMap changes under a running pod (the kubelet refreshes it) long before
a rollout replaces the pod; a job process of an old pod reading the new file would mix configs,
or fail on a secret only the new pods' environment has.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
EXIT_INVALID_CONFIG = 2


def ensure_multiprocess_metrics_dir() -> str:
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        directory = tempfile.mkdtemp(prefix="voicefleet-metrics-")
        os.environ[MULTIPROC_ENV] = directory
    os.makedirs(directory, exist_ok=True)
    return directory


def pin_config(path: str) -> str:
    """A private copy of the config file at `path`, read once; returns the copy's path."""
    with open(path, "rb") as source:
        content = source.read()
    descriptor, pinned = tempfile.mkstemp(prefix="voicefleet-config-", suffix=".yaml")
    with os.fdopen(descriptor, "wb") as copy:
        copy.write(content)
    return pinned


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_runtime",
        description="VoiceFleet runtime: serve a VoiceAgent's calls as a LiveKit agent worker.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("start", help="run the worker (options after it go to livekit-agents)")
    commands.add_parser("console", help="talk to the agent locally (livekit-agents console)")
    check = commands.add_parser("check", help="validate the config and environment, then exit")
    check.add_argument("--config", help="config file (default: $VOICEFLEET_CONFIG)")
    commands.add_parser("download-files", help="download the turn-detector model files")
    commands.add_parser("desk", help="run the platform desk (speaks to callers of sleeping fleets)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    ensure_multiprocess_metrics_dir()

    if args.command == "desk":
        return run_desk()

    if args.command == "download-files":
        from livekit.agents.__main__ import main as livekit_main

        from voicefleet_runtime.pipeline import _import_turn_detector

        _import_turn_detector()
        return livekit_main(["download-files"])

    from voicefleet_runtime.config import CONFIG_PATH_ENV, ConfigError, load_from_environment

    environ = dict(os.environ)
    if getattr(args, "config", None):
        environ[CONFIG_PATH_ENV] = args.config
    where = environ.get(CONFIG_PATH_ENV, "(VOICEFLEET_CONFIG not set)")
    try:
        if args.command in ("start", "console") and environ.get(CONFIG_PATH_ENV):
            # An unreadable file is left to load_from_environment, which names the fix.
            with contextlib.suppress(OSError):
                environ[CONFIG_PATH_ENV] = pin_config(environ[CONFIG_PATH_ENV])
        config = load_from_environment(environ)
    except ConfigError as error:
        details = "\n".join(f"  {line}" for line in str(error).splitlines())
        print(f"voicefleet-runtime: invalid config {where}:\n{details}", file=sys.stderr)
        return EXIT_INVALID_CONFIG

    if args.command == "check":
        agents = ", ".join(agent.name for agent in config.agents)
        print(
            f"config OK: tenant {config.tenant}, VoiceAgent {config.name}, dispatch name "
            f"{config.dispatch_name!r}, agents [{agents}] (entry {config.entry}), "
            f"{len(config.tools)} tools, {len(config.mcp_servers)} MCP servers"
        )
        return 0

    os.environ[CONFIG_PATH_ENV] = environ[CONFIG_PATH_ENV]  # job processes read the pinned copy
    from livekit.agents import cli

    from voicefleet_runtime.worker import build_server

    server = build_server(config)
    if args.command == "console":
        # The console runs the job in a thread; plugins register themselves on import, which
        # livekit-agents allows on the main thread only.
        import importlib

        from voicefleet_runtime.pipeline import plugin_modules

        for module in plugin_modules(config.pipeline):
            importlib.import_module(module)
    # livekit-agents' CLI does the rest: logging, signals, drain on SIGTERM.
    sys.argv = [sys.argv[0], args.command, *passthrough]
    cli.run_app(server)
    return 0


def run_desk() -> int:
    """The platform desk until SIGTERM/SIGINT; settings from the environment (desk.py)."""
    import asyncio
    import logging
    import signal

    from voicefleet_runtime.desk import DeskSettingsError, serve, settings_from_environment

    logging.basicConfig(
        level=os.environ.get("VOICEFLEET_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        url, tts, port = settings_from_environment()
    except DeskSettingsError as error:
        print(f"voicefleet-runtime desk: {error}", file=sys.stderr)
        return EXIT_INVALID_CONFIG

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(url, tts, port, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
