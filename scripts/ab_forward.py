"""Old vs new numbattn CPU kernels alternated in ONE process.

Usage::

    python scripts/ab_forward.py OLD_TREE [--rounds 7] [--kernel attention]
        [--dtype float32,float64] [--shape 1,8,2048,64 ...] [--causal both]
        [--threads N] [--cpu-time]

OLD_TREE is a checkout of the baseline (e.g. ``git archive main | tar -x -C
/tmp/old``); its ``numbattn`` package is copied to a temporary directory as
``numbattn_old`` (the package imports itself relatively), so both versions
load side by side, each with its own compiled kernels. The new version is
the ``numbattn`` on the path. Each round times every problem A then B (B
then A on odd rounds), each sample the median of a few back-to-back calls,
so load on a shared machine hits both alike. Prints per problem the median
time of each, the median over rounds of the per-round ratio old / new (> 1:
new faster) with its range, and new's rate. Both are first checked against
numbattn.reference. ``--cpu-time`` times the process's CPU time (divided by
the thread count) instead of wall time: on a crowded machine it leaves out
the time other processes hold the cores, so per-flop changes show through
the noise (the rate column then assumes the threads never wait).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _load_old(tree: str):
    tmp = tempfile.mkdtemp(prefix="numbattn-old-")
    shutil.copytree(
        os.path.join(tree, "numbattn"),
        os.path.join(tmp, "numbattn_old"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    sys.path.insert(0, tmp)
    import numbattn_old  # type: ignore[import-not-found]

    return numbattn_old


def _time(fn, calls: int, clock=time.perf_counter) -> float:
    ts = []
    for _ in range(calls):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--kernel", default="attention", choices=["attention", "scores"])
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--shape", action="append")
    ap.add_argument("--causal", default="both", choices=["no", "yes", "both"])
    ap.add_argument("--threads", type=int, default=0, help="Numba threads (default: all)")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the process's CPU time, not wall time: on a loaded machine it "
        "leaves out the time other processes hold the cores (the rate column "
        "is then per thread-second x threads)",
    )
    args = ap.parse_args()
    import numba

    import numbattn
    from numbattn import reference

    if args.threads:
        numba.set_num_threads(args.threads)
    nthreads = numba.get_num_threads()
    clock = time.process_time if args.cpu_time else time.perf_counter

    old = _load_old(args.old)
    shapes = [tuple(int(x) for x in s.split(",")) for s in (args.shape or ["1,8,2048,64"])]
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    rng = np.random.default_rng(0)
    probs = []
    for dtype in args.dtype.split(","):
        for shape in shapes:
            q, k, v = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
            for causal in causals:
                fns = []
                for mod in (old, numbattn):
                    if args.kernel == "attention":
                        fn = functools.partial(mod.attention, q, k, v, causal=causal)
                    else:
                        fn = functools.partial(mod.scores, q, k, causal=causal)
                    fns.append(fn)
                sub = tuple(slice(0, 1) for _ in shape[:2])  # the reference on one head
                for mod, fn in zip(("old", "new"), fns):
                    got = fn()[sub]
                    if args.kernel == "attention":
                        ref = reference.attention(q[sub], k[sub], v[sub], causal=causal)[0]
                    else:
                        ref = reference.scores(q[sub], k[sub], causal=causal)
                    err = reference.relative_error(got, ref)
                    tol = 1e-5 if dtype == "float32" else 1e-12
                    if not err <= tol:
                        raise SystemExit(f"{mod} wrong at {dtype} {shape} causal={causal}: {err}")
                flops = (4 if args.kernel == "attention" else 2) * np.prod(shape) * shape[2]
                flops = flops / 2 if causal else flops
                probs.append((f"{dtype} {'x'.join(map(str, shape))} causal={causal}", flops, fns))
    res = {label: ([], []) for label, _, _ in probs}
    for r in range(args.rounds):
        for label, _, fns in probs:
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                res[label][i].append(
                    _time(fns[i], args.calls, clock) / (nthreads if args.cpu_time else 1)
                )
        print(f"round {r + 1} done", file=sys.stderr, flush=True)
    what = "CPU time / threads" if args.cpu_time else "wall time"
    print(
        f"{args.kernel}: {args.rounds} alternated rounds in one process, {nthreads} "
        f"threads, {what}, medians"
    )
    print(
        f"{'problem':36} {'old ms':>8} {'new ms':>8} {'old/new':>7} {'range':>11} {'new GF/s':>8}"
    )
    for label, flops, _ in probs:
        to, tn = res[label]
        ratios = [a / b for a, b in zip(to, tn)]
        print(
            f"{label:36} {1e3 * statistics.median(to):8.2f} {1e3 * statistics.median(tn):8.2f} "
            f"{statistics.median(ratios):7.2f} {min(ratios):5.2f}-{max(ratios):5.2f} "
            f"{flops / statistics.median(tn) / 1e9:8.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
