"""How close the BLAS itself gets to its large-GEMM rate at the ``scores``
shapes (issue 12), beside ``numbattn.scores``, in ONE process.

Usage::

    PYTHONPATH=. python scripts/scores_premise.py [--threads 1] [--clock cpu]
        [--rounds 5] [--dtype float32,float64] [--shape 4,8,512,64 ...]

Each round times, in an order reversed every other round: NumPy's GEMM
(``--gemm`` cubed, into an existing C), then per shape NumPy's batched
product ``np.matmul(q, k^T, out=o)`` (OpenBLAS, one GEMM per head), the same
product head by head into one small reused output (the output write leaves
the picture: it stays in L2) and ``numbattn.scores(q, k, scale=1, out=o)``.
Every rate is divided by the GEMM rate of the same round; the medians of
these fractions are printed. BLAS and Numba run ``--threads`` threads
(threadpoolctl); with more than one, the script sleeps ``--wait`` seconds
after the BLAS calls so that OpenBLAS's spinning threads have stopped before
numbattn runs (issue 12 point 4). ``--clock cpu`` (process CPU time) is
steadier on a loaded machine, with one thread only.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="calls per sample (median)")
    ap.add_argument("--gemm", type=int, default=2048, help="edge of the square GEMM")
    ap.add_argument("--wait", type=float, default=0.3)
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--shape", action="append")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads > 1:
        raise SystemExit("--clock cpu needs --threads 1 (CPU time adds up the threads)")
    import numba
    from threadpoolctl import threadpool_limits

    import numbattn

    numba.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    shapes = [
        tuple(int(x) for x in s.split(",")) for s in (args.shape or ["4,8,512,64", "1,8,2048,64"])
    ]
    rng = np.random.default_rng(0)

    def timed(fn, calls):
        fn()
        ts = []
        for _ in range(calls):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        return statistics.median(ts)

    def settle():
        if args.threads > 1:
            time.sleep(args.wait)

    print(
        f"{args.threads} thread(s) (BLAS and Numba), {args.clock} time, {args.rounds} rounds; "
        f"fractions of the same round's GEMM {args.gemm}^3 rate, medians"
    )
    with threadpool_limits(args.threads, user_api="blas"):
        for dt in args.dtype.split(","):
            n = args.gemm
            a, b = (rng.standard_normal((n, n)).astype(dt) for _ in range(2))
            c = np.empty((n, n), dt)
            probs = []
            for shape in shapes:
                q, k = (rng.standard_normal(shape).astype(dt) for _ in range(2))
                kt = k.swapaxes(-1, -2)
                o = np.empty(shape[:3] + (shape[2],), dt)
                small = np.empty((shape[2], shape[2]), dt)

                def per_head(q=q, kt=kt, small=small):
                    for i in range(q.shape[0]):
                        for h in range(q.shape[1]):
                            np.matmul(q[i, h], kt[i, h], out=small)

                fns = {
                    "BLAS batched, out=": (True, lambda q=q, kt=kt, o=o: np.matmul(q, kt, out=o)),
                    "BLAS per head, out in L2": (True, per_head),
                    "numbattn.scores, out=": (
                        False,
                        lambda q=q, k=k, o=o: numbattn.scores(q, k, scale=1.0, out=o),
                    ),
                }
                probs.append((shape, 2.0 * np.prod(shape) * shape[2], fns))
            gemm: list[float] = []
            frac: dict[tuple, list[float]] = {}
            rate: dict[tuple, list[float]] = {}
            for r in range(args.rounds):
                g = 2.0 * n**3 / timed(functools.partial(np.matmul, a, b, out=c), 3) / 1e9
                gemm.append(g)
                for shape, flops, fns in probs:
                    items = list(fns.items())
                    if r % 2:
                        items.reverse()
                    for name, (blas, fn) in items:
                        if not blas:
                            settle()
                        x = flops / timed(fn, args.calls) / 1e9
                        rate.setdefault((shape, name), []).append(x)
                        frac.setdefault((shape, name), []).append(x / g)
            print(f"{dt}: GEMM {statistics.median(gemm):.1f} GFLOP/s (rounds " +
                  ", ".join(f"{x:.0f}" for x in gemm) + ")")  # fmt: skip
            for (shape, name), fr in frac.items():
                print(
                    f"  {'x'.join(map(str, shape)):12} {name:26} "
                    f"{statistics.median(rate[shape, name]):7.1f} GFLOP/s "
                    f"{statistics.median(fr):5.0%} of GEMM ({min(fr):.0%}-{max(fr):.0%})",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
