"""Old vs new ``numbattn.scores`` (CPU, ``out=`` preallocated) alternated in
ONE process, rated against the GEMM rate of the same run.

Usage::

    python scripts/ab_scores.py OLD_TREE [--rounds 7] [--calls 3]
        [--dtype float32,float64] [--shape 4,8,512,64 --shape 1,8,2048,64]
        [--causal both]

OLD_TREE is a checkout of the baseline (e.g. /work/main); its ``numbattn``
is loaded beside the new one as ``numbattn_old`` (scripts/ab_forward.py).
Each round times every problem old then new (new then old on odd rounds),
each sample the median of ``--calls`` back-to-back calls into the same
preallocated ``out``. The GEMM rate (NumPy matmul 4096^3 into an existing
C, numbattn._bench.machine_peaks, in a child process so that OpenBLAS's
threads never spin beside the kernels; with ``--threads 1 --clock cpu``:
1024^3 on one BLAS thread in this process, CPU time) is measured before
and after the rounds; the fractions use the mean of the two medians. Causal problems are
rated on half the flops (2 B H Nq Nk d / 2). Both versions are first checked
against numbattn.reference on one head.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ab_forward import _load_old


def _time(fn, calls: int, clock) -> float:
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
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--shape", action="append")
    ap.add_argument("--causal", default="both", choices=["no", "yes", "both"])
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM ceiling")
    ap.add_argument("--threads", type=int, help="Numba (and GEMM) threads; default all")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: process CPU time (steadier on a loaded machine with --threads 1)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="set numbattn.config.KNOB for the new version only (tuning)",
    )
    args = ap.parse_args()
    import numbattn
    from numbattn import _bench, reference

    old = _load_old(args.old)
    for kv in args.set:
        knob, value = kv.split("=")
        setattr(numbattn.config, knob, int(value))
    shapes = [
        tuple(int(x) for x in s.split(",")) for s in (args.shape or ["4,8,512,64", "1,8,2048,64"])
    ]
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    dtypes = args.dtype.split(",")
    import numba

    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    gemm: dict[str, list[float]] = {dt: [] for dt in dtypes}

    def ceiling():
        if args.no_gemm or (args.clock == "cpu" and threads > 1):
            return
        for dt in dtypes:
            if args.clock == "wall":
                gemm[dt].append(_bench.machine_peaks(dt, threads, min_time=0.5)["gemm"]["rate"])
                continue
            # One thread, CPU time: matmul 1024^3 in this process (a one-thread
            # BLAS has no worker threads to spin beside the kernels).
            from threadpoolctl import threadpool_limits

            n = 1024
            x, y = (rng.standard_normal((n, n)).astype(dt) for _ in range(2))
            z = np.empty((n, n), dt)
            with threadpool_limits(1, user_api="blas"):
                np.matmul(x, y, out=z)
                t = _time(functools.partial(np.matmul, x, y, out=z), 7, clock)
            gemm[dt].append(2.0 * n**3 / t / 1e9)

    rng = np.random.default_rng(0)
    probs = []
    for dtype in dtypes:
        for shape in shapes:
            q, k = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
            for causal in causals:
                fns = []
                for mod in (old, numbattn):
                    out = np.full(shape[:-1] + (shape[2],), np.nan, dtype)
                    fns.append(functools.partial(mod.scores, q, k, causal=causal, out=out))
                sub = (slice(0, 1), slice(0, 1))
                ref = reference.scores(q[sub], k[sub], causal=causal)
                for name, fn in zip(("old", "new"), fns):
                    err = reference.relative_error(fn()[sub], ref)
                    tol = 1e-5 if dtype == "float32" else 1e-12
                    if not err <= tol:
                        raise SystemExit(f"{name} wrong at {dtype} {shape} causal={causal}: {err}")
                flops = 2.0 * np.prod(shape) * shape[2]
                flops = flops / 2 if causal else flops
                label = f"{dtype} {'x'.join(map(str, shape))} causal={causal}"
                probs.append((label, dtype, flops, fns))
    ceiling()
    res = {label: ([], []) for label, _, _, _ in probs}
    for r in range(args.rounds):
        for label, _, _, fns in probs:
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                res[label][i].append(_time(fns[i], args.calls, clock))
        print(f"round {r + 1} done", file=sys.stderr, flush=True)
    ceiling()
    print(
        f"scores, out= preallocated: {args.rounds} alternated rounds in one process, "
        f"{args.calls} calls per sample, medians of {args.clock} time; {threads} threads"
    )
    for dt in dtypes:
        if gemm[dt]:
            size = "4096^3, own process" if args.clock == "wall" else "1024^3, one thread"
            print(f"GEMM {dt} {size} (before, after): " + ", ".join(f"{g:.1f}" for g in gemm[dt]))
    print(
        f"{'problem':36} {'old ms':>8} {'new ms':>8} {'old/new':>7} {'range':>11} "
        f"{'old GF/s':>8} {'new GF/s':>8} {'old %':>6} {'new %':>6}"
    )
    for label, dtype, flops, _ in probs:
        to, tn = res[label]
        ratios = [a / b for a, b in zip(to, tn)]
        ro = flops / statistics.median(to) / 1e9
        rn = flops / statistics.median(tn) / 1e9
        g = statistics.mean(gemm[dtype]) if gemm[dtype] else float("nan")
        print(
            f"{label:36} {1e3 * statistics.median(to):8.2f} {1e3 * statistics.median(tn):8.2f} "
            f"{statistics.median(ratios):7.2f} {min(ratios):5.2f}-{max(ratios):5.2f} "
            f"{ro:8.1f} {rn:8.1f} {100 * ro / g:5.0f}% {100 * rn / g:5.0f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
