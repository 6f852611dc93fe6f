"""`make check`'s installed-programs check: a program the local platform runs must be installed by
something pinned (localdev/versions.toml [programs]); it reads code, so it needs no platform."""

from __future__ import annotations

from pathlib import Path

from voicefleet_localdev import build, paths, programs


def test_the_repository_runs_no_program_that_nothing_installs() -> None:
    assert programs.problems(paths.versions()) == []


def test_nft_is_mapped_to_the_pinned_nftables_package() -> None:
    versions = paths.versions()
    assert versions["programs"]["nft"] == "debian:nftables"
    assert "nftables" in versions["debian"]["packages"]


def write(tmp_path: Path, code: str) -> Path:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(code)
    return package


def test_a_program_nothing_installs_is_named_with_where_it_runs(tmp_path: Path) -> None:
    package = write(
        tmp_path,
        "import subprocess, shutil\n"
        "def f():\n"
        "    subprocess.run(['nft', 'list', 'tables'])\n"
        "    run(['frobnicate', '--all'], check=False)\n"
        "    argv = ['sipp', '127.0.0.1']\n"
        "    shutil.which('tcpdump')\n",
    )
    versions = {**paths.versions(), "programs": {"nft": "debian:nftables", "sipp": "base"}}
    found = programs.problems(versions, (package,))
    assert len(found) == 2, found
    assert "frobnicate (" in found[0] and "mod.py:4" in found[0]
    assert "tcpdump (" in found[1] and "mod.py:6" in found[1]


def test_a_mapping_to_an_unpinned_package_is_refused(tmp_path: Path) -> None:
    package = write(tmp_path, "def f():\n    run(['nft'])\n")
    pinned = paths.versions()
    versions = {
        **pinned,
        "debian": {"packages": [p for p in pinned["debian"]["packages"] if p != "nftables"]},
        "programs": {"nft": "debian:nftables"},
    }
    assert programs.problems(versions, (package,)) == [
        "[programs] nft = 'debian:nftables': nftables is not in [debian] packages"
    ]


def test_a_binary_the_builds_do_not_make_is_named(tmp_path: Path) -> None:
    package = write(tmp_path, "def f():\n    paths.binary('kubernetes', 'kubeadm')\n")
    found = programs.problems({**paths.versions(), "programs": {}}, (package,))
    assert len(found) == 1 and "builds no 'kubeadm'" in found[0], found


def test_make_infras_table_has_one_row_per_pinned_debian_package() -> None:
    # The packages are installed by now (the test tiers depend on `make infra`): nothing runs apt.
    packages = paths.versions()["debian"]["packages"]
    rows = build.install_debian()
    assert [row.component for row in rows] == [f"{package} (deb)" for package in packages]
    assert all(row.status == "cached" and row.version for row in rows), rows
