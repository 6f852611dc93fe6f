"""`make infra`: build the pinned Go components and install the Debian packages.

Go components are built from the Go module proxy with the default GOPATH (~/go), so the module
and build caches are shared with every other Go build on the machine. Modules whose go.mod uses
replace directives to local paths (k8s.io/kubernetes, etcd) cannot be `go install`ed; they are
built from a small wrapper module of ours that requires them and pins each replaced module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from voicefleet_localdev import paths
from voicefleet_localdev.procs import ComponentError, run, tail_text


@dataclass(frozen=True)
class GoRecipe:
    """How to build one component of versions.toml's [go] table."""

    component: str
    binaries: dict[str, str]  # binary name -> main package
    cgo: bool = False
    ldflags: Callable[[str], str] | None = None
    # Build inside the downloaded module itself (its own go.mod, replaces and go.sum apply).
    in_module_dir: bool = False
    tags: tuple[str, ...] = ()
    trimpath: bool = False


def _kubernetes_ldflags(version: str) -> str:
    # Without these the binaries report v0.0.0-master, which kubectl, helm's kubeVersion
    # checks and the node's kubeletVersion would all show.
    major, minor = version.lstrip("v").split(".")[:2]
    fields = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.{name}={value}" for name, value in fields.items()]
    return " ".join(flags)


def _helm_ldflags(version: str) -> str:
    return f"-X helm.sh/helm/v4/internal/version.version={version}"


def recipes() -> list[GoRecipe]:
    go = paths.versions()["go"]
    return [
        GoRecipe(
            "kubernetes",
            {cmd: f"k8s.io/kubernetes/cmd/{cmd}" for cmd in go["kubernetes"]["commands"]},
            ldflags=_kubernetes_ldflags,
        ),
        GoRecipe("etcd", {"etcd": "go.etcd.io/etcd/server/v3"}),
        GoRecipe(
            "livekit-server", {"livekit-server": "github.com/livekit/livekit-server/cmd/server"}
        ),
        # livekit-sip links libopus and libsoxr through cgo. Built inside its module: `go install
        # pkg@version` also asks the proxy for the module's version list (deprecation check),
        # which the proxy refuses (403) for this module, so a cold machine could not build it.
        GoRecipe(
            "livekit-sip",
            {"livekit-sip": "./cmd/livekit-sip"},
            cgo=True,
            in_module_dir=True,
        ),
        GoRecipe(
            "prometheus",
            {"prometheus": go["prometheus"]["package"]},
            in_module_dir=True,
            tags=tuple(go["prometheus"].get("tags", ())),
            trimpath=True,
        ),
        GoRecipe("helm", {"helm": "helm.sh/helm/v4/cmd/helm"}, ldflags=_helm_ldflags),
        GoRecipe("kind", {"kind": "sigs.k8s.io/kind"}),
        # NetworkPolicy enforcement in the local cluster (its firewall controller only).
        GoRecipe(
            "kube-router",
            {"kube-router": "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"},
        ),
        GoRecipe("versitygw", {"versitygw": "github.com/versity/versitygw/cmd/versitygw"}),
    ]


@dataclass
class Row:
    component: str
    version: str
    path: str
    status: str  # built | cached | installed
    seconds: float


@dataclass
class Progress:
    """One compact, rewritten status line on a terminal; a line every 15 s in CI logs."""

    label: str
    interval: float = 15.0
    tty: bool = field(default_factory=lambda: sys.stderr.isatty())
    _last: float = 0.0
    _width: int = field(default_factory=lambda: shutil.get_terminal_size((120, 20)).columns)

    def update(self, text: str, force: bool = False) -> None:
        line = f"  [{self.label}] {text}"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line[: self._width - 1])
            sys.stderr.flush()
        elif force or time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            print(line, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _go_env(cgo: bool) -> dict[str, str]:
    env = dict(os.environ)
    # Same defaults as a plain `go build` on this machine, so the warm caches are reused.
    env.pop("GOFLAGS", None)
    env["CGO_ENABLED"] = "1" if cgo else env.get("CGO_ENABLED", "1")
    return env


def _stream_go(argv: list[str], *, cwd: Path | None, env: dict[str, str], label: str) -> None:
    """Run a go command with -v, showing packages as they compile; raise with the errors."""
    progress = Progress(label)
    started = time.monotonic()
    compiled = downloaded = 0
    output: list[str] = []
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        output.append(line)
        if line.startswith("go: downloading"):
            downloaded += 1
            current = line.removeprefix("go: downloading ")
        elif line.isidentifier() or (" " not in line and "/" in line):
            compiled += 1
            current = line
        else:
            continue
        elapsed = time.monotonic() - started
        progress.update(
            f"{elapsed:5.0f}s  {downloaded} modules downloaded, {compiled} packages compiled  "
            f"{current}"
        )
    code = proc.wait()
    progress.done()
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        raise ComponentError(label, f"`{' '.join(argv)}` failed ({how})", _go_errors(output))


def _go_errors(output: list[str]) -> str:
    """The compiler's messages: from the first `# package` header, else the output's tail."""
    meaningful = [line for line in output if not line.startswith("go: downloading")]
    for i, line in enumerate(meaningful):
        if line.startswith("# ") or ".go:" in line or line.startswith("go: "):
            return tail_text("\n".join(meaningful[i:]), 80)
    return tail_text("\n".join(meaningful), 40)


def _go_binary_name(package: str) -> str:
    """File name go gives a main package's binary: its last path element, skipping a /vN suffix."""
    parts = package.split("/")
    if len(parts) > 1 and re.fullmatch(r"v[0-9]+", parts[-1]):
        return parts[-2]
    return parts[-1]


def _download(module: str, version: str) -> dict[str, str]:
    info = run(["go", "mod", "download", "-json", f"{module}@{version}"], env=_go_env(False))
    return dict(json.loads(info.stdout))


def _module_dir(module: str, version: str) -> Path:
    return Path(_download(module, version)["Dir"])


def _local_replaces(module: str, version: str) -> list[str]:
    """Modules that `module@version`'s go.mod replaces with local directories."""
    gomod = Path(_download(module, version)["GoMod"]).read_text()
    replaced = re.findall(r"^\s*(?:replace\s+)?(\S+)\s+=>\s+(\.\.?/\S+)\s*$", gomod, re.M)
    return [mod for mod, target in replaced if "FORBIDDEN" not in target]


def _wrapper_module(recipe: GoRecipe, module: str, version: str, pin_version: str) -> Path:
    """Directory of our wrapper go.mod for `module`, generated once per pinned version."""
    wrapper = paths.cache_dir() / "gomod" / f"{recipe.component}-{version}"
    replaced = _local_replaces(module, version)
    name = re.sub(r"[^a-z0-9]+", "", recipe.component)
    gomod = [
        f"// Generated by voicefleet_localdev/build.py from localdev/versions.toml; do not edit.\n"
        f"module voicefleet.dev/localdev/build/{name}\n\ngo 1.24.0\n\nrequire {module} {version}\n",
        "replace (",
        *[f"\t{mod} => {mod} {pin_version}" for mod in replaced],
        ")\n",
    ]
    text = "\n".join(gomod)
    stamp = wrapper / "go.mod.generated"
    if stamp.exists() and stamp.read_text() == text and (wrapper / "go.sum").exists():
        return wrapper
    wrapper.mkdir(parents=True, exist_ok=True)
    for stale in ("go.mod", "go.sum"):
        (wrapper / stale).unlink(missing_ok=True)
    (wrapper / "go.mod").write_text(text)
    imports = "\n".join(f'\t_ "{pkg}"' for pkg in recipe.binaries.values())
    (wrapper / "tools.go").write_text(
        f"//go:build tools\n\npackage {name}\n\nimport (\n{imports}\n)\n"
    )
    # `go get` of the main packages records exactly the requirements and sums needed to
    # build them (tidy would also fetch every dependency's test-only modules).
    _stream_go(
        ["go", "get", *[f"{pkg}@{version}" for pkg in recipe.binaries.values()]],
        cwd=wrapper,
        env=_go_env(recipe.cgo),
        label=f"{recipe.component} (resolve)",
    )
    stamp.write_text(text)
    return wrapper


def build_go(recipe: GoRecipe, force: bool = False) -> Row:
    spec = paths.versions()["go"][recipe.component]
    module, version = spec["module"], spec["version"]
    bin_dir = paths.component_dir(recipe.component) / "bin"
    targets = [bin_dir / name for name in recipe.binaries]
    shown_path = str(bin_dir if len(targets) > 1 else targets[0])
    if not force and all(t.exists() for t in targets):
        return Row(recipe.component, version, shown_path, "cached", 0.0)
    print(f"==> building {recipe.component} {version} ({module})", file=sys.stderr, flush=True)
    started = time.monotonic()
    env = _go_env(recipe.cgo)
    flags = ["-ldflags", recipe.ldflags(version)] if recipe.ldflags else []
    if recipe.trimpath:
        flags.insert(0, "-trimpath")
    bin_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="build-", dir=bin_dir.parent))
    try:
        if recipe.in_module_dir:
            env["GOWORK"] = "off"
            tags = ["-tags", ",".join(recipe.tags)] if recipe.tags else []
            _stream_go(
                [
                    "go",
                    "build",
                    "-v",
                    *tags,
                    *flags,
                    "-o",
                    f"{staging}/",
                    *recipe.binaries.values(),
                ],
                cwd=_module_dir(module, version),
                env=env,
                label=recipe.component,
            )
        elif _local_replaces(module, version):
            wrapper = _wrapper_module(recipe, module, version, spec.get("staging_version", version))
            _stream_go(
                [
                    "go",
                    "build",
                    "-v",
                    "-tags",
                    "tools",
                    *flags,
                    "-o",
                    f"{staging}/",
                    *recipe.binaries.values(),
                ],
                cwd=wrapper,
                env=env,
                label=recipe.component,
            )
        else:
            env["GOBIN"] = str(staging)
            _stream_go(
                [
                    "go",
                    "install",
                    "-v",
                    *flags,
                    *[f"{pkg}@{version}" for pkg in recipe.binaries.values()],
                ],
                cwd=None,
                env=env,
                label=recipe.component,
            )
        for name, pkg in recipe.binaries.items():
            source = staging / _go_binary_name(pkg)
            if not source.exists():
                raise ComponentError(recipe.component, f"build produced no binary for {pkg}")
            os.replace(source, bin_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Row(recipe.component, version, shown_path, "built", time.monotonic() - started)


# Representative file of each Debian package, shown in the table.
_DEBIAN_PATHS = {
    "redis-server": "/usr/bin/redis-server",
    "prometheus": "/usr/bin/prometheus",
    "sip-tester": "/usr/bin/sipp",
    "containerd": "/usr/bin/containerd",
    "runc": "/usr/sbin/runc",
    "containernetworking-plugins": "/usr/lib/cni",
    "podman": "/usr/bin/podman",
    "buildah": "/usr/bin/buildah",
    "iptables": "/usr/sbin/iptables",
    "debootstrap": "/usr/sbin/debootstrap",
    "conntrack": "/usr/sbin/conntrack",
    "socat": "/usr/bin/socat",
    "iproute2": "/usr/sbin/ip",
    "nftables": "/usr/sbin/nft",
    "ipset": "/usr/sbin/ipset",
    "espeak-ng": "/usr/bin/espeak-ng",
    "sox": "/usr/bin/sox",
    "pkg-config": "/usr/bin/pkg-config",
}


def _dpkg_versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed version of each package that is fully installed."""
    proc = run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status} ${Version}\n", *packages],
        check=False,
    )
    versions = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == "installed":
            versions[parts[0]] = parts[2]
    return versions


def _apt_lists_present() -> bool:
    return any(Path("/var/lib/apt/lists").glob("*_Packages*"))


def install_debian() -> list[Row]:
    packages: list[str] = paths.versions()["debian"]["packages"]
    installed = _dpkg_versions(packages)
    missing = [p for p in packages if p not in installed]
    started = time.monotonic()
    if missing:
        print(f"==> apt-get install {' '.join(missing)}", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
        if not _apt_lists_present():
            _stream_apt(["apt-get", "update"], env)
        try:
            _stream_apt(install, env)
        except ComponentError:
            # Stale package lists are the usual cause; refresh once and retry.
            _stream_apt(["apt-get", "update"], env)
            _stream_apt(install, env)
        installed = _dpkg_versions(packages)
    elapsed = time.monotonic() - started
    rows = []
    for pkg in packages:
        if pkg not in installed:
            raise ComponentError(pkg, "apt-get did not install it")
        rows.append(
            Row(
                f"{pkg} (deb)",
                installed[pkg],
                _DEBIAN_PATHS.get(pkg, "(library, apt)"),
                "installed" if pkg in missing else "cached",
                elapsed / len(missing) if pkg in missing else 0.0,
            )
        )
    for program, source in paths.versions().get("programs", {}).items():
        # [programs] says which package provides each program the code runs: hold it to that.
        if source.startswith("debian:") and shutil.which(program) is None:
            raise ComponentError(
                source.removeprefix("debian:"),
                f"installed, but `{program}` is not on PATH; "
                "fix [programs] in localdev/versions.toml",
            )
    return rows


def _stream_apt(argv: list[str], env: dict[str, str]) -> None:
    progress = Progress("apt")
    output: list[str] = []
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for raw in proc.stdout:
        output.append(raw.rstrip())
        progress.update(raw.strip())
    code = proc.wait()
    progress.done()
    if code != 0:
        raise ComponentError("apt", f"`{' '.join(argv)}` failed", tail_text("\n".join(output)))


def format_table(rows: list[Row]) -> str:
    header = ("component", "version", "path", "status", "seconds")
    cells = [header] + [
        (r.component, r.version, r.path, r.status, f"{r.seconds:.1f}") for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_all(components: list[str] | None = None, force: bool = False) -> list[Row]:
    """Install Debian packages first (livekit-sip needs the cgo libraries), then Go builds."""
    wanted = set(components) if components else None
    rows: list[Row] = []
    if wanted is None or "debian" in wanted:
        rows += install_debian()
    for recipe in recipes():
        if wanted is None or recipe.component in wanted:
            rows.append(build_go(recipe, force=force))
    return rows
