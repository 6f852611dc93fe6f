"""`python -m voicefleet_runtime check`: a bad config exits non-zero, naming the field and fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

VALID: dict[str, Any] = {
    "tenant": "acme",
    "name": "support",
    "dispatchName": "acme-support",
    "agents": [{"name": "receptionist", "instructions": "Be helpful.", "greeting": "Hello."}],
    "entry": "receptionist",
    "pipeline": {
        "stt": {"provider": "openai", "model": "whisper-1"},
        "tts": {"provider": "openai"},
    },
}


def run_check(
    tmp_path: Path, config: dict[str, Any], **env: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.endswith("_API_KEY") and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    environ.update({"VOICEFLEET_CONFIG": str(path), "OPENAI_API_KEY": "sk-test", **env})
    return subprocess.run(
        [sys.executable, "-m", "voicefleet_runtime", "check"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_valid_config_passes(tmp_path: Path) -> None:
    result = run_check(tmp_path, VALID)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout and "'acme-support'" in result.stdout


def test_bad_field_exits_non_zero_naming_the_field(tmp_path: Path) -> None:
    config = {**VALID, "worker": {"jobsPerWorker": 0}}
    result = run_check(tmp_path, config)
    assert result.returncode == 2
    assert "worker.jobsPerWorker" in result.stderr
    assert "greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_field_and_bad_reference_are_both_reported(tmp_path: Path) -> None:
    config = {**VALID, "entry": "billing", "pipline": {}}
    result = run_check(tmp_path, config)
    assert result.returncode == 2
    assert "pipline: unknown field; check the spelling" in result.stderr
    # The typo does not hide the cross-field check pydantic skips after a field error.
    assert "entry 'billing' names no agent; use one of ['receptionist']" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_field_and_bad_reference_are_both_reported(tmp_path: Path) -> None:
    config = {**VALID, "entry": "billing", "worker": {"jobsPerWorker": 0}}
    result = run_check(tmp_path, config)
    assert result.returncode == 2
    assert "worker.jobsPerWorker: Input should be greater than or equal to 1" in result.stderr
    assert "entry 'billing' names no agent" in result.stderr


def test_missing_secret_names_the_variable(tmp_path: Path) -> None:
    config = {
        **VALID,
        "tools": [
            {
                "name": "lookup",
                "description": "Look something up.",
                "http": {
                    "url": "https://example.com/hook",
                    "headers": [{"name": "Authorization", "valueFromEnv": "LOOKUP_TOKEN"}],
                },
            }
        ],
    }
    result = run_check(tmp_path, config)
    assert result.returncode == 2
    assert "LOOKUP_TOKEN" in result.stderr
    assert run_check(tmp_path, config, LOOKUP_TOKEN="secret").returncode == 0


def test_missing_config_file_says_how_to_fix_it(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if k != "VOICEFLEET_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "voicefleet_runtime", "check"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "VOICEFLEET_CONFIG is not set" in result.stderr
