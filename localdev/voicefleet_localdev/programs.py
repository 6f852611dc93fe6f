"""Every program the local platform and the test kit run has something that installs it.

`python -m voicefleet_localdev.programs` (part of `make check`) reads the code of
voicefleet_localdev and voicefleet_testkit, collects the programs it runs — the first word of
every argv list handed to `run`/`Popen`/`start`/…, every `shutil.which("…")`, every
`paths.binary("component", "command")` — and fails naming each one that `localdev/versions.toml`
does not map to a pinned Debian package, a pinned Go build, or the base system. It reads code as
text and runs nothing, so it works on a fresh machine before `make infra`.

(`nft` once went missing this way: kube-proxy's nftables mode and `cluster down` ran it, and no
pinned package installed it; CI passed only on a machine where it had been installed by hand.)
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from voicefleet_localdev import paths

SCANNED = (
    paths.REPO_ROOT / "localdev" / "voicefleet_localdev",
    paths.REPO_ROOT / "testkit" / "voicefleet_testkit",
)
# Functions whose list arguments are argv vectors (subprocess, procs.run/start, build's streams).
# (`_build_static` takes the compiler's argv for the node's static images.)
RUNNERS = frozenset(
    {
        "run",
        "Popen",
        "check_output",
        "check_call",
        "call",
        "start",
        "_stream",
        "_stream_apt",
        "_build_static",
    }
)


@dataclass(frozen=True)
class Use:
    program: str
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.program} ({self.where})"


@dataclass(frozen=True)
class BuiltUse:
    component: str
    command: str
    where: str


def _callee(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _first_word(node: ast.AST) -> str | None:
    if isinstance(node, ast.List | ast.Tuple) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
    return None


def _shown(file: Path) -> str:
    return (
        str(file.relative_to(paths.REPO_ROOT))
        if file.is_relative_to(paths.REPO_ROOT)
        else str(file)
    )


def scan(root: Path) -> Iterator[Use | BuiltUse]:
    for file in sorted(root.rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                yield from _assigned(node, file)
            if not isinstance(node, ast.Call):
                continue
            where = f"{_shown(file)}:{node.lineno}"
            callee = _callee(node)
            constants = [
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            ]
            if callee == "which" and constants:
                yield Use(constants[0], where)
            elif callee == "binary" and constants:
                yield BuiltUse(constants[0], constants[1] if len(constants) > 1 else "", where)
            elif callee in RUNNERS:
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    word = _first_word(arg)
                    if word is not None:
                        yield Use(word, where)


def _assigned(node: ast.Assign, file: Path) -> Iterator[Use]:
    """`argv = ["sipp", ...]` and `ESPEAK_BINARY = "espeak-ng"`: programs named before the call."""
    target = node.targets[0]
    name = target.id if isinstance(target, ast.Name) else ""
    where = f"{_shown(file)}:{node.lineno}"
    if name in ("argv", "cmd", "command"):
        word = _first_word(node.value)
        if word is not None:
            yield Use(word, where)
    elif name.endswith("_BINARY") and isinstance(node.value, ast.Constant):
        if isinstance(node.value.value, str):
            yield Use(node.value.value, where)


def problems(versions: dict, roots: tuple[Path, ...] = SCANNED) -> list[str]:
    declared: dict[str, str] = versions.get("programs", {})
    debian = set(versions["debian"]["packages"])
    go = versions["go"]
    found: list[str] = []
    for source_of, program in ((s, p) for p, s in declared.items()):
        kind, _, name = source_of.partition(":")
        if kind == "debian" and name not in debian:
            found.append(
                f"[programs] {program} = {source_of!r}: {name} is not in [debian] packages"
            )
        elif kind == "go" and name not in go:
            found.append(f"[programs] {program} = {source_of!r}: no [go.{name}] build")
        elif kind not in ("debian", "go", "base", "setup", "user"):
            found.append(
                f"[programs] {program} = {source_of!r}: say debian:PACKAGE, go:COMPONENT, "
                "setup:WHAT (make setup), base (on every machine of this kind) or user:WHY"
            )
    for root in roots:
        for use in scan(root):
            if isinstance(use, BuiltUse):
                recipe = go.get(use.component)
                if recipe is None:
                    found.append(f"{use.where}: paths.binary({use.component!r}) is not built")
                elif use.command and use.command not in recipe.get("commands", [use.command]):
                    found.append(
                        f"{use.where}: {use.component} builds no {use.command!r} "
                        f"(commands = {recipe.get('commands')})"
                    )
            elif use.program not in declared and not use.program.startswith(("/", ".")):
                found.append(
                    f"{use}: runs {use.program!r}, which nothing installs; add it to [programs] in "
                    "localdev/versions.toml with the pinned Debian package or Go build that "
                    "provides it"
                )
    return found


def main() -> int:
    found = problems(paths.versions())
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"{len(found)} program(s) without an install step", file=sys.stderr)
        return 1
    print(f"every program run by {', '.join(p.name for p in SCANNED)} is installed by make infra")
    return 0


if __name__ == "__main__":
    sys.exit(main())
