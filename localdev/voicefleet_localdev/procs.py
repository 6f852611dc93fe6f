"""Long-running host processes (etcd, kube-apiserver, containerd...) and command helpers.

Each managed process runs in its own session, writes stdout+stderr to paths.log_file(name) and
has a pid file in paths.pids_dir() holding its pid and kernel start time, so a reused pid is
never mistaken for our process and `stop` works from any later invocation of the CLI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from voicefleet_localdev import paths


class ComponentError(RuntimeError):
    """A component failed to build, start or become ready; carries the tail of its log."""

    def __init__(self, component: str, message: str, log_tail: str = "") -> None:
        self.component = component
        self.log_tail = log_tail
        text = f"{component}: {message}"
        if log_tail:
            text += f"\n--- {component}: last lines of its output ---\n{log_tail}"
        super().__init__(text)


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        super().__init__(
            f"command failed (exit {returncode}): {' '.join(argv)}\n{tail_text(output, 40)}"
        )


def tail_text(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file, or a note that it does not exist."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return tail_text(data, lines)


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing stdout+stderr together; raise CommandError on failure."""
    args = [str(a) for a in argv]
    proc = subprocess.run(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        timeout=timeout,
        input=input,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stdout)
    return proc


def _pid_file(name: str) -> Path:
    return paths.pids_dir() / f"{name}.pid"


def _start_time(pid: int) -> str | None:
    """Kernel start time of a live (non-zombie) process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may contain spaces or parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _reap(pid: int) -> None:
    # Our own children stay zombies until waited for; harmless for processes we did not fork.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_of(name: str) -> int | None:
    """Pid of the managed process `name` if it is running, else None."""
    try:
        pid_text, started = _pid_file(name).read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    pid = int(pid_text)
    _reap(pid)
    return pid if _start_time(pid) == started else None


def is_running(name: str) -> bool:
    return pid_of(name) is not None


def start(
    name: str,
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start `argv` detached, logging to paths.log_file(name); return its pid."""
    existing = pid_of(name)
    if existing is not None:
        return existing
    log_path = paths.log_file(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    paths.pids_dir().mkdir(parents=True, exist_ok=True)
    args = [str(a) for a in argv]
    with log_path.open("ab") as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        log.write(f"\n===== {stamp} starting: {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
            cwd=cwd,
            start_new_session=True,
        )
    started = None
    for _ in range(100):
        started = _start_time(proc.pid)
        if started is not None:
            break
        if proc.poll() is not None:
            raise ComponentError(name, f"exited at once (code {proc.returncode})", tail(log_path))
        time.sleep(0.01)
    _pid_file(name).write_text(f"{proc.pid} {started}\n")
    return proc.pid


def stop(name: str, timeout: float = 15.0) -> bool:
    """Stop a managed process and its process group: SIGTERM, then SIGKILL. True if it ran."""
    pid = pid_of(name)
    _pid_file(name).unlink(missing_ok=True)
    if pid is None:
        return False
    terminate_pids([pid], timeout=timeout, group=True)
    return True


def terminate_pids(pids: Sequence[int], *, timeout: float = 15.0, group: bool = False) -> None:
    """SIGTERM the given processes (their process groups if `group`), SIGKILL what outlives it."""
    starts = {pid: _start_time(pid) for pid in pids}
    alive = [pid for pid, st in starts.items() if st is not None]

    def signal_all(sig: int) -> None:
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        for pid in alive:
            _reap(pid)
        alive = [pid for pid in alive if _start_time(pid) == starts[pid]]
        if alive:
            time.sleep(0.1)
    if alive:
        signal_all(signal.SIGKILL)
        for _ in range(50):
            for pid in alive:
                _reap(pid)
            alive = [pid for pid in alive if _start_time(pid) == starts[pid]]
            if not alive:
                break
            time.sleep(0.1)


def pids_matching(predicate: Callable[[list[str]], bool]) -> list[int]:
    """Pids of live processes whose argv satisfies `predicate` (never our own pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
        if argv and predicate(argv) and _start_time(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


def wait_until(
    component: str,
    what: str,
    check: Callable[[], bool],
    *,
    timeout: float,
    interval: float = 0.25,
    process: str | None = None,
) -> None:
    """Poll `check` until true; fail with the component's log tail on timeout or if the
    managed process `process` (default: `component`) exits meanwhile."""
    watched = process if process is not None else component
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            if check():
                return
        except Exception as exc:  # readiness probes raise while the server is coming up
            last_error = f" (last error: {exc})"
        if _pid_file(watched).exists() and not is_running(watched):
            raise ComponentError(
                component, f"exited while waiting for {what}", tail(paths.log_file(watched))
            )
        if time.monotonic() > deadline:
            raise ComponentError(
                component,
                f"not {what} after {timeout:.0f}s{last_error}",
                tail(paths.log_file(watched)),
            )
        time.sleep(interval)
