"""Plain float64 NumPy implementations: the executable specification.

Readable rather than fast. Every kernel in numbattn is tested against these
functions. They compute in float64 whatever the input dtype and return
float64 arrays.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["attention", "causal_mask", "scores", "softmax"]


def causal_mask(nq: int, nk: int) -> np.ndarray:
    """Boolean (nq, nk) array, True where key j is visible to query i.

    Bottom-right alignment (FlashAttention >= 2.1): key j is visible to query
    i when ``j <= i + (nk - nq)``.
    """
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    return j <= i + (nk - nq)


def scores(q, k, *, scale=None, causal=False):
    """S[..., i, j] = scale * <q[..., i, :], k[..., j, :]>, -inf where masked."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    s = np.einsum("...id,...jd->...ij", q, k) * scale
    if causal:
        s = np.where(causal_mask(q.shape[-2], k.shape[-2]), s, -np.inf)
    return s


def softmax(x):
    """Row-wise softmax over the last axis.

    A row that is entirely -inf gives zeros; a row containing NaN gives NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] == 0:
        return x.copy()
    m = x.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)  # all -inf row: every exp is 0
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(x - m)  # a +inf entry gives inf - inf = NaN, as in the kernels
        total = e.sum(axis=-1, keepdims=True)
        return np.where(total == 0, 0.0, e / total)


def attention(q, k, v, *, scale=None, causal=False):
    """O = softmax(scores(q, k)) @ v and the row log-sum-exp.

    Returns ``(out, lse)``: out has shape (..., Nq, dv), lse shape (..., Nq)
    with lse = log(sum_j exp(S[..., i, j])) over unmasked keys. A row with no
    visible key gives zeros in out and -inf in lse.
    """
    s = scores(q, k, scale=scale, causal=causal)
    v = np.asarray(v, dtype=np.float64)
    p = softmax(s)
    out = p @ v
    if s.shape[-1] == 0:
        lse = np.full(s.shape[:-1], -np.inf)
    else:
        m = np.max(s, axis=-1)
        finite_m = np.where(np.isneginf(m), 0.0, m)
        with np.errstate(divide="ignore"):
            lse = np.log(np.exp(s - finite_m[..., None]).sum(axis=-1)) + finite_m
    return out, lse
