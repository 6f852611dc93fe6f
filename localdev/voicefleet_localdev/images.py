"""Container images without a registry: built with podman, imported into the node's containerd.

  pause        the sandbox image containerd is configured with (static C binary, FROM scratch)
  testserver   a tiny static Go HTTP server for the cluster tests (FROM scratch)
  base         python:3.11-slim-bookworm; pulled when a registry is reachable, otherwise built
               from Debian packages (debootstrap bookworm minbase + python3) and imported into
               podman under the same name, so Dockerfiles stay unchanged
  operator, runtime   the project's Dockerfiles (whichever exist), context = repository root,
               built with `--build-arg BASE_IMAGE=...`

Each image carries a label with the hash of its sources; an image whose label matches is not
rebuilt. Images are imported into containerd (`ctr -n k8s.io images import`) when a local node
runs, or loaded into kind; cluster-up imports everything already built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from voicefleet_localdev import cluster, paths, procs
from voicefleet_localdev.cluster import SANDBOX_IMAGE, Provider
from voicefleet_localdev.procs import ComponentError, run

IMAGES_SRC = paths.REPO_ROOT / "localdev" / "images"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "docker.io/library/python:3.11-slim-bookworm")
TESTSERVER_IMAGE = "localhost/voicefleet/testserver:v1"
PROJECT_TAG = os.environ.get("VOICEFLEET_IMAGE_TAG", "dev")
PROJECT_IMAGES = {
    "operator": f"localhost/voicefleet/operator:{PROJECT_TAG}",
    "runtime": f"localhost/voicefleet/runtime:{PROJECT_TAG}",
}
SOURCE_LABEL = "dev.voicefleet.source-hash"
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")


@dataclass
class ImageResult:
    name: str
    status: str  # built | cached | pulled | missing
    seconds: float


def _log(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def _hash_files(files: list[Path], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for file in sorted(files):
        digest.update(str(file.relative_to(paths.REPO_ROOT)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def podman_label(image: str, label: str) -> str | None:
    """A label of a podman image, "" when unlabelled, None when the image does not exist."""
    proc = run(["podman", "image", "inspect", "--format", "json", image], check=False)
    if proc.returncode != 0:
        return None
    labels = json.loads(proc.stdout)[0].get("Labels") or {}
    return str(labels.get(label, ""))


def podman_image_id(image: str) -> str | None:
    proc = run(["podman", "image", "inspect", "--format", "{{.Id}}", image], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _podman_build(
    image: str, context: Path, containerfile: Path, source_hash: str, build_args: dict[str, str]
) -> None:
    args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
    progress_label = image.rsplit("/", 1)[-1]
    argv = [
        "podman",
        "build",
        "--layers",
        "-t",
        image,
        "-f",
        str(containerfile),
        f"--label={SOURCE_LABEL}={source_hash}",
        *args,
        str(context),
    ]
    try:
        run(argv, timeout=3600)
    except procs.CommandError as exc:
        raise ComponentError(f"image {progress_label}", "podman build failed", exc.output) from exc


# ---------------------------------------------------------------- static images (pause, test)


def _build_static(
    image: str, name: str, compile_cmd: list[str], sources: list[Path]
) -> ImageResult:
    containerfile = IMAGES_SRC / name / "Containerfile"
    source_hash = _hash_files([*sources, containerfile])
    if podman_label(image, SOURCE_LABEL) == source_hash:
        return ImageResult(image, "cached", 0.0)
    started = time.monotonic()
    _log(f"building image {image}")
    with tempfile.TemporaryDirectory(prefix=f"vf-{name}-") as context:
        try:
            run(
                [*compile_cmd, "-o", f"{context}/{name}", *map(str, sources)],
                env={**os.environ, "CGO_ENABLED": "0"},
                cwd=Path(context),
            )
        except procs.CommandError as exc:
            raise ComponentError(f"image {image}", "compiling failed", exc.output) from exc
        _podman_build(image, Path(context), containerfile, source_hash, {})
    return ImageResult(image, "built", time.monotonic() - started)


def ensure_pause() -> ImageResult:
    return _build_static(
        SANDBOX_IMAGE,
        "pause",
        ["gcc", "-static", "-O2", "-Wall"],
        [IMAGES_SRC / "pause" / "pause.c"],
    )


def ensure_testserver() -> ImageResult:
    return _build_static(
        TESTSERVER_IMAGE,
        "testserver",
        ["go", "build", "-trimpath"],
        [IMAGES_SRC / "testserver" / "main.go"],
    )


# ---------------------------------------------------------------- base image


def _debootstrap_script() -> str:
    return (IMAGES_SRC / "base" / "build-rootfs.sh").read_text()


def ensure_base_image() -> ImageResult:
    """BASE_IMAGE in podman storage: kept if present, pulled if possible, else built."""
    if podman_image_id(BASE_IMAGE) is not None:
        return ImageResult(BASE_IMAGE, "cached", 0.0)
    started = time.monotonic()
    _log(f"pulling {BASE_IMAGE}")
    if run(["podman", "pull", "-q", BASE_IMAGE], check=False, timeout=300).returncode == 0:
        return ImageResult(BASE_IMAGE, "pulled", time.monotonic() - started)
    _log(f"{BASE_IMAGE} cannot be pulled: building it from Debian packages (debootstrap)")
    script = IMAGES_SRC / "base" / "build-rootfs.sh"
    work = paths.images_dir() / "base-rootfs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        tarball = work.with_suffix(".tar")
        run(["bash", script, str(work / "rootfs"), str(tarball), DEBIAN_MIRROR], timeout=3600)
        run(
            [
                "podman",
                "import",
                "--change",
                "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                "ENV LANG=C.UTF-8",
                "--change",
                "ENV PYTHON_VERSION=3.11",
                "--change",
                'CMD ["python3"]',
                "--change",
                f"LABEL {SOURCE_LABEL}={_hash_files([script])}",
                str(tarball),
                BASE_IMAGE,
            ],
            timeout=600,
        )
    except procs.CommandError as exc:
        raise ComponentError(
            "base image", "building it from Debian packages failed", exc.output
        ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
        work.with_suffix(".tar").unlink(missing_ok=True)
    return ImageResult(BASE_IMAGE, "built", time.monotonic() - started)


# ---------------------------------------------------------------- project images

WHEELHOUSE = paths.REPO_ROOT / "build" / "wheelhouse"


def prepare_wheelhouse() -> None:
    """build/wheelhouse: the project's wheel plus wheels of every locked dependency of its
    extras, so Dockerfiles install with `pip install --no-index` and need no network (RUN steps
    here reach PyPI only through a TLS-intercepting proxy whose CA the images do not trust)."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    requirements = WHEELHOUSE / "requirements.txt"
    _log("preparing build/wheelhouse (uv export + pip wheel)")
    try:
        run(
            [
                "uv",
                "export",
                "--frozen",
                "--no-dev",
                "--no-hashes",
                "--no-emit-project",
                "--extra",
                "operator",
                "--extra",
                "runtime",
                "-o",
                str(requirements),
            ],
            cwd=paths.REPO_ROOT,
            timeout=300,
        )
        run(["uv", "build", "--wheel", "-o", str(WHEELHOUSE)], cwd=paths.REPO_ROOT, timeout=300)
        stamp = WHEELHOUSE / "requirements.done"
        if stamp.exists() and stamp.read_text() == requirements.read_text():
            return  # every locked dependency is already there
        # pip wheel also turns sdist-only dependencies into wheels for this Python (3.11).
        run(
            [
                "python3.11",
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "-r",
                str(requirements),
                "-w",
                str(WHEELHOUSE),
                "--find-links",
                str(WHEELHOUSE),
            ],
            cwd=paths.REPO_ROOT,
            timeout=3600,
        )
        stamp.write_text(requirements.read_text())
    except procs.CommandError as exc:
        raise ComponentError("wheelhouse", "preparing build/wheelhouse failed", exc.output) from exc


def project_dockerfiles() -> dict[str, Path]:
    found = {}
    for name in PROJECT_IMAGES:
        dockerfile = paths.REPO_ROOT / name / "Dockerfile"
        if dockerfile.exists():
            found[name] = dockerfile
    return found


def _project_sources() -> list[Path]:
    """Files whose change requires rebuilding the project images (git's view of the repo)."""
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=paths.REPO_ROOT).stdout
    roots = ("operator/", "runtime/", "pyproject.toml", "uv.lock", "README.md")
    return [
        paths.REPO_ROOT / f
        for f in listed.splitlines()
        if f.startswith(roots) and (paths.REPO_ROOT / f).is_file()
    ]


def build_project_images() -> list[ImageResult]:
    results: list[ImageResult] = []
    dockerfiles = project_dockerfiles()
    if not dockerfiles:
        return results
    results.append(ensure_base_image())
    prepare_wheelhouse()
    sources = _project_sources()
    # Wheel names (not bytes: the project's wheel is rebuilt each time) pin the dependencies.
    wheels = " ".join(sorted(w.name for w in WHEELHOUSE.glob("*.whl")))
    for name, dockerfile in dockerfiles.items():
        image = PROJECT_IMAGES[name]
        source_hash = _hash_files([*sources, dockerfile], extra=f"{BASE_IMAGE} {wheels}")
        if podman_label(image, SOURCE_LABEL) == source_hash:
            results.append(ImageResult(image, "cached", 0.0))
            continue
        _log(f"building image {image} from {dockerfile.relative_to(paths.REPO_ROOT)}")
        started = time.monotonic()
        _podman_build(image, paths.REPO_ROOT, dockerfile, source_hash, {"BASE_IMAGE": BASE_IMAGE})
        results.append(ImageResult(image, "built", time.monotonic() - started))
    return results


# ---------------------------------------------------------------- import into the node


def _import_marker() -> Path:
    # Inside containerd's root: when that store is wiped, so is the record of what it holds.
    return paths.cluster_dir() / "containerd" / "root" / "voicefleet-imported.json"


def images_on_node() -> set[str]:
    """Images in the running cluster's node (empty without a node)."""
    info = cluster.read_info()
    if info is None or not info.has_node:
        return set()
    return cluster.provider(info.provider).images_on_node()


def import_images(images: list[str], provider: Provider | None = None) -> list[str]:
    """Import podman images into the node through its provider; returns those imported now
    (skipping ones whose current podman build is already there)."""
    if provider is None:
        info = cluster.read_info()
        if info is None or not info.has_node:
            return []
        provider = cluster.provider(info.provider)
    marker = _import_marker()
    imported: dict[str, str] = json.loads(marker.read_text()) if marker.exists() else {}
    present = provider.images_on_node()
    done = []
    for image in images:
        image_id = podman_image_id(image)
        if image_id is None:
            continue
        if imported.get(image) == image_id and image in present:
            continue
        _log(f"importing {image} into the node")
        with tempfile.TemporaryDirectory(prefix="vf-image-", dir=paths.images_dir().parent) as tmp:
            archive = Path(tmp) / "image.tar"
            run(
                ["podman", "save", "--format", "docker-archive", "-o", str(archive), image],
                timeout=1800,
            )
            provider.load_image_archive(archive)
        imported[image] = image_id
        done.append(image)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(imported, indent=2))
    return done


def voicefleet_podman_images() -> list[str]:
    listed = run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout.split()
    return sorted({i for i in listed if i.startswith("localhost/voicefleet/")})


def ensure_node_images(provider: Provider) -> None:
    """The `prepare_node` of every cluster-up (cluster.up(prepare_node=...)): once the node's
    container runtime serves, the sandbox and test images, plus any project image already
    built, imported into the node."""
    paths.images_dir().mkdir(parents=True, exist_ok=True)
    ensure_pause()
    ensure_testserver()
    import_images(voicefleet_podman_images(), provider)


def prune_superseded_builds() -> None:
    """Delete our untagged images: earlier builds and their build stages (~3 GB per source
    change otherwise, forever). Every stage carries SOURCE_LABEL, so other untagged images on
    the machine are left alone; the layer cache lost is rebuilt by any source change anyway
    (the build stage copies the sources and the freshly built project wheel)."""
    try:
        run(["podman", "image", "prune", "--force", f"--filter=label={SOURCE_LABEL}"], timeout=600)
    except procs.CommandError as exc:
        # Another session pruned (or replaced) an image this prune had listed: it is gone
        # either way, and this session's build is not affected.
        if "image not known" not in str(exc):
            raise


def build_all(import_into_node: bool = True) -> list[ImageResult]:
    paths.images_dir().mkdir(parents=True, exist_ok=True)
    results = [ensure_pause(), ensure_testserver(), *build_project_images()]
    if any(result.status == "built" for result in results):
        prune_superseded_builds()
    if import_into_node:
        import_images(voicefleet_podman_images())
    return results
