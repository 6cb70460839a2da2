"""Same-process A/B of the CPU softmax kernel against an older commit's, with
the streaming bandwidth measured in the same rounds.

Usage::

    NUMBA_NUM_THREADS=2 PYTHONPATH=. python scripts/softmax_ab.py [--old REV] \\
        [--rounds 30] float64:1,8,2048,2048 float32:4,8,512,512 ...

The old ``_softmax_impl`` is taken from ``git show REV:numbattn/cpu/kernels.py``
(default ``HEAD``) and compiled here exactly as the package compiles its own
(:class:`numbattn.cpu.dispatch.OneLayoutKernel`: one 'A'-layout, read-only-x
specialisation; its helpers are the current module's). Each round times, in
an order rotated from round to round: ``stream`` (``np.multiply(x, 1, out=y)``
over 128 MiB, one chunk per thread, as ``python -m numbattn bench``'s
ceiling), both kernels into a preallocated output (``out``) and both with a
new output each call (``alloc``). Printed per case: medians, GB/s (2 x bytes
of x), the median over rounds of the fraction of the same round's stream,
and the median per-round time ratio new / old. Each kernel is checked
against numbattn.reference first.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

import numbattn
from numbattn.cpu import kernels as K
from numbattn.cpu.args import SoftmaxArgs
from numbattn.cpu.dispatch import OneLayoutKernel

HEAD = "@njit(**_OPTS)\ndef _softmax_impl(x, out):"
NEXT = "@njit(**_OPTS)\ndef _attention_impl("


def old_kernel(rev: str) -> OneLayoutKernel:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(
        ["git", "-C", root, "show", f"{rev}:numbattn/cpu/kernels.py"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    body = src[src.index(HEAD) : src.index(NEXT)].replace(HEAD, "def _old_softmax_impl(x, out):")
    ns = dict(vars(K))
    # The old module's constants (e.g. ones since removed), as the old kernel saw them.
    for line in src.splitlines():
        if re.match(r"_[A-Z][A-Z0-9_]* = [-0-9.e+x<() ]+$", line):
            exec(line, ns)
    exec(body, ns)
    fn = numba.njit(parallel=True, nogil=True, fastmath=False)(ns["_old_softmax_impl"])
    return OneLayoutKernel(fn, SoftmaxArgs, {})


def case(old, dtype: str, shape: tuple[int, ...], rounds: int) -> None:
    dt = np.dtype(dtype)
    x = (np.random.default_rng(0).standard_normal(shape) * 3).astype(dt)
    out = np.empty_like(x)
    x3 = x.reshape(-1, shape[-2], shape[-1])
    o3 = out.reshape(x3.shape)
    new = K.softmax_kernel
    m = (128 << 20) // dt.itemsize
    xs, ys, one = np.ones(m, dt), np.empty(m, dt), dt.type(1)
    t = numba.get_num_threads()
    pool = ThreadPoolExecutor(t)
    bounds = [(i * m // t, (i + 1) * m // t) for i in range(t)]

    def part(r):
        np.multiply(xs[r[0] : r[1]], one, out=ys[r[0] : r[1]])

    def alloc(kernel):
        def run():
            o = np.empty_like(x3)
            kernel(x3, o)
            return o

        return run

    fns = {
        "stream": lambda: list(pool.map(part, bounds)),
        "old out": lambda: old(x3, o3),
        "new out": lambda: new(x3, o3),
        "old alloc": alloc(old),
        "new alloc": alloc(new),
    }
    ref = numbattn.reference.softmax(x3)
    for name in ("old", "new"):
        out[...] = np.nan
        fns[f"{name} out"]()
        err = numbattn.reference.relative_error(o3, ref)
        assert err <= (1e-12 if dt == np.float64 else 1e-5), (name, err)
    del ref
    ts: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for k in keys:
        fns[k]()  # warm-up
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            if k == "stream":
                # Numba's pool spins up to ~25 ms after a kernel call; a stream
                # sample beside it read 20-23 GB/s against 26-29 after a wait,
                # which inflated the fractions by 1.2-1.4x.
                time.sleep(0.05)
            t0 = time.perf_counter()
            fns[k]()
            ts[k].append(time.perf_counter() - t0)
    sb = 2 * m * dt.itemsize
    pool.shutdown()
    print(f"{dtype} {shape}, {t} threads, {rounds} rounds (order rotated):")
    for k, v in ts.items():
        b = sb if k == "stream" else 2 * x.nbytes
        frac = statistics.median((b / a) / (sb / s) for a, s in zip(v, ts["stream"]))
        line = f"  {k:10s} {statistics.median(v) * 1e3:8.2f} ms {b / statistics.median(v) / 1e9:6.1f} GB/s"
        line += f"  of stream {frac:5.0%}"
        if k.startswith("new"):
            o = ts[k.replace("new", "old")]
            line += f"  new/old time {statistics.median(a / c for a, c in zip(v, o)):.2f}"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="HEAD", help="git revision of the old kernel")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("cases", nargs="+", metavar="DTYPE:B,H,N,N")
    args = ap.parse_args()
    old = old_kernel(args.old)
    for spec in args.cases:
        dtype, shp = spec.split(":")
        case(old, dtype, tuple(int(s) for s in shp.split(",")), args.rounds)


if __name__ == "__main__":
    main()
