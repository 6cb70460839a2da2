"""Kernel-free premise of the paged decode (issue 11): the K and V bytes of a
(1, 8 heads, 32768, 128) float32 cache summed in the streaming decode's
order (per 256 keys: the K blocks, then the V blocks), as cache blocks of
``--block`` rows in address order or shuffled, one block at a time or two /
four blocks in lock-step (concurrent streams). Alternated in one process.

    PYTHONPATH=. python scripts/paged_read.py --block 16 [--threads 2]

One thread is timed in thread CPU time, more in process CPU time (run with
``OMP_WAIT_POLICY=passive``). Prints medians, GB/s and the ratio to the
address-ordered single stream.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import njit, prange


@njit(fastmath=True, nogil=True)
def _sum1(x, o, n):  # pragma: no cover - compiled
    a = x[o : o + n]
    s = np.float32(0)
    for i in range(a.size):
        s += a[i]
    return s


@njit(fastmath=True, nogil=True)
def _sum2(x, o0, o1, n):  # pragma: no cover - compiled
    a = x[o0 : o0 + n]
    b = x[o1 : o1 + n]
    s = t = np.float32(0)
    for i in range(n):
        s += a[i]
        t += b[i]
    return s + t


@njit(fastmath=True, nogil=True)
def _sum4(x, o0, o1, o2, o3, n):  # pragma: no cover - compiled
    a = x[o0 : o0 + n]
    b = x[o1 : o1 + n]
    c = x[o2 : o2 + n]
    d = x[o3 : o3 + n]
    s = t = u = w = np.float32(0)
    for i in range(n):
        s += a[i]
        t += b[i]
        u += c[i]
        w += d[i]
    return s + t + u + w


@njit(fastmath=True, nogil=True)
def _read(kx, vx, n, table, tile, streams):  # pragma: no cover - compiled
    s = np.float32(0)
    nb = table.size
    for t0 in range(0, nb, tile):
        t1 = min(nb, t0 + tile)
        for which in range(2):
            x = kx if which == 0 else vx
            i = t0
            while streams == 4 and i + 4 <= t1:
                s += _sum4(x, table[i] * n, table[i + 1] * n, table[i + 2] * n, table[i + 3] * n, n)
                i += 4
            while streams >= 2 and i + 2 <= t1:
                s += _sum2(x, table[i] * n, table[i + 1] * n, n)
                i += 2
            while i < t1:
                s += _sum1(x, table[i] * n, n)
                i += 1
    return s


@njit(parallel=True)
def _pread(kx, vx, n, table, tile, streams, nt):  # pragma: no cover - compiled
    per = (table.size + nt - 1) // nt
    acc = np.zeros(nt, np.float32)
    for t in prange(nt):
        acc[t] = _read(kx, vx, n, table[t * per : (t + 1) * per], tile, streams)
    return acc.sum()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    numba.set_num_threads(a.threads)
    clock = time.thread_time if a.threads == 1 else time.process_time
    nk, hk, d = 32768, 8, 128
    nb, n = nk // a.block, a.block * hk * d
    rng = np.random.default_rng(0)
    kx = rng.standard_normal(nb * n, dtype=np.float32)
    vx = rng.standard_normal(nb * n, dtype=np.float32)
    tile = max(1, 256 // a.block)
    orders = {"address order": np.arange(nb), "shuffled": rng.permutation(nb)}
    calls = {
        f"{name}, {st} at a time": (lambda t=t, st=st: _pread(kx, vx, n, t, tile, st, a.threads))
        for name, t in orders.items()
        for st in (1, 2, 4)
    }
    for f in calls.values():
        f()
    times: dict[str, list[float]] = {c: [] for c in calls}
    for _ in range(a.rounds):
        for c, f in calls.items():
            t0 = clock()
            f()
            times[c].append(clock() - t0)
    med = {c: float(np.median(t)) for c, t in times.items()}
    base = med["address order, 1 at a time"]
    print(
        f"blocks of {a.block} rows ({n * 4 // 1024} KiB), {a.threads} thread(s), {clock.__name__}"
    )
    for c in calls:
        gbs = 2 * kx.nbytes / med[c] / 1e9
        print(f"{c:28s} {med[c] * 1e3:7.2f} ms  {gbs:5.1f} GB/s  x{med[c] / base:.3f}")


if __name__ == "__main__":
    main()
