"""Timing, baselines and verification behind ``python -m numbattn bench``.

Private: the command line (:mod:`numbattn.__main__`) is the interface. The asv
suites in ``benchmarks/`` do *not* import this module, because asv runs them
against old commits that do not have it; they keep their own copy of the
baselines (``benchmarks/common.py``).

Work counts
-----------
- attention: ``4*B*H*Nq*Nk*d`` floating-point operations (two matrix
  products), halved when causal;
- scores: ``2*B*H*Nq*Nk*d`` (the full score matrix is written, causal or not);
- softmax: memory-bound, so it is rated in GB/s of ``2 * elements *
  itemsize`` bytes (every element read once and written once);
- backward (``attention_backward``, from the forward's out and lse):
  ``10*B*H*Nq*Nk*d`` (five matrix products: S, dP, dV, dQ, dK), halved when
  causal. Its torch baseline is SDPA's autograd backward (``out.backward(dout)``),
  timed without the forward; it has no NumPy baseline.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .baselines import causal_mask, numpy_attention, numpy_scores, numpy_softmax
from .reference import relative_error

KERNELS = ("attention", "scores", "softmax", "backward")

#: Relative tolerance ||out - ref|| / ||ref|| against numbattn.reference.
RTOL = {"float32": 1e-5, "float64": 1e-12}
#: The same for gradients (sums over both sequence axes: more rounding).
GRAD_RTOL = {"float32": 1e-4, "float64": 1e-11}


# --------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One benchmark case. ``softmax`` runs on a (B, H, N, N) array; d unused."""

    kernel: str
    b: int
    h: int
    n: int
    d: int
    dtype: str = "float32"
    causal: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the (first) input: (B, H, N, d), or (B, H, N, N) for softmax."""
        if self.kernel == "softmax":
            return (self.b, self.h, self.n, self.n)
        return (self.b, self.h, self.n, self.d)

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.kernel == "scores":
            return (self.b, self.h, self.n, self.n)
        return self.shape

    @property
    def label(self) -> str:
        causal = " causal" if self.causal else ""
        shape = "x".join(map(str, self.shape))
        return f"{self.kernel} {self.dtype} {shape}{causal}"

    def work(self) -> tuple[float, str]:
        """(amount, unit): floating-point operations, or bytes for softmax."""
        b, h, n, d = self.b, self.h, self.n, self.d
        if self.kernel == "attention":
            flops = 4.0 * b * h * n * n * d
            return (flops / 2 if self.causal else flops), "GFLOP/s"
        if self.kernel == "scores":
            return 2.0 * b * h * n * n * d, "GFLOP/s"
        if self.kernel == "backward":
            flops = 10.0 * b * h * n * n * d
            return (flops / 2 if self.causal else flops), "GFLOP/s"
        return 2.0 * b * h * n * n * np.dtype(self.dtype).itemsize, "GB/s"


def default_problems() -> list[Problem]:
    """The default problem set: about a minute on 2 cores after compilation."""
    out = []
    for b, h, n, d in ((1, 8, 2048, 64), (4, 8, 512, 64)):
        for causal in (False, True):
            out.append(Problem("attention", b, h, n, d, "float32", causal))
    for b, h, n, d in ((1, 8, 2048, 64), (4, 8, 512, 64)):
        for causal in (False, True):
            out.append(Problem("backward", b, h, n, d, "float32", causal))
    out.append(Problem("scores", 4, 8, 512, 64, "float32"))
    out.append(Problem("softmax", 4, 8, 512, 64, "float32"))
    return out


def quick_problems() -> list[Problem]:
    """CI-sized problems: both dtypes, both causal settings, multi-tile sizes."""
    out = []
    for dtype in ("float32", "float64"):
        for causal in (False, True):
            out.append(Problem("attention", 2, 2, 160, 32, dtype, causal))
        out.append(Problem("scores", 2, 2, 160, 32, dtype, True))
        out.append(Problem("softmax", 2, 2, 160, 32, dtype))
        out.append(Problem("backward", 2, 2, 160, 32, dtype, True))
    return out


def build_problems(
    kernels: Iterable[str],
    shapes: Iterable[tuple[int, int, int, int]],
    dtypes: Iterable[str],
    causals: Iterable[bool],
) -> list[Problem]:
    """Cartesian product; softmax ignores ``causal`` (one case per shape)."""
    out: list[Problem] = []
    for kernel in kernels:
        for b, h, n, d in shapes:
            for dtype in dtypes:
                for causal in (False,) if kernel == "softmax" else causals:
                    p = Problem(kernel, b, h, n, d, dtype, causal)
                    if p not in out:
                        out.append(p)
    return out


def make_inputs(p: Problem, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Host inputs: (q, k, v), (q, k) or (x,), standard normal, C-contiguous;
    for backward (q, k, v, out, lse, dout), out and lse from numbattn's CPU
    forward."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(p.dtype)
    if p.kernel == "softmax":
        return ((rng.standard_normal(p.shape) * 4.0).astype(dt),)
    if p.kernel == "backward":
        import numbattn

        q, k, v, dout = (rng.standard_normal(p.shape).astype(dt) for _ in range(4))
        lse = np.empty(p.shape[:-1], dt)
        out = numbattn.attention(q, k, v, scale=scale_of(p), causal=p.causal, lse=lse)
        return q, k, v, out, lse, dout
    count = 3 if p.kernel == "attention" else 2
    return tuple(rng.standard_normal(p.shape).astype(dt) for _ in range(count))


def scale_of(p: Problem) -> float:
    return 1.0 / math.sqrt(p.d)


# --------------------------------------------------------------------------
# Baselines (correct, batched; same semantics as numbattn.reference)
# --------------------------------------------------------------------------


def _torch():
    try:
        import torch
    except Exception:  # any import failure means "no torch"
        return None
    return torch


def torch_fns(torch) -> dict[str, Callable]:
    """torch equivalents on tensors (SDPA for attention)."""
    import torch.nn.functional as F

    def t_attention(q, k, v, scale, causal=False):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    def t_scores(q, k, scale, causal=False):
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if causal:
            nq, nk = q.shape[-2], k.shape[-2]
            mask = torch.from_numpy(~causal_mask(nq, nk)).to(s.device)
            s = s.masked_fill(mask, float("-inf"))
        return s

    def t_softmax(x):
        return torch.softmax(x, dim=-1)

    def t_backward(q, k, v, out, lse, dout, scale, causal=False):
        """SDPA's autograd backward; ``prepare`` runs the (untimed) forward."""
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        graph: list = []

        def prepare():
            for x in leaves:
                x.grad = None
            graph[:] = [t_attention(leaves[0], leaves[1], leaves[2], scale, causal)]

        def run():
            graph.pop().backward(dout)
            return tuple(x.grad for x in leaves)

        run.prepare = prepare  # type: ignore[attr-defined]
        return run

    return {
        "attention": t_attention,
        "scores": t_scores,
        "softmax": t_softmax,
        "backward": t_backward,
    }


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


rel_err = relative_error


def reference_outputs(p: Problem, inputs) -> list[np.ndarray]:
    """float64 reference, one (B, H) slice at a time (bounded memory)."""
    from . import reference

    scale = scale_of(p)
    if p.kernel == "backward":
        q, k, v, _, _, dout = inputs
        grads = [np.empty(a.shape, np.float64) for a in (q, k, v)]
        for bi in range(p.b):
            for hi in range(p.h):
                g = reference.attention_backward(
                    q[bi, hi], k[bi, hi], v[bi, hi], dout[bi, hi], scale=scale, causal=p.causal
                )
                for dst, src in zip(grads, g):
                    dst[bi, hi] = src
        return grads
    refs = [np.empty(p.out_shape, np.float64)]
    if p.kernel == "attention":
        refs.append(np.empty(p.shape[:-1], np.float64))
    for bi in range(p.b):
        for hi in range(p.h):
            args = [a[bi, hi] for a in inputs]
            if p.kernel == "attention":
                o, lse = reference.attention(*args, scale=scale, causal=p.causal)
                refs[0][bi, hi], refs[1][bi, hi] = o, lse
            elif p.kernel == "scores":
                refs[0][bi, hi] = reference.scores(*args, scale=scale, causal=p.causal)
            else:
                refs[0][bi, hi] = reference.softmax(*args)
    return refs


# --------------------------------------------------------------------------
# Backends: how to hold arrays, call numbattn, and time a call
# --------------------------------------------------------------------------


class CpuBackend:
    name = "cpu"

    def to_device(self, a: np.ndarray):
        return a

    def poisoned(self, shape, dtype):
        return np.full(shape, np.nan, dtype=dtype)

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    def call(self, p: Problem, args, out=None, lse=None):
        import numbattn

        scale = scale_of(p)
        if p.kernel == "attention":
            return numbattn.attention(*args, scale=scale, causal=p.causal, out=out, lse=lse)
        if p.kernel == "scores":
            return numbattn.scores(*args, scale=scale, causal=p.causal, out=out)
        if p.kernel == "backward":
            dq, dk, dv = out if out is not None else (None, None, None)
            return numbattn.attention_backward(
                *args, scale=scale, causal=p.causal, dq=dq, dk=dk, dv=dv
            )
        return numbattn.softmax(*args, out=out)

    def timed(self, fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


class CudaBackend(CpuBackend):
    """Numba device arrays on one explicit stream, timed with CUDA events."""

    name = "cuda"

    def __init__(self):
        from numba import cuda

        import numbattn

        numbattn.cuda_available()  # initialises numbattn's CUDA support
        self.cuda = cuda
        self.stream = cuda.stream()

    def to_device(self, a):
        arr = self.cuda.to_device(np.ascontiguousarray(a), stream=self.stream)
        self.stream.synchronize()
        return arr

    def poisoned(self, shape, dtype):
        return self.to_device(np.full(shape, np.nan, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        host = a.copy_to_host(stream=self.stream)
        self.stream.synchronize()
        return host

    def call(self, p: Problem, args, out=None, lse=None):
        import numbattn

        scale = scale_of(p)
        s = self.stream
        if p.kernel == "attention":
            return numbattn.attention(
                *args, scale=scale, causal=p.causal, out=out, lse=lse, stream=s
            )
        if p.kernel == "scores":
            return numbattn.scores(*args, scale=scale, causal=p.causal, out=out, stream=s)
        if p.kernel == "backward":
            dq, dk, dv = out if out is not None else (None, None, None)
            return numbattn.attention_backward(
                *args, scale=scale, causal=p.causal, dq=dq, dk=dk, dv=dv, stream=s
            )
        return numbattn.softmax(*args, out=out, stream=s)

    def timed(self, fn: Callable[[], Any]) -> float:
        """CUDA-event time of ``fn`` on the stream; wall-clock time around
        ``fn`` plus a full synchronisation where events cannot time (the
        simulator)."""
        cuda = self.cuda
        self.stream.synchronize()
        try:
            start, end = cuda.event(timing=True), cuda.event(timing=True)
            start.record(self.stream)
        except TypeError:
            start = end = None
        t0 = time.perf_counter()
        fn()
        if start is not None:
            end.record(self.stream)
            end.synchronize()
        # Work the library might have put on another stream is waited for too.
        cuda.synchronize()
        wall = time.perf_counter() - t0
        if start is None:
            return wall
        try:
            return cuda.event_elapsed_time(start, end) / 1e3
        except Exception:
            return wall


def cuda_problem() -> str | None:
    """None when CUDA can be timed here, else why not: the simulator is no
    GPU to time; otherwise :func:`numbattn.cuda_problem` decides."""
    import numbattn

    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "NUMBA_ENABLE_CUDASIM is set: Numba's CUDA simulator is not a GPU to time"
    return numbattn.cuda_problem()


class TorchRunner:
    """torch baselines on the matching device, timed like the numbattn call."""

    def __init__(self, torch, device: str, threads: int):
        self.torch = torch
        self.device = device
        self.fns = torch_fns(torch)
        if threads:
            torch.set_num_threads(threads)

    def tensors(self, host_inputs):
        t = [self.torch.from_numpy(a) for a in host_inputs]
        if self.device != "cpu":
            t = [x.to(self.device) for x in t]
            self.torch.cuda.synchronize()
        return t

    def fn(self, p: Problem, tensors):
        f = self.fns[p.kernel]
        if p.kernel == "softmax":
            return lambda: f(*tensors)
        if p.kernel == "backward":  # a callable with its untimed forward, ``prepare``
            return f(*tensors, scale_of(p), p.causal)
        return lambda: f(*tensors, scale_of(p), p.causal)

    def timed(self, fn):
        """(seconds, result) of ``fn()``; ``fn.prepare()``, where there is one
        (the backward's forward), runs first, untimed."""
        torch = self.torch
        prepare = getattr(fn, "prepare", None)
        if prepare is not None:
            prepare()
            if self.device != "cpu":
                torch.cuda.synchronize()
        if self.device == "cpu":
            t0 = time.perf_counter()
            r = fn()
            return time.perf_counter() - t0, r
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        r = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, r

    def to_host(self, t) -> np.ndarray:
        return t.detach().cpu().numpy()


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


@dataclass
class Timing:
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan


def repeat_timed(
    timed_once: Callable[[], float], *, min_time: float, min_repeat: int, max_repeat: int
) -> Timing:
    """Call ``timed_once`` (which returns one call's seconds) until at least
    ``min_repeat`` samples and ``min_time`` seconds, or ``max_repeat`` samples."""
    t = Timing()
    total = 0.0
    while len(t.times) < max_repeat and (len(t.times) < min_repeat or total < min_time):
        s = timed_once()
        t.times.append(s)
        total += s
    return t


@dataclass
class Options:
    min_time: float = 0.5
    min_repeat: int = 3
    max_repeat: int = 50
    baselines: bool = True
    threads: int = 0
    progress: Callable[[str], None] = lambda msg: None


def _rate(p: Problem, seconds: float) -> float:
    amount, _ = p.work()
    return amount / seconds / 1e9 if seconds > 0 else math.nan


def run_problem(p: Problem, backend, torch_runner: TorchRunner | None, opts: Options) -> dict:
    """Verify numbattn on ``p``, then time it and the baselines. A JSON-able dict."""
    _, unit = p.work()
    host = make_inputs(p)
    dev = [backend.to_device(a) for a in host]

    # 1. Verification (also compiles, or loads from the cache): poisoned outputs.
    backward = p.kernel == "backward"
    if backward:
        out: Any = tuple(backend.poisoned(a.shape, p.dtype) for a in host[:3])
    else:
        out = backend.poisoned(p.out_shape, p.dtype)
    lse = backend.poisoned(p.shape[:-1], p.dtype) if p.kernel == "attention" else None
    t0 = time.perf_counter()
    backend.call(p, dev, out=out, lse=lse)
    if backend.name == "cuda":
        backend.cuda.synchronize()
    first_call = time.perf_counter() - t0
    refs = reference_outputs(p, host)
    if backward:
        got = [backend.to_host(g) for g in out]
    else:
        got = [backend.to_host(out)] + ([backend.to_host(lse)] if lse is not None else [])
    err = max(rel_err(g, r) for g, r in zip(got, refs))
    tol = (GRAD_RTOL if backward else RTOL)[p.dtype]
    ok = bool(err <= tol)
    del out, lse, got, refs
    opts.progress(f"check {'ok' if ok else 'FAILED'} (rel. err {err:.2e}, tol {tol:.0e})")

    # 2. numbattn timing (public API, new output each call, as users call it).
    backend.timed(lambda: backend.call(p, dev))  # warm-up
    tm = repeat_timed(
        lambda: backend.timed(lambda: backend.call(p, dev)),
        min_time=opts.min_time,
        min_repeat=opts.min_repeat,
        max_repeat=opts.max_repeat,
    )
    rec: dict[str, Any] = {
        "kernel": p.kernel,
        "backend": backend.name,
        "dtype": p.dtype,
        "shape": list(p.shape),
        "causal": p.causal,
        "check": {"ok": ok, "rel_err": err, "tol": tol},
        "first_call_s": first_call,
        "median_s": tm.median,
        "min_s": min(tm.times),
        "repeats": len(tm.times),
        "rate": _rate(p, tm.median),
        "rate_unit": unit,
        "numpy_s": None,
        "vs_numpy": None,
        "torch_s": None,
        "vs_torch": None,
    }
    opts.progress(f"numbattn {fmt_time(tm.median)} ({rec['rate']:.2f} {unit})")
    if not opts.baselines:
        return rec

    # 3. NumPy baseline, on the host arrays (also for --device cuda).
    scale = scale_of(p)
    np_fn: Callable[[], Any] | None = None
    if p.kernel == "attention":
        np_fn = lambda: numpy_attention(host[0], host[1], host[2], scale, p.causal)  # noqa: E731
    elif p.kernel == "scores":
        np_fn = lambda: numpy_scores(host[0], host[1], scale, p.causal)  # noqa: E731
    elif p.kernel == "softmax":
        np_fn = lambda: numpy_softmax(*host)  # noqa: E731
    if np_fn is not None:
        np_fn()  # warm-up (page faults, BLAS threads)
        np_fn()
        tn = repeat_timed(
            lambda: CpuBackend().timed(np_fn),
            min_time=opts.min_time,
            min_repeat=opts.min_repeat,
            max_repeat=opts.max_repeat,
        )
        rec["numpy_s"] = tn.median
        rec["vs_numpy"] = tn.median / tm.median
        opts.progress(f"numpy {fmt_time(tn.median)}")

    # 4. torch baseline (SDPA for attention), where torch is installed.
    if torch_runner is not None:
        tensors = torch_runner.tensors(host)
        fn = torch_runner.fn(p, tensors)
        torch_runner.timed(fn)  # warm-up (thread pool, kernel selection)
        torch_runner.timed(fn)
        samples = Timing()
        total = 0.0
        while len(samples.times) < opts.max_repeat and (
            len(samples.times) < opts.min_repeat or total < opts.min_time
        ):
            s, _ = torch_runner.timed(fn)
            samples.times.append(s)
            total += s
        rec["torch_s"] = samples.median
        rec["vs_torch"] = samples.median / tm.median
        opts.progress(f"torch {fmt_time(samples.median)}")
    return rec


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def table(records: list[dict]) -> str:
    """Plain-text table; 'vs NumPy' / 'vs torch' are speed-ups (baseline time /
    numbattn time: above 1 means numbattn is faster)."""
    head = ["kernel", "backend", "dtype", "shape", "causal", "median", "rate", "vs NumPy",
            "vs torch", "check"]  # fmt: skip
    rows = [head]
    for r in records:
        rows.append(
            [
                r["kernel"],
                r["backend"],
                r["dtype"],
                "x".join(map(str, r["shape"])),
                "yes" if r["causal"] else "no",
                fmt_time(r["median_s"]),
                f"{r['rate']:.2f} {r['rate_unit']}",
                _ratio(r["vs_numpy"]),
                _ratio(r["vs_torch"]),
                "ok" if r["check"]["ok"] else f"FAIL {r['check']['rel_err']:.1e}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    right = {5, 6, 7, 8}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
