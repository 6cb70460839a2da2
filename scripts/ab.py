"""Time an older revision of numbattn against this checkout, in alternating rounds.

    python scripts/ab.py OLD_REV [--ab-rounds R] [bench options ...]

OLD_REV (any git revision: a commit, ``main``, ``HEAD~3``) is checked out
into a temporary ``git worktree``, removed at exit. Each of R rounds
(default 5) runs ``python -m numbattn bench --json --no-progress [bench
options]`` twice, each in a fresh process: once with the old tree first on
``PYTHONPATH``, once with this checkout; the order alternates between
rounds, so a machine that speeds up or slows down over the run favours
neither. Then, per case (kernel, dtype, shape, causal), it prints the median
over rounds of numbattn's ``median_s`` for both and their ratio old / new
(above 1: this checkout is faster). Example, numbattn alone::

    python scripts/ab.py main --kernel attention --shape 1,8,1024,64 \\
        --causal no --no-baselines --no-peak

Each tree compiles its kernels in its first round (Numba's cache is per
source file), so the first round's bench runs take longer; only the
timings inside each run count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """OLD_REV and --ab-rounds; every other argument goes to bench (``args.bench``)."""
    p = argparse.ArgumentParser(
        usage="%(prog)s OLD_REV [--ab-rounds R] [bench options ...]",
        description=__doc__.splitlines()[0],
        epilog="Other options go to python -m numbattn bench (see its --help).",
        allow_abbrev=False,
    )
    p.add_argument("old", metavar="OLD_REV", help="the git revision to compare against")
    p.add_argument("--ab-rounds", type=int, default=5, help="rounds of two runs (default 5)")
    args, args.bench = p.parse_known_args(argv)
    if args.ab_rounds < 1:
        p.error("--ab-rounds must be >= 1")
    return args


def bench_command(options: list[str]) -> list[str]:
    return [sys.executable, "-m", "numbattn", "bench", "--json", "--no-progress", *options]


def case(row: dict) -> str:
    shape = "x".join(map(str, row["shape"]))
    return f"{row['kernel']} {row['dtype']} {shape}{' causal' if row['causal'] else ''}"


def run_bench(tree: Path, options: list[str]) -> dict[str, float]:
    """One bench process on ``tree``'s numbattn: case -> median_s."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run(bench_command(options), cwd=tree, env=env, capture_output=True, text=True)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        sys.exit(f"ab.py: bench on {tree} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    if not doc.get("all_ok", True):
        print(f"ab.py: warning: a check failed on {tree}", file=sys.stderr)
    return {case(row): row["median_s"] for row in doc["results"]}


def summarise(runs: dict[str, list[dict[str, float]]]) -> list[tuple[str, float, float, float]]:
    """(case, old median, new median, old / new) for the cases both sides timed."""
    out = []
    for name in runs["new"][0] if runs["new"] else []:
        old = [r[name] for r in runs["old"] if r.get(name)]
        new = [r[name] for r in runs["new"] if r.get(name)]
        if old and new:
            o, n = statistics.median(old), statistics.median(new)
            out.append((name, o, n, o / n))
    return out


def table(rows: list[tuple[str, float, float, float]]) -> str:
    width = max([len("case")] + [len(r[0]) for r in rows])
    lines = [f"{'case':{width}}  {'old (ms)':>10}  {'new (ms)':>10}  {'old/new':>7}"]
    for name, o, n, ratio in rows:
        lines.append(f"{name:{width}}  {o * 1e3:10.3f}  {n * 1e3:10.3f}  {ratio:7.3f}")
    return "\n".join(lines)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    old_sha = git("rev-parse", "--verify", f"{args.old}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="numbattn-ab-") as tmp:
        old_tree = Path(tmp) / "old"
        git("worktree", "add", "--detach", str(old_tree), old_sha)
        try:
            runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
            trees = {"old": old_tree, "new": ROOT}
            for i in range(args.ab_rounds):
                order = ("old", "new") if i % 2 == 0 else ("new", "old")
                for side in order:
                    runs[side].append(run_bench(trees[side], args.bench))
                print(f"round {i + 1}/{args.ab_rounds} done", file=sys.stderr)
        finally:
            git("worktree", "remove", "--force", str(old_tree))
    print(f"old: {args.old} ({old_sha[:10]}); new: this checkout, {ROOT}")
    print(f"medians of numbattn's median_s over {args.ab_rounds} rounds (old/new > 1: new faster)")
    print()
    print(table(summarise(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
