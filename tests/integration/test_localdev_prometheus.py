"""The local Prometheus gets fresh pod discovery when the cluster comes up again.

A cluster restarted with the same kubeconfig leaves Prometheus' discovery watch stale, and a reload
with an unchanged discovery config keeps it; so the discovery config names a kubeconfig copy per
cluster incarnation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from voicefleet_localdev import paths, prometheus


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VOICEFLEET_STATE", str(tmp_path))
    return tmp_path


def discovery_file() -> str:
    config = yaml.safe_load(prometheus.config_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "kubernetes-pods")
    return str(job["kubernetes_sd_configs"][0]["kubeconfig_file"])


def test_without_a_cluster_discovery_names_a_file_that_does_not_exist(state: Path) -> None:
    assert not Path(discovery_file()).exists()


def test_a_restarted_cluster_gets_a_new_discovery_kubeconfig(state: Path) -> None:
    paths.kubeconfig().write_text("apiVersion: v1\nkind: Config\n")
    paths.cluster_state_file().write_text('{"startedBy": 1}')
    first = discovery_file()
    assert Path(first).read_text() == paths.kubeconfig().read_text()
    assert discovery_file() == first  # same incarnation: same config, no reload needed

    # `cluster up` rewrites cluster.json; the kubeconfig (PKI kept) is byte-identical.
    paths.cluster_state_file().write_text('{"startedBy": 2}')
    os.utime(paths.cluster_state_file(), ns=(1, 1))
    second = discovery_file()
    assert second != first
    assert Path(second).exists() and not Path(first).exists()
