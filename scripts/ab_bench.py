"""Alternated A/B timing of two numbattn trees with ``python -m numbattn bench``.

Usage::

    python scripts/ab_bench.py OLD_TREE NEW_TREE [--rounds 3] -- BENCH_ARGS...

e.g. ``python scripts/ab_bench.py /tmp/numbattn-main . --rounds 3 -- --kernel
attention --dtype float32,float64 --causal both --shape 1,8,2048,64``.

Each round runs ``bench --json`` once per tree (A, B, A, B ...; each in its
own process, PYTHONPATH set to the tree), so both see the same load over
the run. Per problem it prints the median of each tree's medians, the
median over rounds of the per-round time ratio old / new (> 1: new is
faster), and, where the bench measured them, the median ratio to torch
(torch time / numbattn time) and fraction of the GEMM rate of the same run.
Each tree's own numbattn is checked against numbattn.reference by bench.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _run(tree: str, bench_args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, "-m", "numbattn", "bench", "--json", "--no-progress", *bench_args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"bench failed in {tree} (rc {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout[r.stdout.index("{") :])


def _key(rec: dict) -> tuple:
    return (rec["kernel"], rec["dtype"], tuple(rec["shape"]), rec["causal"])


def _med(xs: list) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    bench_args = argv[cut + 1 :]
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(args.rounds):
        for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
            tree = getattr(args, name)
            doc = _run(tree, bench_args)
            bad = [r for r in doc["results"] if not r["check"]["ok"]]
            if bad:
                raise SystemExit(f"{name}: check failed: {[_key(r) for r in bad]}")
            runs[name].append({_key(r): r for r in doc["results"]})
            print(f"round {i + 1} {name} done", file=sys.stderr, flush=True)
    keys = list(runs["new"][0])
    print(f"{args.rounds} alternated rounds; medians over rounds; old={args.old} new={args.new}")
    head = (
        f"{'kernel':9} {'dtype':7} {'shape':16} {'causal':6} {'old ms':>8} {'new ms':>8} "
        f"{'old/new':>7} {'range':>11} {'torch/old':>9} {'torch/new':>9} "
        f"{'peak old':>8} {'peak new':>8}"
    )
    print(head)
    for k in keys:
        old = [r[k] for r in runs["old"]]
        new = [r[k] for r in runs["new"]]
        ratios = [o["median_s"] / n["median_s"] for o, n in zip(old, new)]
        print(
            f"{k[0]:9} {k[1]:7} {'x'.join(map(str, k[2])):16} {k[3]!s:6} "
            f"{1e3 * _med([r['median_s'] for r in old]):8.2f} "
            f"{1e3 * _med([r['median_s'] for r in new]):8.2f} "
            f"{_med(ratios):7.2f} {min(ratios):5.2f}-{max(ratios):5.2f} "
            f"{_med([r['vs_torch'] for r in old]):9.2f} {_med([r['vs_torch'] for r in new]):9.2f} "
            f"{_med([r['of_peak'] for r in old]):8.0%} {_med([r['of_peak'] for r in new]):8.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
