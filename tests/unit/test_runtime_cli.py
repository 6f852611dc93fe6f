"""`python -m voicefleet_runtime check`: a bad config exits non-zero, naming the field and fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from voicefleet_operator import render
from voicefleet_operator.api import parse_spec
from voicefleet_runtime.config import (
    ConfigError,
    load_config,
    load_from_environment,
    missing_environment,
    parse_config,
)

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


# --- the same start-up check in-process (issue 18: mutmut sees only in-process calls) ---------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "voiceagent.yaml"


def example_config_file(tmp_path: Path) -> Path:
    """The example VoiceAgent's config as the operator renders it (Deepgram, OpenAI,
    ElevenLabs; a tool header from a Secret key)."""
    spec = parse_spec(yaml.safe_load(EXAMPLE.read_text())["spec"])
    config = render.runtime_config(render.VoiceAgentRef("support", "acme", "uid-1"), spec)
    path = tmp_path / "config.yaml"
    path.write_text(render.config_yaml(config))
    return path


def test_start_up_names_every_missing_variable_and_where_it_comes_from(tmp_path: Path) -> None:
    path = example_config_file(tmp_path)
    header = "VOICEFLEET_SECRET_ACME_ORDERS_API_AUTHORIZATION_60E965"
    environ = {"VOICEFLEET_CONFIG": str(path), "OPENAI_API_KEY": "sk-test", header: ""}
    with pytest.raises(ConfigError) as error:
        load_from_environment(environ)
    assert str(error.value) == (
        "environment variables required by the config are not set: "
        f"{header}, DEEPGRAM_API_KEY, ELEVEN_API_KEY "
        "(provide them from a Secret: spec.secretRefs or the header's secretKeyRef)"
    )
    environ |= {header: "Bearer t", "DEEPGRAM_API_KEY": "dg", "ELEVEN_API_KEY": "el"}
    config = load_from_environment(environ)
    assert missing_environment(config, environ) == []
    assert config.provider_key_env_vars() == [
        "DEEPGRAM_API_KEY",
        "ELEVEN_API_KEY",
        "OPENAI_API_KEY",
    ]


def test_start_up_without_a_config_path_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_from_environment({})
    assert str(error.value) == (
        "VOICEFLEET_CONFIG is not set; set it to the path of the config file"
    )
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as error:
        load_from_environment({"VOICEFLEET_CONFIG": str(missing)})
    assert str(error.value) == (
        f"cannot read config file {missing} (No such file or directory); set VOICEFLEET_CONFIG "
        "to the path of the rendered config"
    )
    assert error.value.__cause__ is None  # no traceback chain into the log


def test_start_up_reads_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = example_config_file(tmp_path)
    monkeypatch.delenv("VOICEFLEET_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="VOICEFLEET_CONFIG is not set"):
        load_from_environment()
    monkeypatch.setenv("VOICEFLEET_CONFIG", str(path))
    header = "VOICEFLEET_SECRET_ACME_ORDERS_API_AUTHORIZATION_60E965"
    for name in (header, "OPENAI_API_KEY", "DEEPGRAM_API_KEY", "ELEVEN_API_KEY"):
        monkeypatch.setenv(name, "set")
    assert load_from_environment().dispatch_name == "acme.support"


def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("agents: [unclosed\n")
    with pytest.raises(ConfigError) as error:
        load_config(broken)
    assert str(error.value).startswith(f"{broken} is not valid YAML/JSON: ")
    assert error.value.__cause__ is None
    listed = tmp_path / "list.yaml"
    listed.write_text("- agents\n")
    with pytest.raises(ConfigError) as error:
        load_config(listed)
    assert str(error.value) == f"{listed} must contain a mapping at the top level"


def test_a_realtime_pipeline_needs_only_its_own_key() -> None:
    config = parse_config(
        {
            **VALID,
            "pipeline": {"realtime": {"provider": "openai", "model": "gpt-realtime"}},
        }
    )
    assert config.provider_key_env_vars() == ["OPENAI_API_KEY"]
    assert missing_environment(config, {}) == ["OPENAI_API_KEY"]
