"""`python -m voicefleet_localdev ...`: the commands behind `make infra`, `make cluster-up`
and friends.

build [COMPONENT...] [--force]     build/install the pinned components (make infra)
cluster up [--control-plane-only] [--provider auto|local|kind]
cluster down [--node-only]         (make cluster-up / cluster-down)
cluster status                     the running cluster's description and its processes
cluster leftovers                  what a stopped local cluster left behind (exit 1 if any)
images [--no-import]               build images with podman, import into the node (make images)
livekit up|down|status             Redis, livekit-server, livekit-sip, Prometheus, S3
env                                shell exports: KUBECONFIG and PATH with kubectl, helm...
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from voicefleet_localdev import paths, procs
from voicefleet_localdev.procs import ComponentError


def _cmd_build(args: argparse.Namespace) -> int:
    from voicefleet_localdev import build

    started = time.monotonic()
    rows = build.build_all(args.components or None, force=args.force)
    print(build.format_table(rows))
    print(f"total {time.monotonic() - started:.1f}s; cache {paths.cache_dir()}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from voicefleet_localdev import cluster, images

    if args.action == "up":
        started = time.monotonic()
        chosen = cluster.provider(args.provider)
        with cluster.exclusive():
            info = chosen.up(not args.control_plane_only, images.ensure_node_images)
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in getattr(chosen, "timings", {}).items())
        print(
            f"cluster up ({info.provider}, {info.mode}) in {time.monotonic() - started:.1f}s"
            + (f" ({phases})" if phases else "")
        )
        print(f"  kubeconfig  {info.kubeconfig}")
        print(f"  API server  {info.apiServer}")
        if info.hostAddressFromPods:
            print(f"  host address from pods  {info.hostAddressFromPods}")
        print(f"  logs        {paths.logs_dir()}")
        return 0
    if args.action == "down":
        started = time.monotonic()
        cluster.down(node_only=args.node_only, provider_name=args.provider)
        print(f"cluster down in {time.monotonic() - started:.1f}s")
        return 0
    if args.action == "status":
        current = cluster.read_info()
        if current is None:
            print("no cluster")
            return 1
        print(json.dumps(vars(current), indent=2))
        if current.provider == "local":
            for component in cluster.CONTROL_PLANE + cluster.NODE:
                pid = procs.pid_of(component)
                print(f"  {component:24} {'pid ' + str(pid) if pid else 'not running'}")
        return 0
    if args.action == "leftovers":
        found = {kind: items for kind, items in cluster.leftovers().items() if items}
        for kind, items in found.items():
            print(f"{kind}:")
            for item in items:
                print(f"  {item}")
        if not found:
            print("nothing left behind")
        return 1 if found else 0
    raise AssertionError(args.action)


def _cmd_images(args: argparse.Namespace) -> int:
    from voicefleet_localdev import cluster, images

    results = images.build_all(import_into_node=not args.no_import)
    for result in results:
        print(f"  {result.name:55} {result.status:8} {result.seconds:6.1f}s")
    info = cluster.read_info()
    if args.no_import or info is None or not info.has_node:
        print("not imported: no node is running (cluster-up imports every built image)")
    return 0


def _cmd_livekit(args: argparse.Namespace) -> int:
    from voicefleet_localdev import livekit

    if args.action == "up":
        livekit.up(report=print)
    elif args.action == "down":
        livekit.down(report=print)
    else:
        for name, pid in livekit.status().items():
            print(f"  {name:16} {'pid ' + str(pid) if pid else 'not running'}")
    return 0


def _cmd_env(_: argparse.Namespace) -> int:
    bins = [
        paths.component_dir(c) / "bin"
        for c in ("kubernetes", "helm", "kind", "etcd", "livekit-server", "livekit-sip")
    ]
    print(f"export KUBECONFIG={paths.kubeconfig()}")
    print(f'export PATH={":".join(map(str, bins))}:"$PATH"')
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_localdev",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_build = sub.add_parser("build", help="build/install the pinned components")
    p_build.add_argument("components", nargs="*", help="subset, e.g. kubernetes etcd debian")
    p_build.add_argument("--force", action="store_true", help="rebuild even if present")
    p_build.set_defaults(func=_cmd_build)

    p_cluster = sub.add_parser("cluster", help="start/stop the cluster")
    p_cluster.add_argument("action", choices=["up", "down", "status", "leftovers"])
    p_cluster.add_argument("--control-plane-only", action="store_true")
    p_cluster.add_argument("--node-only", action="store_true", help="down: stop just the node")
    p_cluster.add_argument("--provider", default="auto", choices=["auto", "local", "kind"])
    p_cluster.set_defaults(func=_cmd_cluster)

    p_images = sub.add_parser("images", help="build images and import them into the node")
    p_images.add_argument("--no-import", action="store_true")
    p_images.set_defaults(func=_cmd_images)

    p_livekit = sub.add_parser("livekit", help="start/stop the LiveKit stack")
    p_livekit.add_argument("action", choices=["up", "down", "status"])
    p_livekit.set_defaults(func=_cmd_livekit)

    p_env = sub.add_parser("env", help='print shell exports (eval "$(make -s env)")')
    p_env.set_defaults(func=_cmd_env)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ComponentError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    except procs.CommandError as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
