"""`make mutation`'s score: what mutmut found, per mutated module and in total.

    python -m voicefleet_localdev.mutation [.mutation]

Reads `mutmut results --all true` in the mutation directory (see mutation.toml) and prints, per
module, the mutants killed (a test failed, or the mutant made a test time out), those that
survived (every test passed) and those no test reaches, then the total score: killed over
all mutants. The survivors' names are written to survivors.txt there, one per line, for
`mutmut show NAME`.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout"}


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
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    for name, status in found.items():
        by_module[module_of(name)][status] += 1
    header = ("module", "mutants", "killed", "survived", "no tests", "score")
    lines = ["{:40} {:>8} {:>8} {:>9} {:>9} {:>7}".format(*header)]
    total: Counter[str] = Counter()
    for module in sorted(by_module):
        counts = by_module[module]
        total.update(counts)
        lines.append(_row(module, counts))
    lines.append(_row("total", total))
    all_mutants = sum(total.values())
    killed = sum(total[s] for s in KILLED)
    return "\n".join(lines), (killed / all_mutants if all_mutants else 0.0)


def _row(label: str, counts: Counter[str]) -> str:
    mutants = sum(counts.values())
    killed = sum(counts[s] for s in KILLED)
    rate = killed / mutants if mutants else 0.0
    return (
        f"{label:40} {mutants:8d} {killed:8d} {counts['survived']:9d} "
        f"{counts['no tests']:9d} {rate:7.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0] if args else ".mutation")
    found = results(directory)
    if not found:
        print(f"no mutmut results in {directory}: run `make mutation` first", file=sys.stderr)
        return 2
    table, rate = score(found)
    print(table)
    survivors = sorted(n for n, s in found.items() if s not in KILLED)
    (directory / "survivors.txt").write_text("".join(f"{n}\n" for n in survivors))
    print(f"\nscore {rate:.1%}; {len(survivors)} not killed, listed in {directory}/survivors.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
