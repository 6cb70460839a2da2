"""The CPU micro-kernel against the BLAS, one core, at the fused kernel's tile shapes.

Usage::

    python scripts/microkernel.py [--rounds 21] [--calls 20]

Times ``numbattn.cpu.kernels._gemm`` (C += A @ B on packed scratch
tiles, as the fused attention kernel calls it: S = Qs @ Kt with a
CPU_QUERY_TILE x d by d x CPU_KEY_TILE product, O += P @ V with
CPU_QUERY_TILE x CPU_KEY_TILE by CPU_KEY_TILE x dv) and NumPy's ``matmul``
on one thread: at the same shapes, and at 256^3, small enough to run in one
time slice on a loaded machine, large enough for the BLAS to reach its
per-core peak. Alternated rounds in one process, each sample ``--calls``
back-to-back calls; the best sample is reported (what a core can do: on a
shared machine the other samples lose time slices). The fraction ``micro / BLAS 256^3`` bounds
what the fused kernel can reach of the GEMM rate per core; the fused kernel
itself (``numbattn.attention`` at (1, 1, 512, d), 4*N^2*d flops, one Numba
thread) is timed in the same rounds.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads its BLAS

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402

import numbattn  # noqa: E402
from numbattn import config  # noqa: E402
from numbattn.cpu import kernels as K  # noqa: E402


def _sample(fn, args: tuple, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - t0) / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    numba.set_num_threads(1)
    qt, kt = config.CPU_QUERY_TILE, config.CPU_KEY_TILE
    rng = np.random.default_rng(0)
    print(
        f"one thread; tiles {qt} query rows x {kt} keys; GF/s of the best of {args.rounds} rounds"
    )
    for dtype in ("float32", "float64"):
        n = 256
        a2 = rng.standard_normal((n, n)).astype(dtype)
        c2 = np.empty((n, n), dtype)
        cases = []
        for d in (64, 128):
            for name, (m, nn, kk) in (("S = Q Kt", (qt, kt, d)), ("O += P V", (qt, d, kt))):
                a = rng.standard_normal((m, kk)).astype(dtype)
                b = rng.standard_normal((kk, nn)).astype(dtype)
                c = np.zeros((m, nn), dtype)
                K._gemm(a, b, c, m, nn, kk, nn, kk, False)  # compile
                if not np.allclose(c, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3):
                    raise SystemExit(f"_gemm is wrong at {name} d={d}")
                cases.append((f"{name} d={d}", 2.0 * m * nn * kk, a, b, c, m, nn, kk))
        # The whole fused kernel on one thread: attention(1, 1, 512, d), 4*N^2*d flops.
        fused = []
        for d in (64, 128):
            qkv = tuple(rng.standard_normal((1, 1, 512, d)).astype(dtype) for _ in range(3))
            numbattn.attention(*qkv)  # compile / load
            fused.append((f"attention 1x1x512x{d}", 4.0 * 512 * 512 * d, qkv))
        res: dict[str, list[float]] = {"blas256": []}
        for label, *_ in cases + fused:
            res[label] = []
            res["blas " + label] = []
        for _ in range(args.rounds):
            res["blas256"].append(_sample(np.matmul, (a2, a2, c2), 5))
            for label, _, a, b, c, m, nn, kk in cases:
                gemm_args = (a, b, c, m, nn, kk, nn, kk, False)
                res[label].append(_sample(K._gemm, gemm_args, args.calls))
                res["blas " + label].append(_sample(np.matmul, (a, b), args.calls))
            for label, _, qkv in fused:  # ~1 ms calls: several short samples
                res[label] += [_sample(numbattn.attention, qkv, 1) for _ in range(5)]
        peak = 2.0 * n**3 / min(res["blas256"]) / 1e9
        print(f"{dtype}: BLAS matmul 256^3: {peak:.1f} GF/s")
        for label, flops, *_ in cases:
            micro = flops / min(res[label]) / 1e9
            blas = flops / min(res["blas " + label]) / 1e9
            print(
                f"  {label:20s} micro-kernel {micro:6.1f} GF/s ({micro / peak:4.0%} of BLAS "
                f"256^3)   BLAS same shape {blas:6.1f} GF/s"
            )
        for label, flops, _ in fused:
            rate = flops / min(res[label]) / 1e9
            print(f"  {label:20s} fused kernel {rate:6.1f} GF/s ({rate / peak:4.0%} of BLAS 256^3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
