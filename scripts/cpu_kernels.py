"""Benchmark of the numbattn CPU kernels against NumPy and PyTorch.

Usage::

    python scripts/cpu_kernels.py [--repeat N] [--threads T] [--quick]
                                     [--only all|dense|options|tiny] [--skip-check]

First runs quick correctness checks of every kernel against the float64
reference (both dtypes, odd shapes, tiny tiles, causal with Nq < Nk and
Nq > Nk, non-contiguous and broadcast views, NaN/-inf), then times every
case side by side: in each repetition all implementations of a case run once,
in turn, and the table reports medians and ratios. The dense rows call the
kernels directly with the tile sizes from ``numbattn.config``; the option
rows (varlen vs a padded batch with a key mask, sliding windows vs causal and
full attention at N = 8192) go through the public API. GF/s count the
unmasked score entries of each implementation (4 * d flops per entry).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from numbattn import config
from numbattn import reference as ref
from numbattn.baselines import numpy_attention, numpy_softmax
from numbattn.cpu import kernels as K
from numbattn.reference import relative_error

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

import numbattn
from numbattn import _sequences as seqs
from numbattn.cpu import backend as BE


def _dense(q, k, causal):
    """(seq table, max_rows, window_right) of dense attention on (G1, G2, Nq, d) arrays."""
    nq, nk = q.shape[2], k.shape[2]
    table = seqs.broadcast(seqs.dense_table(nq, nk), q.shape[:2], axis0=False)
    return table, nq, (0 if causal else -1)


def attention_kernel(q, k, v, o, lse, scale, causal, qt, kt):
    """The fused kernel on dense inputs (old call convention of this script)."""
    seq, rows, right = _dense(q, k, causal)
    args = BE.attention_args(q, k, v, o, lse, seq, rows, None, None, scale, -1, right, qt, kt)
    K.attention_kernel(*args)


def scores_kernel(q, k, s, scale, causal, qt, kt):
    seq, rows, right = _dense(q, k, causal)
    args = BE.scores_args(q, k, s, seq, rows, None, None, scale, -1, right, qt, kt)
    K.scores_kernel(*args)


# ---------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------


def _make(rng, shape, dt, layout):
    if layout == "C":
        return rng.standard_normal(shape).astype(dt)
    if layout == "swap":  # (G1, N, G2, d) storage seen as (G1, G2, N, d)
        s = (shape[0], shape[2], shape[1], shape[3])
        return rng.standard_normal(s).astype(dt).swapaxes(1, 2)
    if layout == "bcast":  # stride 0 along the first batch axis, read-only
        return np.broadcast_to(rng.standard_normal((1,) + shape[1:]).astype(dt), shape)
    if layout == "step":  # every other element of the last axis
        return rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(dt)[..., ::2]
    raise ValueError(layout)


def check(verbose=False):
    rng = np.random.default_rng(1234)
    failures = []

    def expect(name, err, tol):
        if err is None or not err <= tol:
            failures.append((name, err))
        elif verbose:
            print(f"  ok {name}: {err:.2e}")

    cases = [
        # (g1, g2, nq, d), nk, dv
        ((1, 1, 1, 1), 1, 1),
        ((2, 3, 17, 5), 23, 7),  # Nq < Nk
        ((1, 2, 9, 8), 4, 8),  # Nq > Nk: first rows fully masked when causal
        ((2, 1, 33, 16), 0, 16),  # Nk = 0
        ((1, 1, 0, 4), 5, 4),  # Nq = 0
        ((1, 1, 6, 0), 7, 3),  # d = 0
        ((1, 1, 5, 3), 5, 0),  # dv = 0
        ((1, 2, 70, 64), 130, 48),
    ]
    tiles = [(config.CPU_QUERY_TILE, config.CPU_KEY_TILE), (3, 5), (1, 1)]
    for dt in (np.float32, np.float64):
        tol = 2e-6 if dt == np.float32 else 1e-13
        for (g1, g2, nq, d), nk, dv in cases:
            for layout in ("C", "swap", "bcast", "step"):
                q = _make(rng, (g1, g2, nq, d), dt, layout)
                k = _make(rng, (g1, g2, nk, d), dt, layout)
                v = _make(rng, (g1, g2, nk, dv), dt, layout)
                sc = 1.0 / math.sqrt(max(d, 1))
                for causal in (False, True):
                    rs = ref.scores(q, k, scale=sc, causal=causal)
                    ro, rl = ref.attention(q, k, v, scale=sc, causal=causal)
                    for qt, kt in tiles:
                        tag = (dt.__name__, (g1, g2, nq, d), nk, dv, layout, causal, qt, kt)
                        s = np.full((g1, g2, nq, nk), np.nan, dt)
                        scores_kernel(q, k, s, sc, causal, qt, kt)
                        expect(("scores",) + tag, relative_error(s, rs), tol)
                        o = np.full((g1, g2, nq, dv), np.nan, dt)
                        lse = np.full((g1, g2, nq), np.nan, dt)
                        attention_kernel(q, k, v, o, lse, sc, causal, qt, kt)
                        expect(("attention out",) + tag, relative_error(o, ro), tol)
                        expect(("attention lse",) + tag, relative_error(lse, rl), tol)
        # Non-contiguous outputs; NaN confined to its row; large scores.
        q = _make(rng, (2, 3, 10, 8), dt, "C")
        k = _make(rng, (2, 3, 12, 8), dt, "C")
        v = _make(rng, (2, 3, 12, 5), dt, "C")
        q[1, 2, 4, 3] = np.nan
        o = np.full((2, 10, 3, 5), np.nan, dt).swapaxes(1, 2)
        lse = np.full((3, 2, 10), np.nan, dt).transpose(1, 0, 2)
        attention_kernel(q, k, v, o, lse, 0.3, True, 3, 5)
        ro, rl = ref.attention(q, k, v, scale=0.3, causal=True)
        expect(("attention strided out + NaN row", dt.__name__), relative_error(o, ro), tol)
        expect(("attention strided lse + NaN row", dt.__name__), relative_error(lse, rl), tol)
        q = _make(rng, (1, 2, 37, 16), dt, "C") * 30
        k = _make(rng, (1, 2, 41, 16), dt, "C") * 30
        v = _make(rng, (1, 2, 41, 7), dt, "C")
        o = np.full((1, 2, 37, 7), np.nan, dt)
        lse = np.full((1, 2, 37), np.nan, dt)
        attention_kernel(q, k, v, o, lse, 0.25, False, 8, 16)
        ro, rl = ref.attention(q, k, v, scale=0.25)
        # |S| ~ 1e3 here: float32 error is dominated by the rounding of S itself.
        expect(
            ("attention |S|~1e3 out", dt.__name__),
            relative_error(o, ro),
            1e-3 if dt == np.float32 else 1e-11,
        )
        expect(("attention |S|~1e3 lse", dt.__name__), relative_error(lse, rl), tol)
        # Softmax, incl. in place, NaN and -inf rows, strided.
        for shape in [(2, 3, 17), (1, 1, 1), (3, 2, 0), (0, 2, 5), (2, 2, 300)]:
            for layout in ("C", "T", "step"):
                if layout == "C":
                    x = rng.standard_normal(shape).astype(dt) * 5
                elif layout == "T":
                    x = (rng.standard_normal(shape[::-1]).astype(dt) * 5).T
                else:
                    x = (rng.standard_normal(shape[:-1] + (2 * shape[-1],)).astype(dt) * 5)[
                        ..., ::2
                    ]
                if x.size and shape[-1] > 3:
                    x[0, 0, :] = -np.inf
                    if shape[1] > 1:
                        x[0, 1, 2] = np.nan
                    x[-1, -1, 1] = -np.inf
                    x[-1, 0, 0] = 1e4
                r = ref.softmax(x)
                out = np.full(shape, np.nan, dt)
                K.softmax_kernel(x, out)
                expect(("softmax", dt.__name__, shape, layout), relative_error(out, r), tol)
                K.softmax_kernel(x, x)
                expect(("softmax in place", dt.__name__, shape, layout), relative_error(x, r), tol)
    return failures


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


GAP = 0.2


def side_by_side(fns, repeat):
    """Median seconds of each callable; one call of each per round.

    Before every timed call the process sleeps GAP seconds: OpenBLAS (NumPy),
    torch's and Numba's OpenMP worker threads busy-wait for a while after a
    parallel region, and on 2 cores those spinning threads would otherwise
    slow down whichever library runs next (by up to 2x here).
    """
    for f in fns.values():  # warm-up (compilation, page faults)
        f()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, f in fns.items():
            time.sleep(GAP)
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


ROWS = []


def row(case, times, base, flops=None):
    t0 = times[base]
    for name, t in times.items():
        gf = f"{flops / t / 1e9:8.1f}" if flops else "       -"
        ratio = t / t0
        ROWS.append((case, name, t * 1e3, gf, ratio))
        print(
            f"{case:<38} {name:<22} {t * 1e3:10.2f} ms {gf} GF/s  {ratio:6.2f}x of {base}",
            flush=True,
        )


def bench(repeat, quick):
    qt, kt = config.CPU_QUERY_TILE, config.CPU_KEY_TILE
    sqt, skt = config.CPU_SCORES_QUERY_TILE, config.CPU_SCORES_KEY_TILE
    rng = np.random.default_rng(0)
    have_torch = torch is not None

    def attn_case(B, H, N, d, dt, causal, with_numpy=True):
        q, k, v = (rng.standard_normal((B, H, N, d)).astype(dt) for _ in range(3))
        scale = 1.0 / math.sqrt(d)
        o = np.empty_like(q)
        lse = np.empty((B, H, N), dt)
        fns = {"numbattn": lambda: attention_kernel(q, k, v, o, lse, scale, causal, qt, kt)}
        if have_torch:
            tq, tk, tv = map(torch.from_numpy, (q, k, v))
            sdpa = torch.nn.functional.scaled_dot_product_attention
            fns["torch sdpa"] = lambda: sdpa(tq, tk, tv, is_causal=causal, scale=scale)
        if with_numpy:
            fns["numpy"] = lambda: numpy_attention(q, k, v, scale, causal)
        flops = 4 * B * H * N * N * d / (2 if causal else 1)
        return side_by_side(fns, repeat), flops

    print(
        f"\nnum threads: numba {__import__('numba').get_num_threads()}, "
        f"torch {torch.get_num_threads() if have_torch else '-'}; tiles q={qt} k={kt}; "
        f"median of {repeat}\n"
    )
    sizes = [(1, 8, 2048, 64), (4, 8, 512, 64)]
    causal_ratio = []
    for B, H, N, d in sizes:
        tn, fl = attn_case(B, H, N, d, np.float32, False)
        row(f"attention f32 {(B, H, N, d)}", tn, "numbattn", fl)
        tc, flc = attn_case(B, H, N, d, np.float32, True)
        row(f"attention f32 causal {(B, H, N, d)}", tc, "numbattn", flc)
        # causal vs non-causal measured side by side in one loop
        q, k, v = (rng.standard_normal((B, H, N, d)).astype(np.float32) for _ in range(3))
        o = np.empty_like(q)
        lse = np.empty((B, H, N), np.float32)
        pair = side_by_side(
            {
                c: (
                    lambda c=c, q=q, k=k, v=v, o=o, lse=lse: attention_kernel(
                        q, k, v, o, lse, 0.125, c, qt, kt
                    )
                )
                for c in (False, True)
            },
            repeat,
        )
        causal_ratio.append(((B, H, N, d), pair[True] / pair[False], pair))
    for shape, r, pair in causal_ratio:
        print(
            f"causal / non-causal time {shape}: {r:.2f} "
            f"({pair[True] * 1e3:.2f} ms / {pair[False] * 1e3:.2f} ms, side by side)"
        )

    t64, fl = attn_case(1, 8, 2048, 64, np.float64, False, with_numpy=not quick)
    row("attention f64 (1, 8, 2048, 64)", t64, "numbattn", fl)

    # scores
    q, k = (rng.standard_normal((1, 8, 2048, 64)).astype(np.float32) for _ in range(2))
    s = np.empty((1, 8, 2048, 2048), np.float32)
    fns = {
        "numbattn": lambda s=s: scores_kernel(q, k, s, 0.125, False, sqt, skt),
        "numpy matmul*scale": lambda: np.matmul(q, k.swapaxes(-1, -2)) * 0.125,
    }
    row(
        "scores f32 (1, 8, 2048, 64)",
        side_by_side(fns, repeat),
        "numbattn",
        2 * 8 * 2048 * 2048 * 64,
    )
    del s

    # softmax
    x = rng.standard_normal((8, 2048, 2048)).astype(np.float32)
    y = np.empty_like(x)
    fns = {
        "numbattn": lambda x=x, y=y: K.softmax_kernel(x, y),
        "numpy": lambda x=x: numpy_softmax(x),
    }
    row("softmax f32 (8, 2048, 2048)", side_by_side(fns, repeat), "numbattn")
    del x, y
    # Peak memory: scripts/peak_memory.py (fresh processes; an RSS reading here would
    # reuse memory freed by the earlier calls).


def bench_options(repeat):
    """Sequence-table options: varlen vs padded-with-a-mask, windows vs full."""
    rng = np.random.default_rng(1)
    have_torch = torch is not None

    # Varlen: B sequences with lengths uniform in [N/8, N], vs the padded batch.
    B, H, N, d = 8, 8, 2048, 64
    # Evenly spaced quantiles of the uniform distribution on [N/8, N].
    lens = np.round(N / 8 + (np.arange(B) + 0.5) / B * (N - N / 8)).astype(np.int64)
    print(f"varlen lengths: {lens.tolist()}")
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    t = int(cu[-1])
    q, k, v = (rng.standard_normal((t, H, d)).astype(np.float32) for _ in range(3))
    pq, pk, pv = (np.zeros((B, H, N, d), np.float32) for _ in range(3))
    for b in range(B):
        for src, dst in ((q, pq), (k, pk), (v, pv)):
            dst[b, :, : lens[b]] = src[cu[b] : cu[b + 1]].swapaxes(0, 1)
    key_mask = (np.arange(N)[None, :] < lens[:, None])[:, None, None, :]  # (B, 1, 1, N)
    out = np.empty((t, H, d), np.float32)
    pout = np.empty((B, H, N, d), np.float32)
    for causal in (False, True):
        fns = {
            "numbattn varlen": lambda c=causal: numbattn.varlen_attention(
                q, k, v, cu, cu, causal=c, out=out
            ),
            "numbattn padded+mask": lambda c=causal: numbattn.attention(
                pq, pk, pv, causal=c, mask=key_mask, out=pout
            ),
            "numbattn padded+lengths": lambda c=causal: numbattn.attention(
                pq, pk, pv, causal=c, key_lengths=lens, query_lengths=lens, out=pout
            ),
        }
        if have_torch and not causal:
            tq, tk, tv = map(torch.from_numpy, (pq, pk, pv))
            tm = torch.from_numpy(key_mask)
            fns["torch sdpa padded+mask"] = lambda tq=tq, tk=tk, tv=tv, tm=tm: (
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm)
            )
        times = side_by_side(fns, repeat)
        # Work on the entries each implementation leaves unmasked.
        full = lens.astype(np.float64) ** 2 if not causal else lens * (lens + 1) / 2.0
        flops = {name: 4 * H * d * full.sum() for name in fns}
        padded = (N * lens).astype(np.float64)
        if causal:  # key mask + causal: query i sees keys <= i among the first len
            padded = np.array([sum(min(i + 1, n) for i in range(N)) for n in lens], np.float64)
        for name in fns:
            if "mask" in name:
                flops[name] = 4 * H * d * padded.sum()
        ref_o = pout.copy()
        numbattn.varlen_attention(q, k, v, cu, cu, causal=causal, out=out)
        numbattn.attention(
            pq, pk, pv, causal=causal, key_lengths=lens, query_lengths=lens, out=ref_o
        )
        for b in range(B):
            err = np.abs(out[cu[b] : cu[b + 1]] - ref_o[b, :, : lens[b]].swapaxes(0, 1)).max()
            assert err < 1e-4, err
        tag = "causal " if causal else ""
        row_multi(f"varlen f32 {tag}B={B} H={H} N={N} d={d}", times, "numbattn varlen", flops)

    # Windowed and causal vs full attention at N = 8192.
    B, H, N, d = 1, 4, 8192, 64
    q, k, v = (rng.standard_normal((B, H, N, d)).astype(np.float32) for _ in range(3))
    o = np.empty_like(q)
    i = np.arange(N)
    fns = {
        "window (256, 0)": lambda: numbattn.attention(q, k, v, window=(256, 0), out=o),
        "window (128, 128)": lambda: numbattn.attention(q, k, v, window=(128, 128), out=o),
        "causal": lambda: numbattn.attention(q, k, v, causal=True, out=o),
        "full": lambda: numbattn.attention(q, k, v, out=o),
    }
    seen = {
        "window (256, 0)": np.minimum(i + 1, 257).sum(),
        "window (128, 128)": (np.minimum(i + 128, N - 1) - np.maximum(i - 128, 0) + 1).sum(),
        "causal": (i + 1).sum(),
        "full": N * N,
    }
    flops = {name: 4.0 * B * H * d * seen[name] for name in fns}
    row_multi(
        f"window f32 B={B} H={H} N={N} d={d}", side_by_side(fns, repeat), "window (256, 0)", flops
    )
    print(
        "  (time / unmasked entries, relative to full: "
        + ", ".join(
            f"{n} {ROWS[-len(fns) + j][2] / seen[n] / (ROWS[-1][2] / seen['full']):.2f}"
            for j, n in enumerate(fns)
        )
        + ")"
    )


def bench_tiny(repeat):
    """Batches of short sequences (one head, d = 64, float32) through the
    public API: where numbattn's fixed cost per work item (one query tile of
    one sequence) meets NumPy's batched matmuls."""
    rng = np.random.default_rng(0)
    d = 64

    def case(b, n):
        q, k, v = (rng.standard_normal((b, n, d), dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        scale = np.float32(1 / math.sqrt(d))
        fns = {
            "numbattn": lambda: numbattn.attention(q, k, v, out=out),
            "numpy": lambda: numpy_attention(q, k, v, scale, False),
        }
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            fns["torch"] = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        row(f"tiny B={b} N={n} d={d}", side_by_side(fns, repeat), "numbattn", 4 * b * n * n * d)

    for b, n in ((100000, 1), (25000, 4), (6250, 16), (3125, 32), (1562, 64), (390, 256)):
        case(b, n)


def row_multi(case, times, base, flops):
    """As row(), with per-implementation FLOP counts (unmasked entries)."""
    t0 = times[base]
    for name, t in times.items():
        gf = f"{flops[name] / t / 1e9:8.1f}"
        ROWS.append((case, name, t * 1e3, gf, t / t0))
        print(
            f"{case:<38} {name:<24} {t * 1e3:10.2f} ms {gf} GF/s  {t / t0:6.2f}x of {base}",
            flush=True,
        )


def main():
    global GAP
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="skip the float64 NumPy baseline")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--gap", type=float, default=GAP, help="idle seconds before each timed call")
    ap.add_argument(
        "--only",
        choices=("all", "dense", "options", "tiny"),
        default="all",
        help="dense: the original rows; options: varlen / window rows; "
        "tiny: batches of short sequences against NumPy",
    )
    args = ap.parse_args()
    GAP = args.gap
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    if torch is not None:
        torch.set_num_threads(args.threads)
    if not args.skip_check:
        t0 = time.perf_counter()
        failures = check()
        print(f"correctness checks: {len(failures)} failures ({time.perf_counter() - t0:.1f} s)")
        for f in failures[:20]:
            print("  FAIL", f)
        if failures:
            sys.exit(1)
    if args.only in ("all", "dense"):
        bench(args.repeat, args.quick)
    if args.only in ("all", "options"):
        bench_options(args.repeat)
    if args.only in ("all", "tiny"):
        bench_tiny(args.repeat)


if __name__ == "__main__":
    main()
