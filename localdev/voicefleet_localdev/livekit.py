"""The local LiveKit stack: Redis, livekit-server, livekit-sip and Prometheus as host processes.

`python -m voicefleet_localdev livekit up|down` (and `make livekit-up|livekit-down`) call `up()` /
`down()`.

Addresses and credentials (fixed, so tests, the demo and pods agree without a lookup):
  Redis           127.0.0.1:6379 (only host processes use it; data under <state>/livekit/redis)
  livekit-server  ws://127.0.0.1:7880 from the host, ws://<host address from pods>:7880 from pods;
                  WebRTC over UDP 50000-50199 and TCP 7881; metrics on :6789
  livekit-sip     SIP on 5060 (UDP and TCP), RTP on UDP 10000-10199, health on :8089, metrics :6790
  Prometheus      http://127.0.0.1:9090 (see prometheus.py)
  API key/secret  DEV_API_KEY / DEV_API_SECRET below: a development pair, never for production.

Every process logs to paths.log_file(<name>), keeps a pid file in <state>/pids and its generated
config in <state>/livekit; `down()` stops exactly the processes those pid files name. Process
handling (pid files with start times, process groups, log tails) is voicefleet_localdev/procs.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from voicefleet_localdev import paths, procs, prometheus
from voicefleet_localdev.procs import ComponentError

if TYPE_CHECKING:
    from livekit import api as livekit_api

DEV_API_KEY = "devkey"
# livekit-server wants secrets of at least 32 characters; this one is public on purpose.
DEV_API_SECRET = "voicefleet-dev-secret-not-for-production-0123456789"

REDIS_PORT = 6379
LIVEKIT_PORT = 7880
LIVEKIT_RTC_TCP_PORT = 7881
LIVEKIT_RTC_UDP_PORTS = (50000, 50199)
LIVEKIT_METRICS_PORT = 6789
SIP_PORT = 5060
SIP_RTP_PORTS = (10000, 10199)
SIP_HEALTH_PORT = 8089
SIP_METRICS_PORT = 6790
S3_PORT = 7070
S3_ACCESS_KEY = "voicefleet-dev"
S3_SECRET_KEY = "voicefleet-dev-s3-secret-not-for-production"
S3_REGION = "us-east-1"

# Start order; `down()` stops in reverse so nothing loses its Redis while it shuts down.
SERVICES = ("redis", "livekit-server", "livekit-sip", "prometheus", "s3")


def config_dir() -> Path:
    return paths.state_dir() / "livekit"


def log_tail(name: str, lines: int = 40) -> str:
    return (
        f"--- last lines of {paths.log_file(name)} ---\n{procs.tail(paths.log_file(name), lines)}"
    )


@dataclass
class Service:
    """One long-running host process of the stack (pid file and log managed by procs)."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    # Rendered only when the process is started (rendering may need the network's state).
    configs: Callable[[], dict[Path, str]] = dict
    start_timeout: float = 60.0
    stop_timeout: float = 15.0
    prepare: Callable[[], None] | None = None
    # Sent before procs.stop's SIGTERM: the servers otherwise wait for calls and participants
    # to leave, which in a disposable test stack only delays `down` until SIGKILL.
    hurry_signal: signal.Signals | None = None
    # Extra environment (e.g. credentials that must not show on the command line).
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> bool:
        """Start unless running; wait until ready. True if this call started the process."""
        if procs.is_running(self.name):
            procs.wait_until(self.name, "ready", self.ready, timeout=self.start_timeout)
            return False
        binary = Path(self.argv[0])
        if not binary.is_file() or not os.access(binary, os.X_OK):
            raise ComponentError(
                self.name,
                f"executable {binary} not found; run `make infra` (builds the pinned "
                "components of localdev/versions.toml and installs the Debian packages)",
            )
        if self.ready():
            raise ComponentError(
                self.name,
                "its port already answers, but not from a process this stack started "
                f"(no live pid file in {paths.pids_dir()}); stop that process (`ss -ltnup` "
                "shows it) or run `make livekit-down` if an older checkout started it",
            )
        if self.prepare:
            self.prepare()
        for path, text in self.configs().items():
            path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only from the first byte: configs carry the API secret.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as config_file:
                config_file.write(text)
            path.chmod(0o600)
        config_dir().mkdir(parents=True, exist_ok=True)
        procs.start(self.name, self.argv, cwd=config_dir(), env=self.env or None)
        try:
            procs.wait_until(self.name, "ready", self.ready, timeout=self.start_timeout)
        except BaseException:
            procs.stop(self.name, timeout=self.stop_timeout)
            raise
        return True

    def stop(self) -> bool:
        """Stop the process named by the pid file and wait for it. True if one was running."""
        pid = procs.pid_of(self.name)
        if pid is not None and self.hurry_signal is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, self.hurry_signal)
            time.sleep(0.2)
        return procs.stop(self.name, timeout=self.stop_timeout)


# --- readiness probes ------------------------------------------------------------------------


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def redis_ping() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --- addresses -------------------------------------------------------------------------------


def node_ip() -> str:
    """The IPv4 address livekit-server puts in its ICE candidates.

    It must be reachable from host processes and from pods. The host's primary address is: pods
    route to it through the bridge gateway and the host delivers it locally. It also exists before
    any cluster does, so the stack can start first. VOICEFLEET_LIVEKIT_NODE_IP overrides it.
    """
    if override := os.environ.get("VOICEFLEET_LIVEKIT_NODE_IP"):
        return override
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # connect() on UDP sends nothing; it only selects the source address of the route.
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2: any routed address
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if address and not address.startswith("127."):
        return address
    from_pods = paths.host_address_for_pods()
    if from_pods:
        return from_pods
    raise ComponentError(
        "livekit-server",
        "no non-loopback IPv4 address for its ICE candidates; set VOICEFLEET_LIVEKIT_NODE_IP "
        "to an address both the host and pods can reach",
    )


@dataclass(frozen=True)
class LiveKitEndpoint:
    """How clients reach the running livekit-server."""

    url: str = f"ws://127.0.0.1:{LIVEKIT_PORT}"
    api_key: str = DEV_API_KEY
    api_secret: str = DEV_API_SECRET

    @property
    def url_for_pods(self) -> str:
        host = paths.host_address_for_pods()
        if host is None:
            raise ComponentError(
                "livekit-server",
                f"no URL for pods: no cluster with a node is up ({paths.cluster_state_file()} "
                "has no hostAddressFromPods); run `make cluster-up` first",
            )
        return f"ws://{host}:{LIVEKIT_PORT}"

    def api(self) -> livekit_api.LiveKitAPI:
        """A livekit-api client; use it as `async with endpoint.api() as lkapi:`."""
        from livekit import api

        return api.LiveKitAPI(url=self.url, api_key=self.api_key, api_secret=self.api_secret)

    async def sip_objects_named(
        self, name: str
    ) -> tuple[list[livekit_api.SIPInboundTrunkInfo], list[livekit_api.SIPDispatchRuleInfo]]:
        """The inbound trunks and dispatch rules called `name`, as livekit-api lists them."""
        from livekit import api

        async with self.api() as lkapi:
            trunks = await lkapi.sip.list_inbound_trunk(api.ListSIPInboundTrunkRequest())
            rules = await lkapi.sip.list_dispatch_rule(api.ListSIPDispatchRuleRequest())
        return (
            [trunk for trunk in trunks.items if trunk.name == name],
            [rule for rule in rules.items if rule.name == name],
        )


@dataclass(frozen=True)
class S3Endpoint:
    """The local S3-compatible server (versitygw): path-style, SigV4, one root user."""

    url: str = f"http://127.0.0.1:{S3_PORT}"
    access_key: str = S3_ACCESS_KEY
    secret_key: str = S3_SECRET_KEY
    region: str = S3_REGION

    def url_for_pods(self) -> str:
        """The endpoint as pods on the node reach it (the host's address on the cluster
        bridge)."""
        return f"http://{node_ip()}:{S3_PORT}"


@dataclass(frozen=True)
class SipEndpoint:
    host: str = "127.0.0.1"
    port: int = SIP_PORT


# --- configs ---------------------------------------------------------------------------------


def redis_config() -> str:
    data = config_dir() / "redis"
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {REDIS_PORT}",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',
            f"dir {data}",
            # Rooms and SIP objects are test state: nothing to keep across restarts.
            'save ""',
            "appendonly no",
            "",
        ]
    )


def livekit_server_config() -> str:
    config = {
        "port": LIVEKIT_PORT,
        # All addresses: the host uses 127.0.0.1, pods use the bridge gateway.
        "bind_addresses": ["0.0.0.0"],
        "redis": {"address": f"127.0.0.1:{REDIS_PORT}"},
        "keys": {DEV_API_KEY: DEV_API_SECRET},
        "rtc": {
            "tcp_port": LIVEKIT_RTC_TCP_PORT,
            "port_range_start": LIVEKIT_RTC_UDP_PORTS[0],
            "port_range_end": LIVEKIT_RTC_UDP_PORTS[1],
            # No STUN lookups (no internet here): advertise one address reachable by all.
            "use_external_ip": False,
            "node_ip": node_ip(),
            # IPv4 only. node_ip rewrites the IPv4 host candidates alone; an IPv6 address on the
            # host (fd00::2 on the CI machine) stayed a candidate, and host clients sometimes
            # picked it, a path pods (IPv4-only) never have. ::/0 does not contain IPv4 addresses.
            "ips": {"excludes": ["::/0"]},
        },
        "prometheus": {"port": LIVEKIT_METRICS_PORT},
        "logging": {"level": "info", "json": False},
    }
    return yaml.safe_dump(config, sort_keys=False)


def livekit_sip_config() -> str:
    config = {
        "api_key": DEV_API_KEY,
        "api_secret": DEV_API_SECRET,
        "ws_url": LiveKitEndpoint().url,
        "redis": {"address": f"127.0.0.1:{REDIS_PORT}"},
        "sip_port": SIP_PORT,
        # Advertise (Contact, SDP c=/o=) the address the stack documents for callers, not the
        # first non-loopback interface livekit-sip finds (its default, pkg/sip/config.go
        # getLocalIP): a caller that can only reach the address it dialled must get that one.
        "nat_1_to_1_ip": SipEndpoint().host,
        "rtp_port": f"{SIP_RTP_PORTS[0]}-{SIP_RTP_PORTS[1]}",
        "health_port": SIP_HEALTH_PORT,
        "prometheus_port": SIP_METRICS_PORT,
        # On a small, busy test machine the default (0.9) makes livekit-sip report itself unhealthy
        # and refuse outbound calls whenever the CPU is saturated (e.g. during builds).
        "max_cpu_utilization": 1.0,
        "logging": {"level": "debug", "json": False},
    }
    return yaml.safe_dump(config, sort_keys=False)


def services() -> dict[str, Service]:
    cfg = config_dir()
    return {
        "redis": Service(
            name="redis",
            argv=["/usr/bin/redis-server", str(cfg / "redis.conf")],
            ready=redis_ping,
            configs=lambda: {cfg / "redis.conf": redis_config()},
            start_timeout=20,
            prepare=lambda: (cfg / "redis").mkdir(parents=True, exist_ok=True),
        ),
        "livekit-server": Service(
            name="livekit-server",
            argv=[
                str(paths.binary("livekit-server")),
                "--config",
                str(cfg / "livekit-server.yaml"),
            ],
            ready=lambda: http_ok(f"http://127.0.0.1:{LIVEKIT_PORT}/"),
            configs=lambda: {cfg / "livekit-server.yaml": livekit_server_config()},
            # A second SIGTERM (from procs.stop) makes livekit-server skip the participant drain.
            hurry_signal=signal.SIGTERM,
        ),
        "livekit-sip": Service(
            name="livekit-sip",
            argv=[str(paths.binary("livekit-sip")), "--config", str(cfg / "livekit-sip.yaml")],
            # Health answers once the service runs; the SIP TCP listener comes up with it.
            ready=lambda: (
                http_ok(f"http://127.0.0.1:{SIP_HEALTH_PORT}/") and tcp_open("127.0.0.1", SIP_PORT)
            ),
            configs=lambda: {cfg / "livekit-sip.yaml": livekit_sip_config()},
            # SIGINT: end active calls now instead of waiting for them to finish.
            hurry_signal=signal.SIGINT,
        ),
        # S3-compatible object storage (versitygw, posix backend: a bucket is a directory).
        "s3": Service(
            name="s3",
            argv=[
                str(paths.binary("versitygw")),
                "--port",
                f":{S3_PORT}",
                "--region",
                S3_REGION,
                "posix",
                str(cfg / "s3"),
            ],
            ready=lambda: tcp_open("127.0.0.1", S3_PORT),
            env={"ROOT_ACCESS_KEY_ID": S3_ACCESS_KEY, "ROOT_SECRET_ACCESS_KEY": S3_SECRET_KEY},
            prepare=lambda: (cfg / "s3").mkdir(parents=True, exist_ok=True),
        ),
        "prometheus": Service(
            name="prometheus",
            argv=prometheus.argv(),
            ready=prometheus.ready,
            configs=lambda: {prometheus.config_file(): prometheus.config_text()},
            prepare=prometheus.prepare,
        ),
    }


# --- the stack -------------------------------------------------------------------------------


@dataclass
class UpResult:
    started: list[str] = field(default_factory=list)
    already_running: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def up(
    names: tuple[str, ...] = SERVICES,
    report: Callable[[str], None] | None = None,
    result: UpResult | None = None,
) -> UpResult:
    """Start every component of `names` that is not running, in order, and wait for each.

    `result` is filled as components start, so a caller can stop them when a later one fails.
    """
    result = result if result is not None else UpResult()
    table = services()
    with _stack_lock():
        _up_locked(names, table, result, report)
    return result


@contextlib.contextmanager
def _stack_lock() -> Iterator[None]:
    """Serialises up/down across processes (several pytest sessions may share the stack)."""
    config_dir().mkdir(parents=True, exist_ok=True)
    with (config_dir() / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _up_locked(
    names: tuple[str, ...],
    table: dict[str, Service],
    result: UpResult,
    report: Callable[[str], None] | None,
) -> None:
    for name in SERVICES:
        if name not in names:
            continue
        began = time.monotonic()
        if table[name].start():
            result.started.append(name)
        else:
            result.already_running.append(name)
        result.seconds[name] = time.monotonic() - began
        if report:
            state = "started" if name in result.started else "already running"
            report(f"{name:15} {state:16} {result.seconds[name]:6.1f} s  {paths.log_file(name)}")


def process_alive(pid: int) -> bool:
    """True while `pid` runs; reaps it first if this process started it (fixtures do)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def down(names: tuple[str, ...] = SERVICES, report: Callable[[str], None] | None = None) -> None:
    """Stop the given components (default all) that pid files name, in reverse start order,
    and wait until each has exited."""
    table = services()
    survivors = []
    with _stack_lock():
        for name in reversed(SERVICES):
            if name not in names:
                continue
            pid = procs.pid_of(name)
            stopped = table[name].stop()
            if pid is not None and process_alive(pid):
                survivors.append(f"{name} (pid {pid})")
            if report:
                report(f"{name:15} {'stopped' if stopped else 'was not running'}")
    if survivors:
        raise ComponentError("livekit stack", f"still running after SIGKILL: {survivors}")


def status() -> dict[str, int | None]:
    return {name: procs.pid_of(name) for name in SERVICES}
