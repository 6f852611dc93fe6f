"""`make mutation`'s score: what mutmut found, per mutated module and in total.

    python -m voicefleet_localdev.mutation [.mutation]

Reads `mutmut results --all true` in the mutation directory (see mutation.toml) and prints, per
module, the mutants killed (a test failed, or the mutant made a test time out), those that
survived (every test passed) and those no test reaches, then the total score: killed over
all mutants. Mutants of the functions mutation.toml's `[tool.voicefleet-mutation] outside`
lists (I/O against LiveKit or the filesystem, covered by integration tests) are left out of the
score. The survivors' names are written to survivors.txt there, one per line, for
`mutmut show NAME`; tests/README.md lists the equivalent ones and why. Exits 1 when a module
or the total is below `minimum` (0.9).
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout"}
MINIMUM = 0.9


def scope(directory: Path) -> tuple[list[str], float]:
    """(patterns of mutant names left out of the score, minimum score) from the directory's
    pyproject.toml (the Makefile's copy of mutation.toml)."""
    path = directory / "pyproject.toml"
    table = tomllib.loads(path.read_text()) if path.exists() else {}
    ours = table.get("tool", {}).get("voicefleet-mutation", {})
    return list(ours.get("outside", [])), float(ours.get("minimum", MINIMUM))


def in_scope(found: dict[str, str], outside: list[str]) -> dict[str, str]:
    """The mutants not matching any `outside` pattern (fnmatch on the mutant's name without its
    number, e.g. voicefleet_operator.telephony.xǁTelephonyProvisionerǁ*)."""
    return {
        name: status
        for name, status in found.items()
        if not any(fnmatch.fnmatchcase(name.split("__mutmut_")[0], p) for p in outside)
    }


def results(directory: Path) -> dict[str, str]:
    """{mutant name: status} as mutmut reports them."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=directory,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name:
            found[name] = status.strip()
    return found


def module_of(mutant: str) -> str:
    """voicefleet_operator.scaling.x_decide__mutmut_3 -> voicefleet_operator.scaling."""
    return mutant.split(".x", 1)[0]


def score(found: dict[str, str]) -> tuple[str, float]:
    table, rates = scores(found)
    return table, rates["total"]


def scores(found: dict[str, str]) -> tuple[str, dict[str, float]]:
    """The table, and the score per module and in total ("total")."""
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    for name, status in found.items():
        by_module[module_of(name)][status] += 1
    header = ("module", "mutants", "killed", "survived", "no tests", "not run", "score")
    lines = ["{:40} {:>8} {:>8} {:>9} {:>9} {:>8} {:>7}".format(*header)]
    total: Counter[str] = Counter()
    for module in sorted(by_module):
        counts = by_module[module]
        total.update(counts)
        lines.append(_row(module, counts))
    lines.append(_row("total", total))
    rates = {module: _rate(counts) for module, counts in by_module.items()}
    rates["total"] = _rate(total)
    return "\n".join(lines), rates


def _rate(counts: Counter[str]) -> float:
    mutants = sum(counts.values())
    return sum(counts[s] for s in KILLED) / mutants if mutants else 0.0


def _row(label: str, counts: Counter[str]) -> str:
    mutants = sum(counts.values())
    killed = sum(counts[s] for s in KILLED)
    rate = killed / mutants if mutants else 0.0
    return (
        f"{label:40} {mutants:8d} {killed:8d} {counts['survived']:9d} "
        f"{counts['no tests']:9d} {counts['not checked']:8d} {rate:7.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0] if args else ".mutation")
    found = results(directory)
    if not found:
        print(f"no mutmut results in {directory}: run `make mutation` first", file=sys.stderr)
        return 2
    outside, minimum = scope(directory)
    scored = in_scope(found, outside)
    table, rates = scores(scored)
    print(table)
    survivors = sorted(n for n, s in scored.items() if s not in KILLED)
    (directory / "survivors.txt").write_text("".join(f"{n}\n" for n in survivors))
    print(
        f"\nscore {rates['total']:.1%} ({len(found) - len(scored)} mutants outside the scope "
        f"left out); {len(survivors)} not killed, listed in {directory}/survivors.txt "
        "(the equivalent ones, and why: tests/README.md, Mutation testing)"
    )
    low = sorted(m for m, rate in rates.items() if rate < minimum)
    if low:
        print(f"below {minimum:.0%}: {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
