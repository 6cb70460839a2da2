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

Ceilings, sampled in the same rounds as each kernel
---------------------------------------------------
This host's speed moves by 1.4-1.7x between minutes, so a ceiling measured
once and a kernel timed minutes later do not make a fraction. On the CPU
each row is timed in rounds (:func:`rounds_timed`; ``Options.rounds``, CLI
``--rounds``, default 3): a round is the kernel's samples (about
``min_time / rounds`` seconds of each timing), then one sample of the
ceiling for the row's dtype (:class:`Ceilings`):

- GFLOP/s rows (attention, scores, backward): the GEMM rate, 2 n**3 flop of
  NumPy's ``np.matmul(a, b, out=c)`` with n x n matrices (n = 4096;
  ``--peak-size``), in a persistent worker process (:class:`GemmWorker`,
  started once and pre-warmed; it answers one request per round over a
  pipe). OpenBLAS's threads spin ~0.1 s after each call and slowed a
  numbattn call beside them by 35-45 %, so the two never share a process,
  and the bench waits :data:`NUMBA_SPIN_S` after the kernel (Numba's pool
  asleep) and :data:`BLAS_SPIN_S` after the matmul (the worker's threads
  asleep). One matmul takes 0.7 s (float32) or 1.3 s (float64) here (quiet), hence
  3 rounds by default: a row costs 2-4 s more than a single timing.
- GB/s rows (softmax): the streaming bandwidth, ``y = x * 1`` over 128 MiB
  arrays into an existing one, bytes read + written, on a ThreadPoolExecutor
  in the bench process (no BLAS; its idle threads block, not spin), after
  :data:`NUMBA_SPIN_S`; 3x as many rounds (a sample takes ~10 ms).

``of_peak`` is the median over rounds of (the kernel's rate in the round, from
the median of its rated samples there) / (the ceiling's rate in the same
round) (:func:`round_fractions`); ``ceiling_rate`` is the ceiling's median
over the row's rounds, ``of_peak_rounds`` each round's fraction, and
``peaks`` (:meth:`Ceilings.summary`) each ceiling's median over the whole
run. ``median_s`` pools the kernel's samples of all rounds. The baselines
(NumPy, torch) are timed after the rounds, each after ``settle``, as before.

Two timings of scores and softmax
---------------------------------
Their output is an N x N array per head (134 MB at (1, 8, 2048, 2048)
float64). A new output each call costs the kernel the first touch of fresh
pages (page faults, and the operating system zeroing them: a third memory
pass), while the ceilings write into existing arrays. So scores and
softmax are timed both ways (:data:`OUT_GIVEN`): first into ``out=`` in
the rounds with the ceiling, then, after a settle, with a new output each
call (not alternated with the first: the new outputs' page faults and
memory compaction spilled into the ``out=`` samples):

- ``median_s``: into a preallocated ``out=``, like the ceilings; ``rate`` and
  ``of_peak`` use it;
- ``new_out_s``: a new output each call, as the NumPy and torch baselines
  allocate theirs; ``vs_numpy`` and ``vs_torch`` use it.

attention and backward allocate their (N x d) outputs each call: for them
``median_s`` and ``new_out_s`` are the same timing (``out_given`` false).
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
#: Kernels (N x N outputs) also timed into a preallocated ``out=``; see the docstring.
OUT_GIVEN = ("scores", "softmax")

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


def alternated_timed(
    timed_once: list[Callable[[], float]], *, min_time: float, min_repeat: int, max_repeat: int
) -> list[Timing]:
    """:func:`repeat_timed` for several calls in turn, one sample of each per
    round (after one warm-up call each), so that a change of load on the
    machine hits them alike; each gets about ``min_time`` seconds."""
    for fn in timed_once:
        fn()
    ts = [Timing() for _ in timed_once]
    total = 0.0
    while len(ts[0].times) < max_repeat and (
        len(ts[0].times) < min_repeat or total < min_time * len(timed_once)
    ):
        for fn, t in zip(timed_once, ts):
            s = fn()
            t.times.append(s)
            total += s
    return ts


@dataclass
class Rounds:
    """Samples taken in rounds (:func:`rounds_timed`): ``calls[i][r]`` holds
    call i's seconds in round r, ``ceiling[r]`` the ceiling's seconds in
    round r (one sample, taken right after the calls' samples)."""

    calls: list[list[list[float]]]
    ceiling: list[float]

    def timing(self, i: int) -> Timing:
        """Call i's samples of every round, pooled."""
        return Timing([s for rnd in self.calls[i] for s in rnd])


def rounds_timed(
    timed_once: list[Callable[[], float]],
    ceiling_once: Callable[[], float],
    *,
    rounds: int,
    min_time: float,
    min_repeat: int,
    max_repeat: int,
) -> Rounds:
    """:func:`alternated_timed` cut into ``rounds`` rounds, each closed by one
    sample of the ceiling (``ceiling_once``: one sample's seconds; it waits
    for other thread pools itself), so that each round's kernel samples and
    ceiling sample meet the same load on a shared machine. After one warm-up
    call of each ``timed_once``, a round takes one sample of each in turn
    until it has ``ceil(min_repeat / rounds)`` samples each and about
    ``min_time / rounds`` seconds of each, or ``max(1, max_repeat // rounds)``
    samples each."""
    rounds = max(1, int(rounds))
    for fn in timed_once:
        fn()
    per_min = max(1, -(-min_repeat // rounds))
    per_max = max(1, max_repeat // rounds)
    budget = min_time * len(timed_once) / rounds
    out = Rounds([[] for _ in timed_once], [])
    for _ in range(rounds):
        got: list[list[float]] = [[] for _ in timed_once]
        total = 0.0
        while len(got[0]) < per_max and (len(got[0]) < per_min or total < budget):
            for fn, g in zip(timed_once, got):
                s = fn()
                g.append(s)
                total += s
        for i, g in enumerate(got):
            out.calls[i].append(g)
        out.ceiling.append(ceiling_once())
    return out


def round_fractions(
    work: float, kernel_rounds: list[list[float]], ceiling_work: float, ceiling_s: list[float]
) -> list[float]:
    """Per round: the kernel's rate (``work`` over the median of its samples in
    that round) over the ceiling's rate in that round (``ceiling_work`` over
    its sample). The units cancel: both works in flop, or both in bytes."""
    return [
        (work / statistics.median(ks)) / (ceiling_work / cs)
        for ks, cs in zip(kernel_rounds, ceiling_s)
    ]


@dataclass
class Options:
    min_time: float = 0.5
    min_repeat: int = 3
    max_repeat: int = 50
    baselines: bool = True
    threads: int = 0
    progress: Callable[[str], None] = lambda msg: None
    #: Seconds to wait before timing each implementation, so that the thread
    #: pool of whatever ran before (OpenBLAS spins ~0.1 s after each call)
    #: is asleep; see docs/threads.md, "Using numbattn beside NumPy and PyTorch".
    settle: float = 0.3
    #: The machine's ceilings, sampled in the same rounds as each kernel
    #: (None: no "of peak" fraction; the CPU backend only).
    ceilings: Ceilings | None = None
    #: Rounds of a row rated against the GEMM (one 4096^3 matmul each); rows
    #: rated against the stream (a 10 ms sample) take STREAM_ROUNDS_PER times as many.
    rounds: int = 3


#: Rounds of a stream-rated row (softmax) per ``Options.rounds``.
STREAM_ROUNDS_PER = 3


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
    time.sleep(opts.settle)  # the reference ran on NumPy's BLAS threads

    # 2. numbattn timing (public API): a new output each call, as users and
    # the baselines call it; scores and softmax into a preallocated out=
    # (the figure rated against the ceilings, which write into existing
    # arrays), then, after a settle, also with a new output each call. Not
    # alternated call by call: the fresh (B, H, N, N) outputs' page faults
    # (and, with transparent huge pages in madvise mode, the kernel's memory
    # compaction) spilled into the out= samples; the first softmax row after
    # the scores rows read 67 % of the stream with a new-output time of 37 ms
    # against 4-6 ms in the runs around it.
    out_given = p.kernel in OUT_GIVEN
    new_call: Callable[[], Any] = lambda: backend.call(p, dev)  # noqa: E731
    calls: list[Callable[[], Any]] = [new_call]
    if out_given:
        buf = backend.poisoned(p.out_shape, p.dtype)
        calls = [lambda: backend.call(p, dev, out=buf)]

    def timed(call: Callable[[], Any]) -> Callable[[], float]:
        return lambda: backend.timed(call)

    # With the ceilings, in rounds: each round's samples end with one sample
    # of the ceiling, and "of peak" is the median over rounds of the kernel's
    # rate in the round over the ceiling's rate in the same round.
    ceiling = None
    if opts.ceilings is not None and backend.name == "cpu":
        ceiling = opts.ceilings.get(p.dtype, "stream" if unit == "GB/s" else "gemm")
    rounds: Rounds | None = None
    if ceiling is None:
        timings = alternated_timed(
            [timed(c) for c in calls],
            min_time=opts.min_time,
            min_repeat=opts.min_repeat,
            max_repeat=opts.max_repeat,
        )
    else:
        per = STREAM_ROUNDS_PER if ceiling.kind == "stream" else 1
        rounds = rounds_timed(
            [timed(c) for c in calls],
            ceiling.sample,
            rounds=opts.rounds * per,
            min_time=opts.min_time,
            min_repeat=opts.min_repeat,
            max_repeat=opts.max_repeat,
        )
        timings = [rounds.timing(i) for i in range(len(calls))]
    tm = t_new = timings[0]
    if out_given:
        del buf
        time.sleep(opts.settle)
        t_new = repeat_timed(
            timed(new_call),
            min_time=opts.min_time,
            min_repeat=opts.min_repeat,
            max_repeat=opts.max_repeat,
        )
    del calls
    rec: dict[str, Any] = {
        "kernel": p.kernel,
        "backend": backend.name,
        "dtype": p.dtype,
        "shape": list(p.shape),
        "causal": p.causal,
        "check": {"ok": ok, "rel_err": err, "tol": tol},
        "first_call_s": first_call,
        "out_given": out_given,
        "median_s": tm.median,
        "min_s": min(tm.times),
        "repeats": len(tm.times),
        "new_out_s": t_new.median,
        "rate": _rate(p, tm.median),
        "rate_unit": unit,
        "of_peak": None,
        "of_peak_rounds": None,
        "ceiling_rate": None,
        "ceiling": None,
        "numpy_s": None,
        "vs_numpy": None,
        "torch_s": None,
        "vs_torch": None,
    }
    if ceiling is not None and rounds is not None:
        fracs = round_fractions(p.work()[0], rounds.calls[-1], ceiling.work, rounds.ceiling)
        rates = [ceiling.work / c / 1e9 for c in rounds.ceiling]
        rec["of_peak"] = statistics.median(fracs)
        rec["of_peak_rounds"] = fracs
        rec["ceiling_rate"] = statistics.median(rates)
        rec["ceiling"] = {
            "kind": ceiling.kind,
            "what": ceiling.what,
            "unit": unit,
            "rate": rec["ceiling_rate"],
            "rates": rates,
            "rounds": len(rates),
        }
    frac = "" if rec["of_peak"] is None else f", {rec['of_peak']:.0%} of peak"
    how = f" into out=; new output each call {fmt_time(t_new.median)}" if out_given else ""
    opts.progress(f"numbattn {fmt_time(tm.median)}{how} ({rec['rate']:.2f} {unit}{frac})")
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
        time.sleep(opts.settle)
        np_fn()  # warm-up (page faults, BLAS threads)
        np_fn()
        tn = repeat_timed(
            lambda: CpuBackend().timed(np_fn),
            min_time=opts.min_time,
            min_repeat=opts.min_repeat,
            max_repeat=opts.max_repeat,
        )
        rec["numpy_s"] = tn.median
        rec["vs_numpy"] = tn.median / t_new.median
        opts.progress(f"numpy {fmt_time(tn.median)}")

    # 4. torch baseline (SDPA for attention), where torch is installed.
    if torch_runner is not None:
        tensors = torch_runner.tensors(host)
        fn = torch_runner.fn(p, tensors)
        time.sleep(opts.settle)  # NumPy's BLAS threads, just used, spin a while
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
        rec["vs_torch"] = samples.median / t_new.median
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
    """Plain-text table; 'median' is the time 'rate' uses; 'of peak' is the
    median over rounds of the kernel's rate over the machine's ceiling in the
    same round and 'ceiling' that ceiling's median rate, in the rate's unit
    (:func:`rounds_timed`). 'median' times scores and softmax into a
    preallocated ``out=`` (marked ``*``), the others with a new output; 'new
    out' is the time with a new output each call, which 'vs NumPy' / 'vs
    torch' use (speed-ups: baseline time / numbattn time, above 1 means
    numbattn is faster)."""
    head = ["kernel", "backend", "dtype", "shape", "causal", "median", "rate", "of peak",
            "ceiling", "new out", "vs NumPy", "vs torch", "check"]  # fmt: skip
    rows = [head]
    for r in records:
        rows.append(
            [
                r["kernel"],
                r["backend"],
                r["dtype"],
                "x".join(map(str, r["shape"])),
                "yes" if r["causal"] else "no",
                fmt_time(r["median_s"]) + (" *" if r.get("out_given") else ""),
                f"{r['rate']:.2f} {r['rate_unit']}",
                "-" if r.get("of_peak") is None else f"{r['of_peak']:.0%}",
                "-" if r.get("ceiling_rate") is None else f"{r['ceiling_rate']:.1f}",
                fmt_time(r.get("new_out_s", r["median_s"])),
                _ratio(r["vs_numpy"]),
                _ratio(r["vs_torch"]),
                "ok" if r["check"]["ok"] else f"FAIL {r['check']['rel_err']:.1e}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    right = {5, 6, 7, 8, 9, 10, 11}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The machine's ceilings: GEMM rate and streaming bandwidth
# --------------------------------------------------------------------------

# The ceilings measured once, up front (``machine_peaks``; ``bench`` samples
# them in each row's rounds instead, see :class:`Ceilings`). Run in a child process of its own (``python -c``):
# NumPy's BLAS threads keep spinning for a while after each call (OpenBLAS:
# about 2**28 cycles, OPENBLAS_THREAD_TIMEOUT), which slows whatever runs next
# on the same cores, so the ceilings are measured where no numbattn or torch
# call can meet them.
#: Script lines naming the BLAS NumPy loaded (threadpoolctl where installed), as ``blas``.
_BLAS_SNIPPET = r"""
blas = None
try:
    from threadpoolctl import threadpool_info
    for p in threadpool_info():
        if p.get("user_api") == "blas":
            blas = " ".join(str(p.get(k)) for k in ("internal_api", "version", "architecture")
                            if p.get(k))
            break
except Exception:
    pass
"""

_PEAKS_SCRIPT = (
    r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np

dtype, n, threads, min_time = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
dt = np.dtype(dtype)

def samples(fn, min_repeat=3, max_repeat=50):
    fn()
    out, total = [], 0.0
    while len(out) < max_repeat and (len(out) < min_repeat or total < min_time):
        t0 = time.perf_counter()
        fn()
        s = time.perf_counter() - t0
        out.append(s)
        total += s
    out.sort()
    return out

rng = np.random.default_rng(0)
a = rng.standard_normal((n, n)).astype(dt)
b = rng.standard_normal((n, n)).astype(dt)
c = np.empty((n, n), dt)
g = samples(lambda: np.matmul(a, b, out=c))
flops = 2.0 * n**3
del a, b, c

# Streaming: y = x * 1 over 128 MiB arrays (far beyond the caches), one
# contiguous chunk per thread (NumPy's loops release the GIL).
m = (128 << 20) // dt.itemsize
x = np.ones(m, dt)
y = np.empty(m, dt)
one = dt.type(1.0)
bounds = [(i * m // threads, (i + 1) * m // threads) for i in range(threads)]
pool = ThreadPoolExecutor(threads)
def part(r):
    np.multiply(x[r[0]:r[1]], one, out=y[r[0]:r[1]])
def stream():
    list(pool.map(part, bounds))
s = samples(stream)
pool.shutdown()

"""
    + _BLAS_SNIPPET
    + r"""
med = lambda v: v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
print(json.dumps({
    "dtype": dtype, "threads": threads, "blas": blas,
    "gemm": {"n": n, "rate": flops / med(g) / 1e9, "best": flops / g[0] / 1e9,
             "repeats": len(g)},
    "stream": {"mib": 2 * m * dt.itemsize / 2**20, "rate": 2 * m * dt.itemsize / med(s) / 1e9,
               "best": 2 * m * dt.itemsize / s[0] / 1e9, "repeats": len(s)},
}))
"""
)


def machine_peaks(dtype: str, threads: int, n: int = 4096, min_time: float = 0.5) -> dict:
    """The machine's ceilings for ``dtype``, measured in a separate process:

    - ``gemm``: NumPy's ``matmul`` of two n x n matrices (2 n**3 flop), in
      GFLOP/s: the BLAS peak that attention and scores are rated against;
    - ``stream``: ``y = x * 1`` over 128 MiB arrays, in GB/s of bytes read +
      written (as softmax is counted).

    Medians (``rate``) and best samples (``best``), with ``threads`` BLAS and
    copy threads. The child process keeps BLAS's spinning threads away from
    the other timings. Raises RuntimeError when the child fails.
    """
    import subprocess
    import sys

    threads = max(1, int(threads))
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    args = [sys.executable, "-c", _PEAKS_SCRIPT, dtype, str(n), str(threads), str(min_time)]
    try:
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RuntimeError("measuring the machine's peaks took over 600 s") from None
    if r.returncode != 0:
        raise RuntimeError(f"measuring the machine's peaks failed: {r.stderr.strip()[-500:]}")
    import json

    return json.loads(r.stdout.strip().splitlines()[-1])


#: Seconds to wait after a numbattn call before a ceiling sample: Numba's
#: pool (omp layer, libgomp) keeps spinning after a parallel region; measured
#: here (process CPU time in windows after a call, 2 threads) it was busy for
#: up to 25 ms and idle from 30 ms on.
NUMBA_SPIN_S = 0.05
#: Seconds to wait after a GEMM sample before the next numbattn call: the
#: worker's OpenBLAS threads spin for 2**28 cycles after each call
#: (OPENBLAS_THREAD_TIMEOUT's default); measured here, busy for 100 ms,
#: idle from 100 ms on.
BLAS_SPIN_S = 0.15

# A persistent worker process for the GEMM ceiling: OpenBLAS's spinning
# threads and numbattn's pool never run side by side (the issue measured a
# numbattn call right after a NumPy matmul 35-45 % slower). Started once,
# pre-warmed (one matmul per dtype: page faults, thread start-up), it then
# answers each line of stdin naming a dtype with the seconds of one
# ``np.matmul(a, b, out=c)`` of n x n matrices, as one JSON line; an empty
# line or end of input ends it.
_GEMM_WORKER = (
    r"""
import json, sys, time
import numpy as np

n = int(sys.argv[1])
rng = np.random.default_rng(0)
mats = {}
for dtype in sys.argv[2:]:
    dt = np.dtype(dtype)
    a = rng.standard_normal((n, n)).astype(dt)
    b = rng.standard_normal((n, n)).astype(dt)
    c = np.empty((n, n), dt)
    np.matmul(a, b, out=c)
    mats[dtype] = (a, b, c)
"""
    + _BLAS_SNIPPET
    + r"""
print(json.dumps({"ready": True, "n": n, "blas": blas}), flush=True)
for line in sys.stdin:
    dtype = line.strip()
    if not dtype:
        break
    a, b, c = mats[dtype]
    t0 = time.perf_counter()
    np.matmul(a, b, out=c)
    print(json.dumps({"dtype": dtype, "seconds": time.perf_counter() - t0}), flush=True)
"""
)


class GemmWorker:
    """The GEMM ceiling's worker process (:data:`_GEMM_WORKER`) for ``dtypes``:
    ``sample(dtype)`` asks it for one n x n matmul and returns its seconds,
    waiting :data:`NUMBA_SPIN_S` before (numbattn's pool asleep) and
    :data:`BLAS_SPIN_S` after (the worker's BLAS threads asleep). Raises
    RuntimeError when the worker fails."""

    def __init__(self, dtypes: Iterable[str], threads: int, n: int = 4096):
        import json
        import subprocess
        import sys

        self.n = n
        self.dtypes = list(dict.fromkeys(dtypes))
        env = dict(os.environ)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(max(1, int(threads)))
        self._json = json
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _GEMM_WORKER, str(n), *self.dtypes],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.blas = self._reply().get("blas")

    def _reply(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr is not None else ""
            self.proc.wait()
            raise RuntimeError(f"the GEMM worker failed: {err.strip()[-500:]}")
        return self._json.loads(line)

    def sample(self, dtype: str) -> float:
        assert self.proc.stdin is not None
        time.sleep(NUMBA_SPIN_S)
        try:
            self.proc.stdin.write(dtype + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker is gone; _reply says why
        seconds = float(self._reply()["seconds"])
        time.sleep(BLAS_SPIN_S)
        return seconds

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class StreamCeiling:
    """The streaming ceiling in the bench process: ``y = x * 1`` over 128 MiB
    arrays (far beyond the caches), one contiguous chunk per thread of a
    ThreadPoolExecutor (NumPy's loops release the GIL; no BLAS; its idle
    threads block, they do not spin). ``sample()`` waits
    :data:`NUMBA_SPIN_S` (numbattn's pool asleep) and returns the seconds
    of one pass."""

    def __init__(self, dtype: str, threads: int, mib: int = 128):
        from concurrent.futures import ThreadPoolExecutor

        dt = np.dtype(dtype)
        m = (mib << 20) // dt.itemsize
        self.x = np.ones(m, dt)
        self.y = np.empty(m, dt)
        self.one = dt.type(1.0)
        threads = max(1, int(threads))
        self.bounds = [(i * m // threads, (i + 1) * m // threads) for i in range(threads)]
        self.pool = ThreadPoolExecutor(threads)
        self.bytes = 2 * m * dt.itemsize
        self._pass()  # warm-up: page faults, thread start-up

    def _part(self, r: tuple[int, int]) -> None:
        np.multiply(self.x[r[0] : r[1]], self.one, out=self.y[r[0] : r[1]])

    def _pass(self) -> None:
        list(self.pool.map(self._part, self.bounds))

    def sample(self) -> float:
        time.sleep(NUMBA_SPIN_S)
        t0 = time.perf_counter()
        self._pass()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.pool.shutdown()
        del self.x, self.y


@dataclass
class Ceiling:
    """One ceiling for one dtype, as :func:`run_problem` uses it: ``sample()``
    is one sample's seconds of ``work`` (flop or bytes)."""

    kind: str  # "gemm" or "stream"
    dtype: str
    work: float
    what: str
    sample: Callable[[], float]


class Ceilings:
    """The machine's ceilings, sampled in the rounds of each row
    (:func:`rounds_timed`):

    - ``gemm``: NumPy's ``matmul`` of two n x n matrices (2 n**3 flop), in a
      :class:`GemmWorker` process started here (pre-warmed) for
      ``gemm_dtypes``;
    - ``stream``: :class:`StreamCeiling`, in this process, made on first use.

    Every sample's rate is kept for :meth:`summary`. ``close()`` ends the
    worker. Raises RuntimeError when the worker cannot start."""

    def __init__(self, threads: int, gemm_dtypes: Iterable[str], n: int = 4096):
        self.threads = max(1, int(threads))
        self.n = n
        gemm_dtypes = list(dict.fromkeys(gemm_dtypes))
        self.worker = GemmWorker(gemm_dtypes, self.threads, n) if gemm_dtypes else None
        self.streams: dict[str, StreamCeiling] = {}
        #: rates (GFLOP/s or GB/s) of every sample, per (dtype, kind)
        self.rates: dict[tuple[str, str], list[float]] = {}

    def get(self, dtype: str, kind: str) -> Ceiling | None:
        """The ``kind`` ceiling for ``dtype`` (None: the worker has no such dtype)."""
        if kind == "gemm":
            if self.worker is None or dtype not in self.worker.dtypes:
                return None
            worker = self.worker
            work = 2.0 * self.n**3
            what = f"NumPy matmul {self.n}^3, worker process"
            raw: Callable[[], float] = lambda: worker.sample(dtype)  # noqa: E731
        else:
            if dtype not in self.streams:
                self.streams[dtype] = StreamCeiling(dtype, self.threads)
            st = self.streams[dtype]
            work = float(st.bytes)
            what = f"y = x * 1, {st.bytes / 2**20:.0f} MiB moved, this process"
            raw = st.sample
        rates = self.rates.setdefault((dtype, kind), [])

        def sample() -> float:
            s = raw()
            rates.append(work / s / 1e9)
            return s

        return Ceiling(kind, dtype, work, what, sample)

    def summary(self) -> dict:
        """Per dtype, the medians (``rate``) and best (``best``) of all the
        run's samples of each ceiling and their count (``repeats``); the
        shape of the earlier up-front ``machine_peaks``."""
        out: dict[str, dict] = {}
        for (dtype, kind), rates in self.rates.items():
            if not rates:
                continue
            pk = out.setdefault(
                dtype,
                {
                    "dtype": dtype,
                    "threads": self.threads,
                    "blas": self.worker.blas if self.worker else None,
                    "where": "sampled in the rounds of each row",
                },
            )
            entry = {
                "rate": statistics.median(rates),
                "best": max(rates),
                "repeats": len(rates),
            }
            if kind == "gemm":
                entry["n"] = self.n
            else:
                entry["mib"] = self.streams[dtype].bytes / 2**20
            pk[kind] = entry
        return out

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        for st in self.streams.values():
            st.close()
        self.streams.clear()


def peaks_text(peaks: dict) -> str:
    """One line per dtype describing the ceilings (:meth:`Ceilings.summary`)."""
    lines = []
    for dtype, pk in peaks.items():
        parts = []
        if "gemm" in pk:
            g = pk["gemm"]
            blas = f", {pk['blas']}" if pk.get("blas") else ""
            parts.append(
                f"GEMM {g['rate']:.1f} GFLOP/s (NumPy matmul {g['n']}^3{blas}, worker "
                f"process, {g['repeats']} samples)"
            )
        if "stream" in pk:
            st = pk["stream"]
            parts.append(
                f"stream {st['rate']:.1f} GB/s (y = x * 1, {st['mib']:.0f} MiB moved, "
                f"{st['repeats']} samples)"
            )
        lines.append(
            f"{dtype}: " + ", ".join(parts) + f", {pk['threads']} threads; medians of the run"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Decode: few queries over long KV caches (``bench --kernel decode``)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeCase:
    """Attention of Nq queries over an Nk-key cache; ``paged``: block size of
    a shuffled paged cache (None: a contiguous (B, Hk, Nk, d) cache)."""

    b: int
    h: int
    hk: int
    nq: int
    nk: int
    d: int
    causal: bool = False
    paged: int | None = None

    @property
    def label(self) -> str:
        heads = f"{self.h}" if self.h == self.hk else f"{self.h}/{self.hk}kv"
        text = f"({self.b}, {heads}, {self.nq}, {self.nk}, {self.d})"
        if self.causal:
            text += " causal"
        if self.paged:
            text += f" paged {self.paged}"
        return text

    def kv_bytes(self, itemsize: int = 4) -> int:
        return 2 * self.b * self.hk * self.nk * self.d * itemsize


def decode_cases(quick: bool = False) -> list[DecodeCase]:
    """The issue-11 cases (CPU, float32), or tiny ones for CI."""
    if quick:
        return [
            DecodeCase(1, 4, 4, 1, 1024, 32),
            DecodeCase(1, 8, 2, 1, 1000, 32),
            DecodeCase(1, 4, 4, 4, 1000, 32, causal=True),
            DecodeCase(1, 4, 4, 1, 1024, 32, paged=16),
        ]
    return [
        DecodeCase(1, 8, 8, 1, 32768, 128),
        DecodeCase(4, 8, 8, 1, 8192, 128),
        DecodeCase(1, 32, 8, 1, 32768, 128),
        DecodeCase(1, 32, 32, 16, 16384, 128, causal=True),
        DecodeCase(1, 8, 8, 1, 32768, 128, paged=16),
        DecodeCase(1, 8, 8, 1, 32768, 128, paged=256),
    ]


def _stream_read_kernel():
    """A parallel vectorised sum (compiled once per process, not cached: a
    closure)."""
    global _STREAM_READ
    if _STREAM_READ is None:
        from numba import njit, prange

        @njit(parallel=True, fastmath=True)
        def stream_read(x, n_threads):  # pragma: no cover - compiled
            per = (x.size + n_threads - 1) // n_threads
            acc = np.zeros(n_threads, dtype=x.dtype)
            for t in prange(n_threads):
                part = x[t * per : min(x.size, (t + 1) * per)]  # loop from 0: vectorises
                s = x.dtype.type(0.0)
                for i in range(part.size):
                    s += part[i]
                acc[t] = s
            return acc.sum()

        _STREAM_READ = stream_read
    return _STREAM_READ


_STREAM_READ = None


class StreamRead:
    """The streaming read of :func:`stream_read_gbs` as a ceiling sampled in
    rounds (:func:`rounds_timed`) beside each decode case: ``sample()`` is
    one pass's seconds over ``nbytes`` (256 MiB: far beyond the caches)."""

    def __init__(self, threads: int, nbytes: int = 256 << 20):
        self.fn = _stream_read_kernel()
        self.threads = threads
        self.x = np.ones(nbytes // 4, dtype=np.float32)
        self.nbytes = self.x.nbytes
        self.fn(self.x, threads)

    def sample(self) -> float:
        return CpuBackend().timed(lambda: self.fn(self.x, self.threads))


def stream_read_gbs(
    threads: int,
    nbytes: int = 256 << 20,
    opts: Options | None = None,
    reader: StreamRead | None = None,
) -> float:
    """The machine's streaming read bandwidth (GB/s): a vectorised parallel sum
    over ``nbytes`` of float32 (far larger than the caches) on ``threads``
    threads, median of repeated runs (``reader``'s array when given)."""
    reader = reader if reader is not None else StreamRead(threads, nbytes)
    t = repeat_timed(
        reader.sample,
        min_time=0.3 if opts is None else opts.min_time,
        min_repeat=5,
        max_repeat=50,
    )
    return reader.nbytes / t.median / 1e9


#: Rounds of each decode case, each closed by one sample of the streaming read.
DECODE_ROUNDS = 9


def _decode_inputs(c: DecodeCase, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((c.b, c.h, c.nq, c.d), dtype=np.float32)
    k = rng.standard_normal((c.b, c.hk, c.nk, c.d), dtype=np.float32)
    v = rng.standard_normal((c.b, c.hk, c.nk, c.d), dtype=np.float32)
    return q, k, v


def _paged_from(k, v, block_size: int, seed: int = 1):
    """k, v (B, Hk, N, d) as a shuffled paged cache and its block table
    (N a multiple of ``block_size``)."""
    b, hk, n, d = k.shape
    per = n // block_size
    nb = b * per
    kc = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).reshape(nb, block_size, hk, d)
    vc = np.ascontiguousarray(v.transpose(0, 2, 1, 3)).reshape(nb, block_size, hk, d)
    perm = np.random.default_rng(seed).permutation(nb)
    table = np.argsort(perm).reshape(b, per).astype(np.int32)
    return kc[perm], vc[perm], table


def run_decode(
    c: DecodeCase, torch, bandwidth: float, opts: Options, reader: StreamRead | None = None
) -> dict:
    """Check numbattn on ``c`` against the reference, then time it and torch SDPA
    (contiguous cache; a bottom-right boolean mask when causal, as torch's
    ``is_causal`` is top-left for Nq != Nk) one library after the other,
    pausing between them so that no thread pool is still spinning.

    With ``reader``, numbattn is timed in :data:`DECODE_ROUNDS` rounds, each
    closed by one sample of the streaming read, and the K+V fraction of the
    stream is the median over rounds of the two rates' ratio (this host's
    speed moves between minutes); else the fraction of ``bandwidth``."""
    import numbattn

    from .reference import attention as ref_attention

    q, k, v = _decode_inputs(c)
    lengths = np.full(c.b, c.nk)
    if c.paged:
        kc, vc, table = _paged_from(k, v, c.paged)

        def call():
            return numbattn.paged_attention(q, kc, vc, table, lengths, causal=c.causal)
    else:

        def call():
            return numbattn.attention(q, k, v, causal=c.causal)

    out = call()
    ref, _ = ref_attention(q, k, v, causal=c.causal)
    err = rel_err(out, ref)
    ok = bool(err <= RTOL["float32"])
    del ref
    opts.progress(f"check {'ok' if ok else 'FAILED'} (rel. err {err:.2e})")
    time.sleep(0.2)
    fraction = None
    stream_gbs = None
    if reader is None:
        tm = repeat_timed(
            lambda: CpuBackend().timed(call),
            min_time=opts.min_time,
            min_repeat=opts.min_repeat,
            max_repeat=opts.max_repeat,
        )
    else:  # the same pool runs both: no other library's threads to wait for
        rounds = rounds_timed(
            [lambda: CpuBackend().timed(call)],
            reader.sample,
            rounds=DECODE_ROUNDS,
            min_time=opts.min_time,
            min_repeat=opts.min_repeat,
            max_repeat=opts.max_repeat,
        )
        tm = rounds.timing(0)
        fraction = statistics.median(
            round_fractions(c.kv_bytes(), rounds.calls[0], reader.nbytes, rounds.ceiling)
        )
        stream_gbs = statistics.median(reader.nbytes / t / 1e9 for t in rounds.ceiling)
    gbs = c.kv_bytes() / tm.median / 1e9
    if fraction is None and bandwidth > 0:
        fraction = gbs / bandwidth
    rec: dict[str, Any] = {
        "case": c.label,
        "shape": [c.b, c.h, c.hk, c.nq, c.nk, c.d],
        "causal": c.causal,
        "paged": c.paged,
        "check": {"ok": ok, "rel_err": err, "tol": RTOL["float32"]},
        "median_s": tm.median,
        "kv_gbs": gbs,
        "kv_fraction_of_stream": fraction,
        "stream_read_gbs": stream_gbs,
        "torch_s": None,
        "vs_torch": None,
    }
    opts.progress(f"numbattn {fmt_time(tm.median)} (K+V {gbs:.1f} GB/s)")
    if torch is not None and opts.baselines:
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        mask = None
        if c.causal:
            from .reference import visible

            mask = torch.from_numpy(visible(c.nq, c.nk, causal=True))

        def tcall():
            return F.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=mask, enable_gqa=c.h != c.hk
            )

        tcall()
        time.sleep(0.2)
        tcall()
        tt = repeat_timed(
            lambda: CpuBackend().timed(tcall),
            min_time=opts.min_time,
            min_repeat=opts.min_repeat,
            max_repeat=opts.max_repeat,
        )
        rec["torch_s"] = tt.median
        rec["vs_torch"] = tt.median / tm.median
        opts.progress(f"torch {fmt_time(tt.median)}")
        time.sleep(0.2)
    return rec


def decode_table(records: list[dict], bandwidth: float, threads: int) -> str:
    """Plain-text decode table and the derived ratios (GQA vs MHA, paged vs
    contiguous) where those cases ran."""
    head = ["case", "numbattn", "torch", "vs torch", "K+V GB/s", "stream", "of stream", "check"]
    rows = [head]
    for r in records:
        frac = r["kv_fraction_of_stream"]
        rows.append(
            [
                r["case"],
                fmt_time(r["median_s"]),
                fmt_time(r["torch_s"]),
                _ratio(r["vs_torch"]),
                f"{r['kv_gbs']:.1f}",
                "-" if r.get("stream_read_gbs") is None else f"{r['stream_read_gbs']:.1f}",
                "-" if frac is None else f"{frac:.0%}",
                "ok" if r["check"]["ok"] else f"FAIL {r['check']['rel_err']:.1e}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        f"streaming read bandwidth ({threads} threads, start of the run): {bandwidth:.1f} GB/s"
    ]
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    by = {tuple(r["shape"]) + (r["causal"], r["paged"]): r["median_s"] for r in records}
    for key, t in by.items():
        b, h, hk, nq, nk, d, causal, paged = key
        if paged:
            base = by.get((b, h, hk, nq, nk, d, causal, None))
            if base:
                lines.append(f"paged (block {paged}) / contiguous: {t / base:.2f}x")
        elif hk != h:
            base = by.get((b, hk, hk, nq, nk, d, causal, None))
            if base:
                lines.append(f"GQA {h}/{hk} heads / MHA {hk} heads: {t / base:.2f}x")
    return "\n".join(lines)
