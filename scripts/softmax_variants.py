"""Row designs for the CPU softmax, timed in the same rounds as the streaming
bandwidth: the evidence behind the README's softmax notes (what the kernel
does, and what was tried and not kept).

Usage::

    NUMBA_NUM_THREADS=2 PYTHONPATH=. python scripts/softmax_variants.py \\
        [--dtype float32] [--shape 16384,2048] [--rounds 15] [VARIANT ...]

Each variant is a parallel kernel over the rows of a contiguous (rows, n)
array into a contiguous output, built from numbattn.cpu.kernels' own helpers:

- ``scratch`` / ``direct``: exp into a scratch row then copied scaled into
  the output / exp straight into the output row, scaled in place; both with
  the Cephes exp of the other kernels (``_vexp``).
- ``scratch_sm`` / ``direct_sm``: the same with softmax's exp (``_vexp_sm``:
  degree 5 for float32, 10 for float64). ``direct_sm`` is what
  ``numbattn.softmax`` runs on unit-stride outputs.
- ``fused_max``: the next row's max in the same loop as this row's exp (LLVM
  does not vectorise a maxnum reduction beside other work).
- ``chunked_max``: the same, alternating 128-element chunks of the two.
- ``prefetch``: software prefetch of the next row (``llvm.prefetch``, L2)
  before this row's passes.
- ``online``: one pass over DRAM per 512-element chunk (chunk max, then exp
  with the running shift), the chunks rescaled at the end.
- ``guess``: exp with the first 16 elements' max as the shift (one pass over
  DRAM), the exact max pass only when the sum shows the guess was poor.

Printed: per variant the median time, the median over rounds of the fraction
of the same round's stream (``y = x * 1`` over 128 MiB, one chunk per thread,
50 ms after the kernels so Numba's pool sleeps), and the median per-round
time ratio to ``scratch``. Each variant is checked against
numbattn.reference first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

from numbattn import reference
from numbattn.cpu import kernels as K

FM = set(K._FM)
CHUNK = 128
ONLINE_CHUNK = 512
GUESS_MAX = 2.0**60


@njit(nogil=True, fastmath=FM)
def _exps_cephes(src, dst, n, shift):
    total = src.dtype.type(0.0)
    for j in range(n):
        e = K._vexp(src[j] - shift)
        dst[j] = e
        total += e
    return total


@njit(nogil=True, fastmath=FM)
def _exps_sm(src, dst, n, shift):
    return K._exp_shift(src, dst, n, shift)


@njit(nogil=True, fastmath=FM)
def _exp_and_next_max(src, dst, n, shift, nxt):
    total = src.dtype.type(0.0)
    m = src.dtype.type(-np.inf)
    for j in range(n):
        e = K._vexp_sm(src[j] - shift)
        dst[j] = e
        total += e
        m = K._maxnum(m, nxt[j])
    return total, m


@njit(nogil=True, fastmath=FM)
def _exp_and_next_max_chunked(src, dst, n, shift, nxt):
    total = src.dtype.type(0.0)
    m = src.dtype.type(-np.inf)
    for c0 in range(0, n, CHUNK):
        cn = min(CHUNK, n - c0)
        total += K._exp_shift(src[c0:], dst[c0:], cn, shift)
        m = K._maxnum(m, K._rowmax(nxt[c0:], cn))
    return total, m


@intrinsic
def _prefetch(typingctx, arr, idx):
    """llvm.prefetch(&arr[idx], read, locality 2 (L2), data)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], fnty)
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), i8p)
        builder.call(fn, [ptr, i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True)
def _prefetch_row(x, n):
    for j in range(0, n, 64 // x.itemsize):
        _prefetch(x, j)


def make(kind: str, per: int = 8):
    """The kernel of one variant (see the module docstring)."""
    direct = kind not in ("scratch", "scratch_sm")
    sm = kind != "scratch" and kind != "direct"
    exps = _exps_sm if sm else _exps_cephes
    fused = kind in ("fused_max", "chunked_max")
    step = _exp_and_next_max if kind == "fused_max" else _exp_and_next_max_chunked
    pf = kind == "prefetch"
    online = kind == "online"
    guess = kind == "guess"
    C = ONLINE_CHUNK

    @njit(parallel=True, nogil=True)
    def kernel(x, out):
        rows, n = x.shape
        dt = x.dtype.type
        ninf = dt(-np.inf)
        for w in prange((rows + per - 1) // per):
            buf = np.empty(0 if direct else n, dtype=x.dtype)
            shifts = np.empty((n + C - 1) // C if online else 0, dtype=x.dtype)
            lo = w * per
            hi = min(rows, lo + per)
            m_next = K._rowmax(x[lo], n) if fused else ninf
            for row in range(lo, hi):
                src = x[row]
                dst = out[row] if direct else buf
                if online:
                    mrun = ninf
                    total = dt(0.0)
                    for c in range(shifts.size):
                        c0 = c * C
                        cn = min(C, n - c0)
                        mc = K._rowmax(src[c0:], cn)
                        if mc > mrun:
                            if mrun > ninf:
                                total *= K._vexp_sm(mrun - mc)
                            mrun = mc
                        shifts[c] = mrun if mrun > ninf else dt(0.0)
                        total += K._exp_shift(src[c0:], dst[c0:], cn, shifts[c])
                    inv = dt(1.0) / total
                    for c in range(shifts.size):
                        c0 = c * C
                        K._scale_row(dst[c0:], min(C, n - c0), inv * K._vexp_sm(shifts[c] - mrun))
                    continue
                if pf and row + 1 < hi:
                    _prefetch_row(x[row + 1], n)
                ok = False
                total = dt(0.0)
                if guess:
                    c = K._rowmax(src, min(n, 16))
                    if ninf < c < dt(np.inf):
                        total = exps(src, dst, n, c)
                        ok = dt(1.0) <= total <= dt(GUESS_MAX)
                if not ok:
                    m = m_next if fused else K._rowmax(src, n)
                    shift = m if m > ninf else dt(0.0)
                    if fused and row + 1 < hi:
                        total, m_next = step(src, dst, n, shift, x[row + 1])
                    else:
                        total = exps(src, dst, n, shift)
                inv = dt(1.0) / total
                if direct:
                    K._scale_row(dst, n, inv)
                else:
                    K._copy_scaled(buf, out[row], n, inv)

    return kernel


VARIANTS = (
    "scratch", "direct", "scratch_sm", "direct_sm",
    "fused_max", "chunked_max", "prefetch", "online", "guess",
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--shape", default="16384,2048", help="rows,n")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("variants", nargs="*", default=list(VARIANTS), metavar="VARIANT")
    args = ap.parse_args()
    dt = np.dtype(args.dtype)
    rows, n = (int(s) for s in args.shape.split(","))
    x = (np.random.default_rng(0).standard_normal((rows, n)) * 3).astype(dt)
    out = np.empty_like(x)
    ref = reference.softmax(x[None])[0]
    kernels = {}
    for v in args.variants:
        kernels[v] = make(v)
        out[...] = np.nan
        kernels[v](x, out)
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert err <= (1e-5 if dt == np.float32 else 1e-12), (v, err)
    threads = numba.get_num_threads()
    m = (128 << 20) // dt.itemsize
    sx, sy, one = np.ones(m, dt), np.empty(m, dt), dt.type(1)
    bounds = [(i * m // threads, (i + 1) * m // threads) for i in range(threads)]
    pool = ThreadPoolExecutor(threads)

    def stream() -> float:
        time.sleep(0.05)
        t0 = time.perf_counter()
        list(pool.map(lambda r: np.multiply(sx[r[0] : r[1]], one, out=sy[r[0] : r[1]]), bounds))
        return time.perf_counter() - t0

    stream()
    names = list(kernels)
    times: dict[str, list[float]] = {v: [] for v in names}
    frac: dict[str, list[float]] = {v: [] for v in names}
    st = []
    for r in range(args.rounds):
        ts = stream()
        st.append(ts)
        for v in names[r % len(names) :] + names[: r % len(names)]:
            samples = []
            for _ in range(3):
                t0 = time.perf_counter()
                kernels[v](x, out)
                samples.append(time.perf_counter() - t0)
            times[v].append(min(samples))
            frac[v].append(2 * x.nbytes / min(samples) / (2 * m * dt.itemsize / ts))
    print(
        f"{args.dtype} ({rows}, {n}), {threads} threads, {args.rounds} rounds; stream "
        f"{2 * m * dt.itemsize / statistics.median(st) / 1e9:.1f} GB/s (median)"
    )
    base = times.get("scratch")
    for v in names:
        row = f"  {v:12s} {statistics.median(times[v]) * 1e3:8.2f} ms  of stream "
        row += f"{statistics.median(frac[v]) * 100:5.1f} %"
        if base is not None:
            ratio = statistics.median(a / b for a, b in zip(times[v], base, strict=True))
            row += f"  time / scratch {ratio:.3f}"
        print(row)


if __name__ == "__main__":
    main()
