"""The NumPy baselines that the benchmarks time numbattn against.

Plain batched NumPy, the way one would write attention without numbattn:
``softmax(scale * q @ k^T) @ v`` per (B, H) slice with a stable softmax,
materialising the (Nq, Nk) scores. Used by ``python -m numbattn bench``,
``scripts/cpu_kernels.py`` and ``scripts/peak_memory.py``. The asv suites
keep their own copy (``benchmarks/common.py``: asv runs today's suites
against old commits, which lack this module); ``tests/test_baselines.py``
checks that the two agree.

Not the specification: that is :mod:`numbattn.reference` (float64).
"""

from __future__ import annotations

import numpy as np


def causal_mask(nq: int, nk: int) -> np.ndarray:
    """True where key j is visible to query i (bottom-right aligned)."""
    return np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq)


def numpy_scores(q: np.ndarray, k: np.ndarray, scale: float, causal: bool = False) -> np.ndarray:
    """``scale * q @ k^T`` in the inputs' dtype; -inf above the causal diagonal."""
    s = q @ k.swapaxes(-1, -2)
    s *= s.dtype.type(scale)
    if causal:
        np.copyto(s, -np.inf, where=~causal_mask(q.shape[-2], k.shape[-2]))
    return s


def numpy_softmax(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Numerically stable row softmax: subtract the row maximum before exp."""
    m = x.max(axis=-1, keepdims=True)
    e = np.subtract(x, m, out=out)
    np.exp(e, out=e)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def numpy_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool = False
) -> np.ndarray:
    """softmax(scale * q @ k^T) @ v, batched over the leading axes (never
    reshaped to (B*N, d), which would mix the batch elements)."""
    s = numpy_scores(q, k, scale, causal)
    numpy_softmax(s, out=s)
    return s @ v
