"""Where the local infrastructure keeps its binaries, state and logs.

Every path is derived here so the Makefile, the CLI and the pytest fixtures agree.
  VOICEFLEET_CACHE  built binaries; survives cluster-down (default ~/.cache/voicefleet)
  VOICEFLEET_STATE  running components' data, pid files, kubeconfig and logs
                    (default ~/.local/state/voicefleet)
"""

from __future__ import annotations

import json
import os
import tomllib
from functools import cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "localdev" / "versions.toml"


def cache_dir() -> Path:
    return Path(os.environ.get("VOICEFLEET_CACHE", Path.home() / ".cache" / "voicefleet"))


def state_dir() -> Path:
    return Path(os.environ.get("VOICEFLEET_STATE", Path.home() / ".local" / "state" / "voicefleet"))


def logs_dir() -> Path:
    return state_dir() / "logs"


def log_file(component: str) -> Path:
    return logs_dir() / f"{component}.log"


def kubeconfig() -> Path:
    """Admin kubeconfig of the running cluster (any provider)."""
    return state_dir() / "kubeconfig"


@cache
def versions() -> dict:
    with VERSIONS_FILE.open("rb") as f:
        return tomllib.load(f)


def component_dir(component: str) -> Path:
    """Install directory of one pinned Go component, e.g. ~/.cache/voicefleet/etcd-v3.6.8."""
    version = versions()["go"][component]["version"]
    return cache_dir() / f"{component}-{version}"


def binary(component: str, name: str | None = None) -> Path:
    """Path of a built binary: binary("kubernetes", "kubelet"), binary("etcd")."""
    return component_dir(component) / "bin" / (name or component)


def cluster_state_file() -> Path:
    """JSON facts about the running cluster, written by cluster-up (e.g. hostAddressFromPods)."""
    return state_dir() / "cluster.json"


def host_address_for_pods() -> str | None:
    """The host's address as pods on the node reach it (the cluster bridge gateway IP).

    None while no cluster with a node is up (cluster-up writes it to cluster.json).
    """
    try:
        facts = json.loads(cluster_state_file().read_text())
    except FileNotFoundError:
        return None
    address = facts.get("hostAddressFromPods")
    return str(address) if address else None


def cluster_dir() -> Path:
    """Data of the local cluster: PKI, etcd, containerd, kubelet (wiped by `cluster down`, but PKI
    and containerd's image store are kept so clients and imported images survive a restart)."""
    return state_dir() / "cluster"


def pids_dir() -> Path:
    return state_dir() / "pids"


def containerd_socket() -> Path:
    """CRI/containerd socket of the local node (`ctr -a <this> -n k8s.io ...`)."""
    return cluster_dir() / "containerd" / "containerd.sock"


def images_dir() -> Path:
    """Built image archives and the locally built base image rootfs."""
    return cache_dir() / "images"
