"""Cluster providers: `local` (upstream binaries as host processes) and `kind`.

`python -m voicefleet_localdev cluster up [--control-plane-only] [--provider local|kind]` /
`cluster down`.
Both write the admin kubeconfig to paths.kubeconfig() and a JSON description of the cluster to
paths.cluster_state_file() (provider, mode, API URL, hostAddressFromPods...).

The local provider, in the manner of Kubernetes' local-up-cluster:
  control plane  etcd (127.0.0.1:2379), kube-apiserver (:6443, TLS from our CA, Node+RBAC,
                 PodSecurity and ResourceQuota admission), kube-controller-manager (service-account
                 tokens, garbage collector...), kube-scheduler
  node           containerd (own root, state and socket under the state dir, runc, CNI bridge
                 plugin, locally built pause image), kubelet (cgroupfs), kube-proxy (nftables),
                 kube-router's firewall controller enforcing NetworkPolicies (iptables + ipset;
                 it allows what the node itself sends to its pods, e.g. kubelet probes)
  network        bridge vfbr0 = 10.244.0.1/24: pods get 10.244.0.x, reach the host at 10.244.0.1
                 (= hostAddressFromPods and the node's InternalIP); the host reaches pod IPs
                 directly. Services: 10.96.0.0/16, `kubernetes` at 10.96.0.1.
`down` kills every process, unmounts kubelet/containerd mounts, deletes pod network namespaces,
the bridge, kube-proxy's nftables tables, any KUBE-/CNI- iptables chains (kube-router's
included) and kube-router's KUBE- ipsets, removes kubelet's
cgroups and restores the sysctls that kubelet and the CNI plugin change. It keeps the PKI (so
kubeconfigs stay valid across restarts) and containerd's image store (so imports survive).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from voicefleet_localdev import leases, paths, pki, procs
from voicefleet_localdev.procs import ComponentError, run

NODE_NAME = "voicefleet-node"
BRIDGE = "vfbr0"
POD_CIDR = "10.244.0.0/24"
GATEWAY_IP = "10.244.0.1"  # host address from pods, node InternalIP, apiserver advertise address
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
APISERVER_PORT = 6443
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
KIND_CLUSTER_NAME = "voicefleet"
SANDBOX_IMAGE = "localhost/voicefleet/pause:3.10"

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
NODE = ("containerd", "kubelet", "kube-proxy", "kube-router")
KUBE_ROUTER_HEALTH_PORT = 20244  # kube-router's default; its /healthz answers once policies sync
# kube-router names its ipsets KUBE-SRC-*/KUBE-DST-* (inet6:KUBE-* for IPv6).
_KUBE_ROUTER_IPSET_PREFIXES = ("KUBE-", "inet6:KUBE-")

# Host sysctls changed by kubelet, the CNI bridge plugin and us; restored by `down`.
_SYSCTLS = (
    "net/ipv4/ip_forward",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


@dataclass
class ClusterInfo:
    provider: str
    mode: str  # "control-plane" | "node"
    kubeconfig: str
    apiServer: str
    hostAddressFromPods: str | None = None
    nodeName: str | None = None
    containerdSocket: str | None = None
    podCIDR: str | None = None
    serviceCIDR: str | None = None
    # Pid of the pytest session whose fixture started the control plane / the node (None when
    # started from the command line): such a cluster is stopped by the last session using it.
    startedBy: int | None = None
    nodeStartedBy: int | None = None

    @property
    def has_node(self) -> bool:
        return self.mode == "node"


def read_info() -> ClusterInfo | None:
    try:
        data = json.loads(paths.cluster_state_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    known = ClusterInfo.__dataclass_fields__
    return ClusterInfo(**{k: v for k, v in data.items() if k in known})


def _write_info(info: ClusterInfo) -> None:
    target = paths.cluster_state_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    tmp.replace(target)


class Provider(Protocol):
    """A way to run the cluster. Each provider owns its node, so it also owns putting images on
    it (as kind's own provider does): image building never branches on the provider."""

    name: str

    def up(self, with_node: bool, prepare_node: NodePreparation | None = None) -> ClusterInfo: ...

    def down(self, node_only: bool = False) -> None: ...

    def running(self) -> ClusterInfo | None: ...

    def images_on_node(self) -> set[str]: ...

    def load_image_archive(self, archive: Path) -> None: ...


# Called once the node's container runtime serves and before workloads run, e.g. to import the
# sandbox image the runtime needs (voicefleet_localdev.images.ensure_node_images).
NodePreparation = Callable[[Provider], None]


# --------------------------------------------------------------------------- helpers


def _bin(name: str) -> Path:
    component = name if name in ("etcd", "kube-router") else "kubernetes"
    path = paths.binary(component, name)
    if not path.exists():
        raise ComponentError(name, f"binary {path} is missing; run `make infra` first")
    return path


def _pki() -> Path:
    return paths.cluster_dir() / "pki"


def _ssl_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(_pki() / "ca.crt"))
    ctx.load_cert_chain(str(_pki() / "admin.crt"), str(_pki() / "admin.key"))
    return ctx


def api_get(path: str, timeout: float = 5.0) -> Any:
    """GET from the local apiserver as cluster admin; parsed JSON, or text for non-JSON."""
    url = f"https://127.0.0.1:{APISERVER_PORT}{path}"
    with urllib.request.urlopen(url, context=_ssl_context(), timeout=timeout) as resp:
        body = resp.read().decode()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, context=context, timeout=3) as resp:
        return bool(resp.status == 200)


def _insecure() -> ssl.SSLContext:
    # Only for /healthz of our own loopback components, whose serving certs are self-signed.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _read_sysctl(key: str) -> str | None:
    try:
        return (Path("/proc/sys") / key).read_text().strip()
    except OSError:
        return None


def _write_sysctl(key: str, value: str) -> None:
    with contextlib.suppress(OSError):
        (Path("/proc/sys") / key).write_text(value)


def _sysctls_file() -> Path:
    return paths.state_dir() / "sysctls-before-cluster.json"


def _original_sysctls() -> dict[str, str]:
    """The host's values before any cluster changed them: recorded by the first `up` and kept
    until a full `down` restores them (cluster.json alone would lose them to a crashed run)."""
    target = _sysctls_file()
    if target.exists():
        return dict(json.loads(target.read_text()))
    values = {k: v for k in _SYSCTLS if (v := _read_sysctl(k)) is not None}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(values, indent=2) + "\n")
    return values


def _mounts_under(prefixes: tuple[str, ...]) -> list[str]:
    """Mount points below any of `prefixes`, deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].encode().decode("unicode_escape")
        if any(mount_point == p or mount_point.startswith(p.rstrip("/") + "/") for p in prefixes):
            found.append(mount_point)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def _unmount_all(prefixes: tuple[str, ...]) -> None:
    for _ in range(3):  # stacked mounts need several passes
        mounts = _mounts_under(prefixes)
        if not mounts:
            return
        for mount_point in mounts:
            if run(["umount", mount_point], check=False).returncode != 0:
                run(["umount", "-l", mount_point], check=False)


NETNS_DIR = Path("/run/netns")


def _pod_netns_mounts() -> list[str]:
    """nsfs mounts of pod network namespaces, including any hidden under a later mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        mount_point = fields[4].encode().decode("unicode_escape")
        fs_type = fields[fields.index("-") + 1]
        if fs_type == "nsfs" and mount_point.startswith(f"{NETNS_DIR}/cni-"):
            found.append(mount_point)
    return found


def _own_netns_peer_group() -> None:
    """Make /run/netns a mount of its own peer group before containerd mounts pods' netns in it.

    Where /run/netns sits on the root filesystem, `ip netns add` bind-mounts it onto itself in the
    root's peer group: every nsfs mount made in it then propagates a copy to the root mount, hidden
    under the bind, which `ip netns delete` cannot remove ("Device or resource busy"). A private
    then shared bind starts a peer group of its own, so nothing propagates."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    if run(["mountpoint", "-q", str(NETNS_DIR)], check=False).returncode != 0:
        run(["mount", "--bind", str(NETNS_DIR), str(NETNS_DIR)])
    run(["mount", "--make-private", str(NETNS_DIR)])
    run(["mount", "--make-shared", str(NETNS_DIR)])


def _unmount_hidden_pod_netns() -> None:
    """Copies of pods' nsfs mounts hidden under /run/netns's bind (see _own_netns_peer_group):
    lift the bind to reach them, then unmount them."""
    if not _pod_netns_mounts():
        return
    for _ in range(3):  # a bind on a bind needs several passes
        if run(["mountpoint", "-q", str(NETNS_DIR)], check=False).returncode != 0:
            break
        run(["umount", "-l", str(NETNS_DIR)], check=False)
    for mount_point in _pod_netns_mounts():
        run(["umount", "-l", mount_point], check=False)
        with contextlib.suppress(OSError):
            Path(mount_point).unlink()


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


# --------------------------------------------------------------------------- local provider


class LocalProvider:
    """Upstream binaries as host processes; see the module docstring."""

    name = "local"

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    # ---- public API

    def running(self) -> ClusterInfo | None:
        info = read_info()
        if info is None or info.provider != self.name:
            return None
        wanted = CONTROL_PLANE + (NODE if info.has_node else ())
        if all(procs.is_running(c) for c in wanted):
            return info
        return None

    def up(self, with_node: bool, prepare_node: NodePreparation | None = None) -> ClusterInfo:
        previous = read_info()
        if (
            previous is None
            or previous.provider != self.name
            or not any(procs.is_running(c) for c in CONTROL_PLANE)
        ):
            # Nothing of ours runs: clear whatever a crashed run left, then start fresh.
            self.down()
            previous = None
        _original_sysctls()  # recorded before kubelet or the CNI plugin change them
        info = ClusterInfo(
            provider=self.name,
            mode="node"
            if with_node or (previous is not None and previous.has_node)
            else "control-plane",
            kubeconfig=str(paths.kubeconfig()),
            apiServer=f"https://127.0.0.1:{APISERVER_PORT}",
            serviceCIDR=SERVICE_CIDR,
            startedBy=previous.startedBy if previous else None,
            nodeStartedBy=previous.nodeStartedBy if previous else None,
        )
        _write_info(info)  # written early so a failed `up` is still cleaned by `down`
        self._prepare_pki()
        self._ensure_bridge()
        began = time.monotonic()
        self._start_control_plane()
        self.timings["control plane ready"] = time.monotonic() - began
        if info.has_node:
            began = time.monotonic()
            self._start_node(prepare_node)
            self.timings["node Ready"] = time.monotonic() - began
            info.hostAddressFromPods = GATEWAY_IP
            info.nodeName = NODE_NAME
            info.containerdSocket = str(paths.containerd_socket())
            info.podCIDR = POD_CIDR
        _write_info(info)
        return info

    def down(self, node_only: bool = False) -> None:
        info = read_info()
        self._stop_node()
        if node_only:
            if info is not None and info.provider == self.name:
                info.mode = "control-plane"
                info.hostAddressFromPods = info.nodeName = info.containerdSocket = None
                info.podCIDR = info.nodeStartedBy = None
                _write_info(info)
            return
        for component in reversed(CONTROL_PLANE):
            procs.stop(component)
        self._kill_strays()
        if _link_exists(BRIDGE):
            run(["ip", "link", "delete", BRIDGE], check=False)
        originals = _sysctls_file()
        if originals.exists():
            for key, value in json.loads(originals.read_text()).items():
                _write_sysctl(key, value)
            originals.unlink()
        base = paths.cluster_dir()
        for transient in ("etcd", "kubelet", "pod-logs", "cni", "configs", "containerd/run"):
            shutil.rmtree(base / transient, ignore_errors=True)
        paths.cluster_state_file().unlink(missing_ok=True)

    # ---- control plane

    def _prepare_pki(self) -> None:
        names = (
            "127.0.0.1",
            "localhost",
            GATEWAY_IP,
            KUBERNETES_SERVICE_IP,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
        identities = [
            pki.Identity("apiserver", "kube-apiserver", server_names=names, client=False),
            pki.Identity("admin", "voicefleet-admin", ("system:masters",)),
            pki.Identity(
                "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
            ),
            pki.Identity("controller-manager", "system:kube-controller-manager"),
            pki.Identity("scheduler", "system:kube-scheduler"),
            pki.Identity("kubelet", f"system:node:{NODE_NAME}", ("system:nodes",)),
            pki.Identity(
                "kubelet-serving",
                NODE_NAME,
                server_names=(NODE_NAME, "localhost", "127.0.0.1", GATEWAY_IP),
                client=False,
            ),
            pki.Identity("kube-proxy", "system:kube-proxy"),
            pki.Identity("kube-router", "system:voicefleet:kube-router"),
        ]
        pki.ensure(_pki(), identities)
        server = f"https://127.0.0.1:{APISERVER_PORT}"
        pki.write_kubeconfig(paths.kubeconfig(), _pki(), "admin", server)
        for ident in ("controller-manager", "scheduler", "kubelet", "kube-proxy", "kube-router"):
            pki.write_kubeconfig(self._kubeconfig(ident), _pki(), ident, server)

    def _kubeconfig(self, identity: str) -> Path:
        return paths.cluster_dir() / "configs" / f"{identity}.kubeconfig"

    def _ensure_bridge(self) -> None:
        """The bridge exists from the start so the apiserver can advertise its address."""
        if not _link_exists(BRIDGE):
            run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        addresses = run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE]).stdout
        if f" {GATEWAY_IP}/" not in addresses:
            run(["ip", "addr", "add", f"{GATEWAY_IP}/24", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])

    def _start_control_plane(self) -> None:
        base = paths.cluster_dir()
        p = _pki()
        if not procs.is_running("etcd"):
            procs.start(
                "etcd",
                [
                    _bin("etcd"),
                    "--name",
                    "voicefleet",
                    "--data-dir",
                    base / "etcd",
                    "--listen-client-urls",
                    f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
                    "--advertise-client-urls",
                    f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
                    "--listen-peer-urls",
                    f"http://127.0.0.1:{ETCD_PEER_PORT}",
                    "--initial-advertise-peer-urls",
                    f"http://127.0.0.1:{ETCD_PEER_PORT}",
                    "--initial-cluster",
                    f"voicefleet=http://127.0.0.1:{ETCD_PEER_PORT}",
                    "--listen-metrics-urls",
                    "http://127.0.0.1:2381",
                    # A throwaway test cluster: durability is not worth the fsync latency.
                    "--unsafe-no-fsync",
                    "--log-level",
                    "warn",
                ],
            )
        procs.wait_until(
            "etcd",
            "healthy",
            lambda: _http_ok(f"http://127.0.0.1:{ETCD_CLIENT_PORT}/health"),
            timeout=30,
        )
        if not procs.is_running("kube-apiserver"):
            procs.start(
                "kube-apiserver",
                [
                    _bin("kube-apiserver"),
                    f"--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}",
                    "--bind-address=0.0.0.0",
                    f"--secure-port={APISERVER_PORT}",
                    f"--advertise-address={GATEWAY_IP}",
                    f"--tls-cert-file={p / 'apiserver.crt'}",
                    f"--tls-private-key-file={p / 'apiserver.key'}",
                    f"--client-ca-file={p / 'ca.crt'}",
                    f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                    f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                    f"--kubelet-certificate-authority={p / 'ca.crt'}",
                    "--kubelet-preferred-address-types=InternalIP,Hostname",
                    f"--service-account-key-file={p / 'sa.pub'}",
                    f"--service-account-signing-key-file={p / 'sa.key'}",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--authorization-mode=Node,RBAC",
                    "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,"
                    "NodeRestriction,PodSecurity,ResourceQuota,DefaultTolerationSeconds,"
                    "MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                    "--allow-privileged=true",
                    "--profiling=false",
                    "--v=1",
                ],
            )
        procs.wait_until(
            "kube-apiserver",
            "ready (/readyz)",
            lambda: api_get("/readyz") == "ok",
            timeout=90,
        )
        if not procs.is_running("kube-controller-manager"):
            kubeconfig = self._kubeconfig("controller-manager")
            procs.start(
                "kube-controller-manager",
                [
                    _bin("kube-controller-manager"),
                    f"--kubeconfig={kubeconfig}",
                    f"--authentication-kubeconfig={kubeconfig}",
                    f"--authorization-kubeconfig={kubeconfig}",
                    f"--service-account-private-key-file={p / 'sa.key'}",
                    f"--root-ca-file={p / 'ca.crt'}",
                    f"--cluster-signing-cert-file={p / 'ca.crt'}",
                    f"--cluster-signing-key-file={p / 'ca.key'}",
                    "--use-service-account-credentials=true",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--v=1",
                ],
            )
        if not procs.is_running("kube-scheduler"):
            kubeconfig = self._kubeconfig("scheduler")
            procs.start(
                "kube-scheduler",
                [
                    _bin("kube-scheduler"),
                    f"--kubeconfig={kubeconfig}",
                    f"--authentication-kubeconfig={kubeconfig}",
                    f"--authorization-kubeconfig={kubeconfig}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--v=1",
                ],
            )
        procs.wait_until(
            "kube-controller-manager",
            "healthy",
            lambda: _http_ok("https://127.0.0.1:10257/healthz", _insecure()),
            timeout=60,
        )
        procs.wait_until(
            "kube-scheduler",
            "healthy",
            lambda: _http_ok("https://127.0.0.1:10259/healthz", _insecure()),
            timeout=60,
        )
        # Pods and most clients need the default ServiceAccount, made by the controller-manager.
        procs.wait_until(
            "kube-controller-manager",
            "creating the default ServiceAccount",
            lambda: bool(api_get("/api/v1/namespaces/default/serviceaccounts/default")),
            timeout=60,
        )

    # ---- node

    def _containerd_config(self) -> str:
        base = paths.cluster_dir()
        return f"""\
version = 2
root = "{base / "containerd" / "root"}"
state = "{base / "containerd" / "run"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{paths.containerd_socket()}"

[ttrpc]
  address = "{paths.containerd_socket()}.ttrpc"

[debug]
  level = "warn"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{SANDBOX_IMAGE}"
  enable_selinux = false
  # Without CAP_SYS_RESOURCE (this host) runc cannot set the negative oom_score_adj kubelet
  # asks for sandboxes (-998) and Guaranteed pods; clamp it at containerd's own value instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{base / "cni" / "net.d"}"
"""

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "0.4.0",
            "name": "voicefleet",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    # Pods only talk to the host and each other: no masquerading rules needed.
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(paths.cluster_dir() / "cni" / "ipam"),
                    },
                },
                {"type": "loopback"},
            ],
        }

    def _kubelet_config(self) -> dict[str, Any]:
        p = _pki()
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(p / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(p / "kubelet-serving.crt"),
            "tlsPrivateKeyFile": str(p / "kubelet-serving.key"),
            "address": GATEWAY_IP,
            "healthzBindAddress": "127.0.0.1",
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{paths.containerd_socket()}",
            "podLogsDir": str(paths.cluster_dir() / "pod-logs"),
            # This host is a VM/container: swap may exist, cgroup v1, kernel defaults vary.
            "failSwapOn": False,
            "failCgroupV1": False,
            "protectKernelDefaults": False,
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "serializeImagePulls": False,
            # Never evict test pods because the shared disk is fuller than the defaults allow.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 99,
            "imageGCLowThresholdPercent": 98,
            "oomScoreAdj": 0,  # -999 (the default) needs CAP_SYS_RESOURCE
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "maxPods": 110,
        }

    def _kube_proxy_config(self) -> dict[str, Any]:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self._kubeconfig("kube-proxy"))},
            "hostnameOverride": NODE_NAME,
            # nftables mode keeps all its rules in its own tables: clean to remove.
            "mode": "nftables",
            "clusterCIDR": POD_CIDR,
            "bindAddress": "0.0.0.0",
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            "nodePortAddresses": [f"{GATEWAY_IP}/32"],
            "oomScoreAdj": 0,  # -999 (the default) needs CAP_SYS_RESOURCE
            # Leave the host's conntrack sysctls alone (they may be read-only here anyway).
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }

    def _start_node(self, prepare_node: NodePreparation | None) -> None:
        base = paths.cluster_dir()
        configs = base / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        # ip_forward: Service traffic DNAT-ed back onto the bridge is routed, not bridged.
        _write_sysctl("net/ipv4/ip_forward", "1")
        if not procs.is_running("containerd"):
            (configs / "containerd.toml").write_text(self._containerd_config())
            cni_dir = base / "cni" / "net.d"
            cni_dir.mkdir(parents=True, exist_ok=True)
            (cni_dir / "10-voicefleet.conflist").write_text(
                json.dumps(self._cni_config(), indent=2)
            )
            paths.containerd_socket().parent.mkdir(parents=True, exist_ok=True)
            _own_netns_peer_group()
            procs.start("containerd", ["containerd", "--config", configs / "containerd.toml"])
        procs.wait_until(
            "containerd",
            "serving its socket",
            lambda: (
                run(
                    ["ctr", "-a", paths.containerd_socket(), "version"], check=False, timeout=5
                ).returncode
                == 0
            ),
            timeout=30,
        )
        if prepare_node is not None:
            try:
                prepare_node(self)
            except Exception as exc:
                raise ComponentError(
                    "images", f"could not provide the node's images: {exc}"
                ) from exc
        if not procs.is_running("kubelet"):
            (configs / "kubelet.yaml").write_text(yaml.safe_dump(self._kubelet_config()))
            procs.start(
                "kubelet",
                [
                    _bin("kubelet"),
                    f"--config={configs / 'kubelet.yaml'}",
                    f"--kubeconfig={self._kubeconfig('kubelet')}",
                    f"--root-dir={base / 'kubelet'}",
                    f"--hostname-override={NODE_NAME}",
                    f"--node-ip={GATEWAY_IP}",
                    "--v=1",
                ],
            )
        if not procs.is_running("kube-proxy"):
            (configs / "kube-proxy.yaml").write_text(yaml.safe_dump(self._kube_proxy_config()))
            procs.start(
                "kube-proxy",
                [
                    _bin("kube-proxy"),
                    f"--config={configs / 'kube-proxy.yaml'}",
                    "--v=1",
                ],
            )
        procs.wait_until(
            "kubelet", f"registering node {NODE_NAME} as Ready", _node_ready, timeout=120
        )
        procs.wait_until(
            "kube-proxy",
            "healthy",
            lambda: _http_ok("http://127.0.0.1:10256/healthz"),
            timeout=60,
        )
        self._start_kube_router()

    def _start_kube_router(self) -> None:
        """NetworkPolicy enforcement: kube-router with only its firewall controller.

        It reads pods, namespaces and NetworkPolicies (RBAC below) and keeps, in the iptables
        filter table, a chain per local pod that a policy selects (KUBE-POD-FW-*, jumped to from
        FORWARD/INPUT/OUTPUT, also for bridged traffic through physdev) and ipsets of the peers
        each policy admits; traffic from the node's own addresses to its pods is always allowed
        (kubelet probes, host processes such as the local Prometheus). Started after the node
        is Ready: it needs the node's InternalIP to tell local pods.
        """
        if procs.is_running("kube-router"):
            return
        _api_apply(
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/voicefleet:kube-router",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "voicefleet:kube-router"},
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
                        "verbs": ["get", "list", "watch"],
                    },
                    {
                        "apiGroups": ["networking.k8s.io"],
                        "resources": ["networkpolicies"],
                        "verbs": ["get", "list", "watch"],
                    },
                    {
                        "apiGroups": ["discovery.k8s.io"],
                        "resources": ["endpointslices"],
                        "verbs": ["get", "list", "watch"],
                    },
                    {
                        "apiGroups": ["", "events.k8s.io"],
                        "resources": ["events"],
                        "verbs": ["create", "patch"],
                    },
                ],
            },
        )
        _api_apply(
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/voicefleet:kube-router",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "voicefleet:kube-router"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "voicefleet:kube-router",
                },
                "subjects": [
                    {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "User",
                        "name": "system:voicefleet:kube-router",
                    }
                ],
            },
        )
        procs.start(
            "kube-router",
            [
                _bin("kube-router"),
                f"--kubeconfig={self._kubeconfig('kube-router')}",
                f"--hostname-override={NODE_NAME}",
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                "--enable-cni=false",
                "--enable-ipv6=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--health-port={KUBE_ROUTER_HEALTH_PORT}",
                "--metrics-port=0",
                "--v=1",
            ],
        )
        procs.wait_until(
            "kube-router",
            "enforcing NetworkPolicies",
            lambda: _http_ok(f"http://127.0.0.1:{KUBE_ROUTER_HEALTH_PORT}/healthz"),
            timeout=60,
        )

    def _ctr(self, *args: str) -> list[str]:
        return ["ctr", "-a", str(paths.containerd_socket()), "-n", "k8s.io", *args]

    def images_on_node(self) -> set[str]:
        return set(run(self._ctr("images", "ls", "-q"), timeout=30).stdout.split())

    def load_image_archive(self, archive: Path) -> None:
        run(self._ctr("images", "import", str(archive)), timeout=1800)

    def _stop_node(self) -> None:
        for component in ("kube-router", "kube-proxy", "kubelet"):
            procs.stop(component)
        self._stop_containers()
        procs.stop("containerd")
        for socket in (paths.containerd_socket(), Path(f"{paths.containerd_socket()}.ttrpc")):
            socket.unlink(missing_ok=True)
        # Shims and container processes outlive containerd; kill what is left of them.
        shims = procs.pids_matching(
            lambda argv: "containerd-shim" in argv[0] and str(paths.containerd_socket()) in argv
        )
        procs.terminate_pids(shims, timeout=5)
        _kill_cgroup_tree("kubepods")
        _unmount_all((str(paths.cluster_dir()),))
        self._delete_pod_netns()
        run(["nft", "delete", "table", "ip", "kube-proxy"], check=False)
        run(["nft", "delete", "table", "ip6", "kube-proxy"], check=False)
        for tool in ("iptables", "ip6tables"):
            _flush_chains(tool, ("KUBE-", "CNI-"))
        # kube-router leaves its ipsets on exit; no rule references them once the chains are gone.
        for name in _kube_router_ipsets():
            run(["ipset", "destroy", name], check=False)
        _remove_cgroup_tree("kubepods")
        # Veths die with their namespaces; drop any the CNI plugin left attached to the bridge.
        for link in Path("/sys/class/net").glob("veth*"):
            if (link / "master").resolve().name == BRIDGE:
                run(["ip", "link", "delete", link.name], check=False)
        shutil.rmtree(paths.cluster_dir() / "kubelet", ignore_errors=True)
        shutil.rmtree(paths.cluster_dir() / "cni" / "ipam", ignore_errors=True)

    def _stop_containers(self) -> None:
        """Kill and delete every container through containerd, so its shims exit cleanly."""
        if not procs.is_running("containerd"):
            return
        ctr = ["ctr", "-a", str(paths.containerd_socket()), "-n", "k8s.io"]
        tasks = run([*ctr, "tasks", "ls", "-q"], check=False, timeout=15).stdout.split()
        for task in tasks:
            run([*ctr, "tasks", "kill", "-s", "SIGKILL", task], check=False, timeout=15)
        for task in tasks:
            run([*ctr, "tasks", "delete", "-f", task], check=False, timeout=30)
        containers = run([*ctr, "containers", "ls", "-q"], check=False, timeout=15).stdout.split()
        if containers:
            run([*ctr, "containers", "rm", *containers], check=False, timeout=30)

    def _delete_pod_netns(self) -> None:
        """Network namespaces containerd made for pods (/run/netns/cni-*), with their veths."""
        for ns in Path("/run/netns").glob("cni-*"):
            inside = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
            procs.terminate_pids([int(pid) for pid in inside if pid.isdigit()], timeout=5)
            if run(["ip", "netns", "delete", ns.name], check=False).returncode != 0:
                run(["umount", "-l", str(ns)], check=False)
                with contextlib.suppress(OSError):
                    ns.unlink()
        _unmount_hidden_pod_netns()

    def _kill_strays(self) -> None:
        """Any process still running one of our binaries or using our state dir."""
        markers = (
            str(paths.cluster_dir()),
            str(paths.component_dir("kubernetes")),
            str(paths.component_dir("etcd")),
            str(paths.component_dir("kube-router")),
        )
        strays = procs.pids_matching(lambda argv: any(m in a for a in argv for m in markers))
        procs.terminate_pids(strays, timeout=5)


def pod_processes(pod_uid: str, command: str) -> list[int]:
    """The host PIDs of a pod's container processes whose command line contains `command`. The
    local provider's node is this host: the kubelet (cgroupfs) puts each pod's containers in
    cgroups named pod<uid>. For tests that crash or freeze a pod's process on the node."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"pod{pod_uid}" not in (proc / "cgroup").read_text():
                continue
            if command in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(proc.name))
        except OSError:
            continue  # exited meanwhile
    return pids


def _api_apply(path: str, body: dict[str, Any]) -> None:
    """Server-side apply of one object as cluster admin (our own bootstrap objects)."""
    url = f"https://127.0.0.1:{APISERVER_PORT}{path}?fieldManager=voicefleet-localdev&force=true"
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="PATCH",
        headers={"Content-Type": "application/apply-patch+yaml"},
    )
    with urllib.request.urlopen(request, context=_ssl_context(), timeout=10) as resp:
        resp.read()


def _kube_router_ipsets() -> list[str]:
    if shutil.which("ipset") is None:
        return []
    names = run(["ipset", "list", "-n"], check=False).stdout.split()
    return [n for n in names if n.startswith(_KUBE_ROUTER_IPSET_PREFIXES)]


def _node_ready() -> bool:
    node = api_get(f"/api/v1/nodes/{NODE_NAME}")
    conditions = node.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _cgroup_roots(name: str) -> list[Path]:
    return [h / name for h in Path("/sys/fs/cgroup").iterdir() if (h / name).is_dir()]


def _kill_cgroup_tree(name: str) -> None:
    """SIGKILL every process in the `name` cgroup subtree of every v1 hierarchy."""
    for _ in range(10):
        pids: set[int] = set()
        for root in _cgroup_roots(name):
            for procs_file in root.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in procs_file.read_text().split())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)
        time.sleep(0.2)


def _remove_cgroup_tree(name: str) -> None:
    for root in _cgroup_roots(name):
        for directory in sorted(
            (d for d in root.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def _flush_chains(tool: str, prefixes: tuple[str, ...]) -> None:
    """Delete jumps into chains named with `prefixes`, then those chains, in every table."""
    if shutil.which(f"{tool}-save") is None:
        return
    dump = run([f"{tool}-save"], check=False).stdout
    table = ""
    rules: list[tuple[str, list[str]]] = []
    chains: list[tuple[str, str]] = []
    for line in dump.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chain = line[1:].split()[0]
            if chain.startswith(prefixes):
                chains.append((table, chain))
        elif line.startswith("-A "):
            words = shlex.split(line)
            chain = words[1]
            target = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-j", "-g")), "")
            if not chain.startswith(prefixes) and target.startswith(prefixes):
                rules.append((table, ["-D", *words[1:]]))
    for table, rule in rules:
        run([tool, "-w", "-t", table, *rule], check=False)
    for table, chain in chains:
        run([tool, "-w", "-t", table, "-F", chain], check=False)
    for table, chain in chains:
        run([tool, "-w", "-t", table, "-X", chain], check=False)


# --------------------------------------------------------------------------- kind provider


class KindProvider:
    """A kind cluster (Docker engine with image pulls). Not exercised on machines without one."""

    name = "kind"

    def _kind(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = paths.binary("kind")
        if not binary.exists():
            raise ComponentError("kind", f"binary {binary} is missing; run `make infra` first")
        return run([binary, *args], check=check)

    def running(self) -> ClusterInfo | None:
        info = read_info()
        if info is None or info.provider != self.name:
            return None
        clusters = self._kind("get", "clusters", check=False).stdout.split()
        return info if KIND_CLUSTER_NAME in clusters else None

    def up(self, with_node: bool, prepare_node: NodePreparation | None = None) -> ClusterInfo:
        # A kind cluster always has its node; control-plane-only asks for less, so it is served.
        existing = self.running()
        if existing is not None:
            return existing
        self._kind(
            "create",
            "cluster",
            "--name",
            KIND_CLUSTER_NAME,
            "--kubeconfig",
            str(paths.kubeconfig()),
            "--wait",
            "120s",
        )
        gateway = run(
            [
                "docker",
                "network",
                "inspect",
                "kind",
                "--format",
                "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
            ],
            check=False,
        ).stdout.split()
        ipv4 = [g for g in gateway if "." in g]
        info = ClusterInfo(
            provider=self.name,
            mode="node",
            kubeconfig=str(paths.kubeconfig()),
            apiServer=_server_of(paths.kubeconfig()),
            hostAddressFromPods=ipv4[0] if ipv4 else None,
            nodeName=f"{KIND_CLUSTER_NAME}-control-plane",
        )
        _write_info(info)
        if prepare_node is not None:
            prepare_node(self)
        return info

    def down(self, node_only: bool = False) -> None:
        if node_only:
            return  # the kind node is the control plane; nothing to stop separately
        if paths.binary("kind").exists():
            self._kind(
                "delete",
                "cluster",
                "--name",
                KIND_CLUSTER_NAME,
                "--kubeconfig",
                str(paths.kubeconfig()),
                check=False,
            )
        paths.cluster_state_file().unlink(missing_ok=True)

    def images_on_node(self) -> set[str]:
        node = f"{KIND_CLUSTER_NAME}-control-plane"
        listed = run(["docker", "exec", node, "ctr", "-n", "k8s.io", "images", "ls", "-q"])
        return set(listed.stdout.split())

    def load_image_archive(self, archive: Path) -> None:
        self._kind("load", "image-archive", str(archive), "--name", KIND_CLUSTER_NAME)


def _server_of(kubeconfig: Path) -> str:
    config = yaml.safe_load(kubeconfig.read_text())
    return str(config["clusters"][0]["cluster"]["server"])


# --------------------------------------------------------------------------- selection


def docker_can_pull() -> bool:
    """True where a Docker engine answers and can pull images (kind needs both)."""
    if shutil.which("docker") is None:
        return False
    try:
        if run(["docker", "info"], check=False, timeout=10).returncode != 0:
            return False
        pulled = run(["docker", "pull", "-q", "busybox:stable"], check=False, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return pulled.returncode == 0


def provider(name: str = "auto") -> Provider:
    """`local`, `kind`, or `auto`: the running cluster's provider, else kind where Docker can
    pull, else local. VOICEFLEET_CLUSTER_PROVIDER overrides `auto`."""
    if name == "auto":
        name = os.environ.get("VOICEFLEET_CLUSTER_PROVIDER", "auto")
    if name == "auto":
        info = read_info()
        if info is not None:
            name = info.provider
        else:
            name = "kind" if docker_can_pull() else "local"
    if name == "local":
        return LocalProvider()
    if name == "kind":
        return KindProvider()
    raise ValueError(f"unknown cluster provider {name!r}: use local, kind or auto")


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Serialise up/down between processes (several test sessions may share one cluster)."""
    lock = paths.state_dir() / "cluster.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def up(
    with_node: bool = True,
    provider_name: str = "auto",
    prepare_node: NodePreparation | None = None,
) -> ClusterInfo:
    """Start (or reuse) the cluster; `prepare_node` runs on a node this call starts."""
    with exclusive():
        return provider(provider_name).up(with_node, prepare_node)


def down(node_only: bool = False, provider_name: str = "auto") -> None:
    with exclusive():
        provider(provider_name).down(node_only)


def down_unless_held(node_only: bool = False, *, excluding_pid: int) -> list[leases.Holder]:
    """Stop the cluster (or only its node) unless another process holds a lease on it, and
    return those holders. Checked and done under the cluster lock, which a test session also
    holds while it takes its lease and looks for a running cluster: nobody finds the cluster
    running and then loses it."""
    with exclusive():
        held = leases.holders(excluding_pid=excluding_pid)
        if not held:
            provider().down(node_only)
        return held


def record_starter(field: str, pid: int | None) -> None:
    """Note which test session started the control plane ("startedBy") or node."""
    with exclusive():
        info = read_info()
        if info is not None:
            setattr(info, field, pid)
            _write_info(info)


def leftovers() -> dict[str, list[str]]:
    """What a local cluster could leave behind; all lists are empty after a clean `down`."""
    markers = (
        str(paths.cluster_dir()),
        str(paths.component_dir("kubernetes")),
        str(paths.component_dir("etcd")),
        str(paths.component_dir("kube-router")),
    )
    processes = [
        " ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0"))
        for pid in procs.pids_matching(
            lambda argv: (
                any(m in a for a in argv for m in markers)
                or (
                    "containerd" in argv[0]
                    and any(str(paths.containerd_socket()) in a for a in argv)
                )
            )
        )
    ]
    mounts = _mounts_under((str(paths.cluster_dir()),)) + sorted(
        {*_pod_netns_mounts(), *(str(p) for p in NETNS_DIR.glob("cni-*"))}
    )
    interfaces = [
        link.name
        for link in Path("/sys/class/net").iterdir()
        if link.name == BRIDGE
        or ((link / "master").exists() and (link / "master").resolve().name == BRIDGE)
    ]
    rules = []
    for tool in ("iptables", "ip6tables"):
        if shutil.which(f"{tool}-save"):
            dump = run([f"{tool}-save"], check=False).stdout
            rules += [
                f"{tool}: {line}" for line in dump.splitlines() if "KUBE-" in line or "CNI-" in line
            ]
    tables = run(["nft", "list", "tables"], check=False).stdout
    rules += [f"nft: {line}" for line in tables.splitlines() if "kube-proxy" in line]
    rules += [f"ipset: {name}" for name in _kube_router_ipsets()]
    cgroups = [str(p) for p in _cgroup_roots("kubepods")]
    return {
        "processes": processes,
        "mounts": mounts,
        "interfaces": interfaces,
        "rules": rules,
        "cgroups": cgroups,
    }
