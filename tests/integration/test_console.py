"""`python -m voicefleet_runtime console --text`: the worker's own config, run in a terminal (a
pseudo-terminal here), answers one typed turn through the local provider servers: the greeting
is shown, the typed words reach the LLM as the caller's message and the scripted reply is shown
as the agent's."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from voicefleet_testkit.providers import LLMReply, ProviderServer

from tests.integration.test_runtime_worker import GREETING, ORDERS_TOKEN, runtime_config

pytestmark = pytest.mark.integration

QUESTION = "What are your opening hours?"
ANSWER = "We open at nine and close at five."
PROMPT = "Type to talk to your agent"  # the console's input placeholder: ready for a line
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Console:
    """The console process on a pseudo-terminal; `screen` is everything it printed, without
    terminal escapes."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.raw = b""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "voicefleet_runtime", "console", "--text"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
        os.close(slave)

    @property
    def screen(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace"))

    def _read(self, seconds: float) -> None:
        readable, _, _ = select.select([self.master], [], [], seconds)
        if readable:
            try:
                self.raw += os.read(self.master, 65536)
            except OSError:  # the process closed the terminal
                time.sleep(seconds)

    async def wait_for(self, text: str, within: float, after: int = 0) -> int:
        """Wait until `text` is on the screen after offset `after`; returns where it is."""
        deadline = time.monotonic() + within
        while (found := self.screen.find(text, after)) < 0:
            if self.process.poll() is not None:
                pytest.fail(f"the console exited ({self.process.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not shown within {within:.0f}s:\n{self.tail()}")
            await asyncio.to_thread(self._read, 0.2)
        return found

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.screen.splitlines()[-lines:])

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        os.close(self.master)


async def test_console_answers_one_typed_turn_with_the_workers_config(
    providers: ProviderServer, tmp_path: Path
) -> None:
    config = runtime_config(f"console-{uuid.uuid4().hex[:6]}", providers.base_url, "http://x")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    providers.script_llm(LLMReply(ANSWER, match="opening hours"))
    env = {
        **os.environ,
        "VOICEFLEET_CONFIG": str(config_path),
        "OPENAI_API_KEY": "sk-test-console",
        "ORDERS_TOKEN": ORDERS_TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "TERM": "xterm",
        "COLUMNS": "160",
        "LINES": "50",
    }
    console = Console(env, tmp_path)
    try:
        await console.wait_for(PROMPT, 120)
        greeted = await console.wait_for(GREETING, 60)
        asked = len(console.screen)
        console.type(QUESTION)
        await console.wait_for(QUESTION, 30, after=asked)
        # The reply as the console shows the agent's turn (its debug log line comes first).
        agent_turn = await console.wait_for("● Agent", 60, after=asked)
        await console.wait_for(ANSWER, 30, after=agent_turn)
        assert greeted < asked
    finally:
        console.close()
    chats = providers.requests("chat")
    assert chats, "the console never asked the LLM"
    assert chats[-1]["body"]["messages"][-1] == {"role": "user", "content": QUESTION}
    assert chats[-1]["reply"]["text"] == ANSWER
    # The entry agent's instructions and tools: the worker's config, not a default agent.
    assert "receptionist of Acme" in chats[-1]["body"]["messages"][0]["content"]
    assert {t["function"]["name"] for t in chats[-1]["body"]["tools"]} >= {"lookup_order"}
