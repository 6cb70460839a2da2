"""CPU kernels (simple first version; to be optimised).

Every kernel takes arrays with exactly two leading batch dimensions (G1, G2)
and arbitrary strides, writes every element of its outputs and validates
nothing.
"""

import math

import numpy as np
from numba import njit, prange

_OPTS = dict(parallel=True, nogil=True, cache=True, fastmath=False)


@njit(**_OPTS)
def scores_kernel(q, k, out, scale, causal, q_tile, k_tile):
    g1, g2, nq, d = q.shape
    nk = k.shape[2]
    offset = nk - nq
    n_qt = (nq + q_tile - 1) // q_tile
    dt = q.dtype.type
    sc = dt(scale)
    for w in prange(g1 * g2 * n_qt):
        a = w // (g2 * n_qt)
        b = (w // n_qt) % g2
        i0 = (w % n_qt) * q_tile
        i1 = min(i0 + q_tile, nq)
        for i in range(i0, i1):
            for j in range(nk):
                if causal and j > i + offset:
                    out[a, b, i, j] = -np.inf
                else:
                    acc = dt(0.0)
                    for p in range(d):
                        acc += q[a, b, i, p] * k[a, b, j, p]
                    out[a, b, i, j] = acc * sc


@njit(**_OPTS)
def softmax_kernel(x, out):
    g1, g2, n = x.shape
    for w in prange(g1 * g2):
        a = w // g2
        b = w % g2
        m = -np.inf
        has_nan = False
        for j in range(n):
            xv = x[a, b, j]
            if xv > m:
                m = xv
            elif xv != xv:
                has_nan = True
        if has_nan:
            for j in range(n):
                out[a, b, j] = np.nan
            continue
        if m == -np.inf:
            for j in range(n):
                out[a, b, j] = 0.0
            continue
        total = 0.0
        for j in range(n):
            e = math.exp(x[a, b, j] - m)
            out[a, b, j] = e
            total += e
        inv = 1.0 / total
        for j in range(n):
            out[a, b, j] = out[a, b, j] * inv


@njit(**_OPTS)
def attention_kernel(q, k, v, out, lse, scale, causal, q_tile, k_tile):
    g1, g2, nq, d = q.shape
    nk = k.shape[2]
    dv = v.shape[3]
    offset = nk - nq
    n_qt = (nq + q_tile - 1) // q_tile
    for w in prange(g1 * g2 * n_qt):
        a = w // (g2 * n_qt)
        b = (w // n_qt) % g2
        i0 = (w % n_qt) * q_tile
        i1 = min(i0 + q_tile, nq)
        acc = np.zeros(dv)
        s = np.empty(nk)
        for i in range(i0, i1):
            jmax = nk if not causal else min(nk, i + offset + 1)
            m = -np.inf
            for j in range(jmax):
                t = 0.0
                for p in range(d):
                    t += q[a, b, i, p] * k[a, b, j, p]
                t *= scale
                s[j] = t
                if t > m or t != t:
                    m = t
            acc[:] = 0.0
            if jmax <= 0 or m == -np.inf:
                for c in range(dv):
                    out[a, b, i, c] = 0.0
                lse[a, b, i] = -np.inf
                continue
            total = 0.0
            for j in range(jmax):
                e = math.exp(s[j] - m)
                total += e
                for c in range(dv):
                    acc[c] += e * v[a, b, j, c]
            for c in range(dv):
                out[a, b, i, c] = acc[c] / total
            lse[a, b, i] = m + math.log(total)
