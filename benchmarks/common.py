"""Shared helpers of the asv suites (no benchmarks in here).

asv runs the *current* suites against every commit in the history, so this
module uses only what every numbattn commit with kernels has: the public
``numbattn.attention / scores / softmax`` and ``numbattn.cuda_available``
(looked up defensively). It must not import ``numbattn._bench`` (newer).

Names here must not start with ``time``, ``mem``, ``peakmem``, ``track`` or
``timeraw`` (asv would take them for benchmarks).
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np

# --------------------------------------------------------------------------
# Parameter grids (issue: dtype; batch x heads; N; d; causal)
# --------------------------------------------------------------------------

#: CI's smoke run (.ci/asv_quick.sh sets NUMBATTN_ASV_SMOKE=1) keeps the
#: first point of every parameter axis: each benchmark still runs, once,
#: without its whole grid (with torch installed, the full grid in quick mode
#: took over half an hour of CI on 2 cores). Real runs never set it.
SMOKE = os.environ.get("NUMBATTN_ASV_SMOKE", "") not in ("", "0")


def grid(params):
    """``params`` (a list of axes, or one axis), cut to its first points in a smoke run."""
    if not SMOKE:
        return params
    if params and isinstance(params[0], list):
        return [axis[:1] for axis in params]
    return params[:1]


DTYPES = ["float32", "float64"]
BATCH_HEADS = ["1x1", "2x4"]
N_ATTENTION = [128, 512, 2048, 8192]
N_OTHER = [128, 512, 2048]  # scores and softmax write B*H*N*N elements
D_VALUES = [64, 128]
CAUSAL = [False, True]

ATTENTION_PARAMS = grid([DTYPES, BATCH_HEADS, N_ATTENTION, D_VALUES, CAUSAL])
ATTENTION_NAMES = ["dtype", "B x H", "N", "d", "causal"]
SCORES_PARAMS = grid([DTYPES, BATCH_HEADS, N_OTHER, D_VALUES, CAUSAL])
SCORES_NAMES = ATTENTION_NAMES
SOFTMAX_PARAMS = grid([DTYPES, BATCH_HEADS, N_OTHER])
SOFTMAX_NAMES = ["dtype", "B x H", "N (rows of N)"]
#: Few queries over a long KV cache (issue 11), float32, d = 128; Nq > 1 is causal.
DECODE_PARAMS = grid(
    [
        ["1x8x8x1x32768", "4x8x8x1x8192", "1x32x8x1x32768", "1x32x32x16x16384"],
        ["contiguous", "paged16", "paged256"],
    ]
)
DECODE_NAMES = ["B x H x Hk x Nq x Nk", "cache"]

#: Largest B*H*N*N computed by a CPU grid point; larger points are skipped
#: (N = 8192 runs with B x H = 1x1 only) to keep a run reasonable on 2 cores.
MAX_PAIRS = 8192 * 8192

#: Per-benchmark limits (seconds); big points take a few seconds per call.
TIMEOUT = 600
#: (min samples, max samples, max seconds) per process.
REPEAT = (1, 5, 10.0)


def split_bh(bh: str) -> tuple[int, int]:
    b, h = bh.split("x")
    return int(b), int(h)


def check_size(b: int, h: int, n: int) -> None:
    """Skip (asv: NotImplementedError) grid points beyond the size budget."""
    if b * h * n * n > MAX_PAIRS:
        raise NotImplementedError(f"{b}x{h}x{n}x{n} is outside the benchmark budget")


# --------------------------------------------------------------------------
# Inputs: one random pool built once per run (setup_cache), reused by all
# --------------------------------------------------------------------------

POOL_SIZE = 1 << 22  # 4 Mi float32 values, 16 MiB pickled by asv


def build_pool() -> np.ndarray:
    """Standard-normal float32 values; every input is cut from this pool."""
    return np.random.default_rng(20241128).standard_normal(POOL_SIZE).astype(np.float32)


def from_pool(pool: np.ndarray, shape, dtype, which: int = 0, scale: float = 1.0) -> np.ndarray:
    """A new C-contiguous array of ``shape``/``dtype`` filled from ``pool``
    (cyclically, starting at an offset that differs per ``which``)."""
    size = math.prod(shape)
    start = (which * 1_048_573) % pool.size
    flat = np.resize(pool[start:] if start else pool, size)
    out = flat.astype(dtype).reshape(shape)
    if scale != 1.0:
        out *= scale
    return out


def attention_inputs(pool, dtype, b, h, n, d, count=3):
    return tuple(from_pool(pool, (b, h, n, d), dtype, which=i) for i in range(count))


def softmax_input(pool, dtype, b, h, n):
    return from_pool(pool, (b, h, n, n), dtype, which=7, scale=4.0)


# --------------------------------------------------------------------------
# Baselines: the correct batched NumPy implementation, torch
# --------------------------------------------------------------------------


def causal_mask(nq: int, nk: int) -> np.ndarray:
    """True where key j is visible to query i (bottom-right aligned)."""
    return np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq)


def numpy_scores(q, k, scale, causal=False):
    s = q @ k.swapaxes(-1, -2)
    s *= s.dtype.type(scale)
    if causal:
        np.copyto(s, -np.inf, where=~causal_mask(q.shape[-2], k.shape[-2]))
    return s


def numpy_softmax(x, out=None):
    """Numerically stable: subtract the row maximum before exp."""
    m = x.max(axis=-1, keepdims=True)
    e = np.subtract(x, m, out=out)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def numpy_attention(q, k, v, scale, causal=False):
    """softmax(scale * q @ k^T) @ v, batched over (B, H) (never reshaped to
    (B*N, d), which would mix the batch elements)."""
    s = numpy_scores(q, k, scale, causal)
    numpy_softmax(s, out=s)
    return s @ v


def import_torch():
    """torch, or raise NotImplementedError (asv: skipped) when not importable."""
    try:
        import torch
    except Exception as exc:
        raise NotImplementedError(f"torch not importable: {exc}") from None
    return torch


def numba_threads() -> int:
    try:
        import numba

        return numba.get_num_threads()
    except Exception:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------


def nvidia_present() -> bool:
    """Cheap test (no import) for an NVIDIA driver and device on this machine,
    and not Numba's CUDA simulator (far too slow to time)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def gpu_grid(params):
    """``params`` on a machine with an NVIDIA GPU; elsewhere only the first
    point of each axis, which is skipped (n/a): asv starts one process per
    grid point, and a hundred processes only to say "no GPU" cost minutes."""
    if nvidia_present():
        return params
    return [values[:1] for values in params]


def require_gpu():
    """numba.cuda when numbattn can use a GPU; else NotImplementedError (skip)."""
    if not nvidia_present():
        raise NotImplementedError("no NVIDIA GPU (or NUMBA_ENABLE_CUDASIM is set)")
    import numbattn

    available = getattr(numbattn, "cuda_available", None)
    try:
        ok = bool(available()) if available is not None else False
    except Exception:
        ok = False
    if not ok:
        raise NotImplementedError("no usable CUDA GPU for numbattn")
    from numba import cuda

    return cuda


def require_torch_cuda():
    torch = import_torch()
    if not torch.cuda.is_available():
        raise NotImplementedError("torch has no CUDA device here")
    return torch


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_increase_mib(fn) -> float:
    """MiB by which the resident set peaks above its level before ``fn()``.

    Linux only: resets the high-water mark through /proc/self/clear_refs.
    Free heap memory is first returned to the system (glibc ``malloc_trim``)
    so that a buffer the call allocates is not hidden by reused free pages.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise NotImplementedError(f"cannot reset the peak RSS: {exc}") from None
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024.0


# --------------------------------------------------------------------------
# The machine's ceilings (the asv suite bench_peak.py)
# --------------------------------------------------------------------------

#: Matrix size whose NumPy matmul reaches the BLAS peak (issue 12: 4096^3).
GEMM_N = 4096
#: Seconds to wait after BLAS work before timing numbattn: OpenBLAS's
#: threads spin about 2**28 cycles (~0.1 s) after each call.
SETTLE_S = 0.5


def _median_seconds(fn, repeat: int) -> float:
    import statistics
    import time

    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def gemm_gflops(dtype: str, n: int = GEMM_N, repeat: int = 3) -> float:
    """Median GFLOP/s of NumPy's ``matmul`` of two n x n matrices (2 n**3 flop)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    c = np.empty((n, n), dtype)
    return 2.0 * n**3 / _median_seconds(lambda: np.matmul(a, b, out=c), repeat) / 1e9


def stream_gbs(dtype: str, threads: int, repeat: int = 5) -> float:
    """Median GB/s (bytes read + written) of ``y = x * 1`` over 128 MiB arrays,
    one contiguous chunk per thread."""
    from concurrent.futures import ThreadPoolExecutor

    dt = np.dtype(dtype)
    m = (128 << 20) // dt.itemsize
    x = np.ones(m, dt)
    y = np.empty(m, dt)
    one = dt.type(1.0)
    bounds = [(i * m // threads, (i + 1) * m // threads) for i in range(threads)]

    def part(r):
        np.multiply(x[r[0] : r[1]], one, out=y[r[0] : r[1]])

    with ThreadPoolExecutor(threads) as pool:
        sec = _median_seconds(lambda: list(pool.map(part, bounds)), repeat)
    return 2.0 * m * dt.itemsize / sec / 1e9
