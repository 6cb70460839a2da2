"""Plain float64 NumPy implementations: the executable specification.

Readable rather than fast. Every kernel in numbattn is tested against these
functions. They compute in float64 whatever the input dtype and return
float64 arrays.

Visibility of key j to query i (0-based within one sequence of ``q_len``
queries and ``k_len`` keys), with ``off = k_len - q_len`` (bottom-right
alignment, as FlashAttention >= 2.1) unless ``diagonal`` gives ``off``:

- ``i < q_len`` and ``j < k_len`` (lengths; rows past ``q_len`` see nothing);
- causal: ``j <= i + off``;
- ``window=(left, right)``: ``i + off - left <= j <= i + off + right``, -1
  meaning unbounded on that side (causal is ``right = 0``);
- ``mask[..., i, j]`` True (when a mask is given);
- ``bias[..., i, j]`` not -inf (a -inf bias masks, whatever the dot product).

Window sides of any size are accepted: ``left >= q_len + |off|`` or
``right >= k_len + |off|`` excludes nothing (unbounded), so huge values never
overflow.

Masked scores are -inf. A key whose score is -inf has weight exactly 0 and
its value is never read: a NaN or inf in ``k`` or ``v`` at a key that a row
cannot see does not reach that row (as in FlashAttention). A row with no
visible key gets zeros in ``out`` and -inf in ``lse``.

Scores are ``scale * (q . k)``: the scale multiplies the dot product (the
kernels do the same, in the input dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "attention",
    "attention_backward",
    "causal_mask",
    "merge_attention",
    "paged_attention",
    "relative_error",
    "scores",
    "softmax",
    "varlen_attention",
    "varlen_attention_backward",
    "visible",
]


def visible(
    nq: int,
    nk: int,
    *,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    q_len: int | None = None,
    k_len: int | None = None,
    diagonal: int | None = None,
) -> np.ndarray:
    """Boolean (nq, nk) array, True where key j is visible to query i
    (query i aligned with key ``i + diagonal``, default ``k_len - q_len``)."""
    q_len = nq if q_len is None else int(q_len)
    k_len = nk if k_len is None else int(k_len)
    left, right = (-1, -1) if window is None else (int(w) for w in window)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    off = k_len - q_len if diagonal is None else int(diagonal)
    # left >= q_len + |off| and right >= k_len + |off| exclude nothing: clamp
    # so that huge values (sys.maxsize, 2**64) never reach int64 arithmetic.
    left = min(left, q_len + abs(off))
    right = min(right, k_len + abs(off))
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    vis = (i < q_len) & (j < k_len)
    if left >= 0:
        vis = vis & (j >= i + off - left)
    if right >= 0:
        vis = vis & (j <= i + off + right)
    return vis


def causal_mask(nq: int, nk: int) -> np.ndarray:
    """Boolean (nq, nk) array: key j visible to query i when ``j <= i + nk - nq``."""
    return visible(nq, nk, causal=True)


def _repeat_heads(k: np.ndarray, q_heads: int | None) -> np.ndarray:
    """Grouped-query attention: repeat each of k's heads for its query heads."""
    if k.ndim >= 3 and k.shape[-3] != q_heads:
        k = np.repeat(k, q_heads // k.shape[-3], axis=-3)
    return k


def scores(
    q: ArrayLike,
    k: ArrayLike,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: ArrayLike | None = None,
    query_lengths: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    window: tuple[int, int] | None = None,
    diagonal: ArrayLike | None = None,
) -> np.ndarray:
    """S[..., i, j] = scale * <q[..., i, :], k[..., j, :]> + bias, -inf where masked.

    A -inf bias entry masks its key: the score is -inf even where the dot
    product is NaN or +inf.

    ``key_lengths`` and ``query_lengths`` have shape (B,) and apply along the
    first leading dimension, as does ``diagonal`` (an int or shape (B,): query
    i aligned with key ``i + diagonal``; default per batch element
    ``k_len - q_len``). ``k`` may have fewer heads (axis -3) than ``q``.
    """
    q = np.asarray(q, dtype=np.float64)
    k = _repeat_heads(np.asarray(k, dtype=np.float64), q.shape[-3] if q.ndim >= 3 else None)
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.einsum("...id,...jd->...ij", q, k) * scale
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float64)
            s = s + bias
    nq, nk = s.shape[-2:]
    vis = np.empty(s.shape, dtype=bool)
    batch = s.shape[0] if s.ndim > 2 else 1
    for b in range(batch):
        q_len = None if query_lengths is None else int(np.asarray(query_lengths)[b])
        k_len = None if key_lengths is None else int(np.asarray(key_lengths)[b])
        diag = None if diagonal is None else int(np.broadcast_to(diagonal, (batch,))[b])
        rows = visible(
            nq, nk, causal=causal, window=window, q_len=q_len, k_len=k_len, diagonal=diag
        )
        if s.ndim > 2:
            vis[b] = rows
        else:
            vis[...] = rows
    if mask is not None:
        vis &= np.asarray(mask, dtype=bool)
    if bias is not None:
        vis &= ~np.isneginf(bias)
    return np.where(vis, s, -np.inf)


def softmax(x: ArrayLike) -> np.ndarray:
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


def logsumexp(s: np.ndarray) -> np.ndarray:
    """log(sum(exp(s))) over the last axis; -inf for an empty or all -inf row."""
    if s.shape[-1] == 0:
        return np.full(s.shape[:-1], -np.inf)
    m = np.max(s, axis=-1)
    finite_m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.exp(s - finite_m[..., None]).sum(axis=-1)) + finite_m


def attention(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``O = softmax(scores(q, k, **options)) @ v`` and the row log-sum-exp.

    Takes the options of :func:`scores`. Returns ``(out, lse)``: out has
    shape (..., Nq, dv), lse shape (..., Nq) with lse = log(sum_j exp(S[...,
    i, j])) over visible keys. A row with no visible key gives zeros in out
    and -inf in lse. Keys with S = -inf (masked) are never read: their
    values do not reach the row, even when NaN or inf; a visible key's
    value always does (a NaN there gives NaN, even at weight 0).
    """
    s = scores(q, k, **options)
    v = _repeat_heads(np.asarray(v, dtype=np.float64), s.shape[-3] if s.ndim >= 3 else None)
    return _weighted_values(softmax(s), s, v), logsumexp(s)


def _weighted_values(p: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """p @ v, summing over keys with s > -inf only (0 * NaN never formed)."""
    if np.isfinite(v).all():
        return p @ v  # masked entries of p are exactly 0 and v is finite
    # Non-finite values: weigh each key explicitly (small inputs: tests).
    seen = ~np.isneginf(s)
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(seen[..., None], p[..., None] * v[..., None, :, :], 0.0)
    return terms.sum(axis=-2)


def varlen_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Packed variable-length attention (FlashAttention's cu_seqlens convention).

    q is (Tq, H, d), k and v (Tk, Hk, d) and (Tk, Hk, dv); sequence b owns
    query tokens ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key tokens
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` and attends only within itself.
    ``bias`` and ``mask`` broadcast to (H, Tq, Tk) in packed token positions.
    Returns ``(out, lse)`` of shapes (Tq, H, dv) and (Tq, H).
    """
    cu_q, cu_k = np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k)
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    tq, h = q.shape[:2]
    out = np.zeros((tq, h, v.shape[-1]))
    lse = np.full((tq, h), -np.inf)
    for b in range(len(cu_q) - 1):
        qs = slice(int(cu_q[b]), int(cu_q[b + 1]))
        ks = slice(int(cu_k[b]), int(cu_k[b + 1]))
        extra = {}
        if bias is not None:
            extra["bias"] = np.broadcast_to(bias, (h, tq, k.shape[0]))[:, qs, ks]
        if mask is not None:
            extra["mask"] = np.broadcast_to(mask, (h, tq, k.shape[0]))[:, qs, ks]
        o, l_ = attention(
            q[qs].swapaxes(0, 1), k[ks].swapaxes(0, 1), v[ks].swapaxes(0, 1), **extra, **options
        )
        out[qs] = o.swapaxes(0, 1)
        lse[qs] = l_.swapaxes(0, 1)
    return out, lse


def _masked_matmul(w: np.ndarray, seen: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``w @ x`` summing over pairs where ``seen`` only (0 * NaN never formed)."""
    if np.isfinite(x).all():
        return np.where(seen, w, 0.0) @ x
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(seen[..., None], w[..., None] * x[..., None, :, :], 0.0)
    return terms.sum(axis=-2)


def _sum_groups(g: np.ndarray, k_heads: int | None) -> np.ndarray:
    """Grouped-query attention: sum a per-query-head gradient over each group."""
    if k_heads is None or g.shape[-3] == k_heads:
        return g
    shape = g.shape[:-3] + (k_heads, g.shape[-3] // k_heads) + g.shape[-2:]
    return g.reshape(shape).sum(axis=-3)


def attention_backward(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, dout: ArrayLike, **options: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dq, dk, dv)`` of ``sum(attention(q, k, v, **options)[0] * dout)``.

    Takes the options of :func:`scores` (bias and mask are constants: they
    get no gradient). With ``S = scores(q, k, **options)``, ``P =
    softmax(S)`` (a row with no visible key is all 0), ``D = rowsum(P *
    dP)`` (equal to ``rowsum(dout * out)``)::

        dP = dout @ v^T        dS = P * (dP - D)      (0 where S is -inf)
        dq = scale * dS @ k    dk = scale * dS^T @ q  dv = P^T @ dout

    Only visible pairs (S > -inf) contribute: a row with no visible key
    (lengths, causal with Nq > Nk, masks) has dq = 0 and adds nothing to
    dk or dv, and a key that no row sees gets dk = dv = 0; NaN or inf in
    masked positions of any input, or in ``dout`` rows past a query length,
    never reach a gradient. Grouped-query attention: dk and dv of a key
    head are summed over its query heads. Returns float64 arrays shaped
    like q, k and v.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    dout = np.asarray(dout, dtype=np.float64)
    heads = q.shape[-3] if q.ndim >= 3 else None
    k_heads = k.shape[-3] if k.ndim >= 3 else None
    scale = options.get("scale")
    if scale is None:
        d = q.shape[-1]
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    s = scores(q, k, **options)
    seen = ~np.isneginf(s)
    p = softmax(s)
    kr, vr = _repeat_heads(k, heads), _repeat_heads(v, heads)
    # dP[i, j] = dout_i . v_j, over visible pairs only.
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isfinite(dout).all() and np.isfinite(vr).all():
            dp = np.where(seen, np.einsum("...ic,...jc->...ij", dout, vr), 0.0)
        else:
            dp = _pairwise_dot(dout, vr, seen)
        delta = np.where(seen, p * dp, 0.0).sum(axis=-1, keepdims=True)
        ds = np.where(seen, p * (dp - delta), 0.0)
    dq = scale * _masked_matmul(ds, seen, kr)
    dk = scale * _masked_matmul(np.swapaxes(ds, -1, -2), np.swapaxes(seen, -1, -2), q)
    dv = _masked_matmul(np.swapaxes(p, -1, -2), np.swapaxes(seen, -1, -2), dout)
    return dq, _sum_groups(dk, k_heads), _sum_groups(dv, k_heads)


def _pairwise_dot(a: np.ndarray, b: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """``a_i . b_j`` for every pair, NaN-exact per pair (non-finite inputs)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where(seen, (a[..., :, None, :] * b[..., None, :, :]).sum(axis=-1), 0.0)


def varlen_attention_backward(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    dout: ArrayLike,
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`attention_backward` of :func:`varlen_attention`: packed
    (Tq, H, d), (Tk, Hk, d), (Tk, Hk, dv) inputs and ``dout`` (Tq, H, dv);
    returns float64 ``(dq, dk, dv)`` of q's, k's and v's shapes."""
    cu_q, cu_k = np.asarray(cu_seqlens_q), np.asarray(cu_seqlens_k)
    q, k, v, dout = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dout))
    tq, h = q.shape[:2]
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(len(cu_q) - 1):
        qs = slice(int(cu_q[b]), int(cu_q[b + 1]))
        ks = slice(int(cu_k[b]), int(cu_k[b + 1]))
        extra = {}
        if bias is not None:
            extra["bias"] = np.broadcast_to(bias, (h, tq, k.shape[0]))[:, qs, ks]
        if mask is not None:
            extra["mask"] = np.broadcast_to(mask, (h, tq, k.shape[0]))[:, qs, ks]
        gq, gk, gv = attention_backward(
            q[qs].swapaxes(0, 1),
            k[ks].swapaxes(0, 1),
            v[ks].swapaxes(0, 1),
            dout[qs].swapaxes(0, 1),
            **extra,
            **options,
        )
        dq[qs] = gq.swapaxes(0, 1)
        dk[ks] = gk.swapaxes(0, 1)
        dv[ks] = gv.swapaxes(0, 1)
    return dq, dk, dv


def merge_attention(
    outs: Sequence[ArrayLike], lses: Sequence[ArrayLike]
) -> tuple[np.ndarray, np.ndarray]:
    """Combine partial attention results over disjoint key sets.

    ``outs[p]`` (..., Nq, dv) and ``lses[p]`` (..., Nq) are the results of
    attending to key set p. Returns the ``(out, lse)`` of attending to their
    union: weights ``exp(lse_p - lse)``, ``lse = log(sum_p exp(lse_p))``,
    evaluated as ``e_p = exp(lse_p - m)`` with m the largest lse_p, weights
    ``e_p / sum(e)`` and ``lse = m + log(sum(e))``, so that huge lses (where
    ``lse_p - lse`` would lose the log of the sum) stay exact. Parts with
    lse -inf weigh nothing; a row whose lses are all -inf gives zeros and
    -inf; a NaN lse makes its row NaN.
    """
    o_all = np.stack([np.asarray(o, dtype=np.float64) for o in outs])
    l_all = np.stack([np.asarray(x, dtype=np.float64) for x in lses])
    m = l_all.max(axis=0)  # NaN if any part is NaN
    shift = np.where(np.isneginf(m), 0.0, m)  # all parts empty: every e_p is 0
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(l_all - shift)
        total = e.sum(axis=0)
        w = np.where(total == 0, 0.0, e / total)
        lse = shift + np.log(total)
    return (w[..., None] * o_all).sum(axis=0), lse


def relative_error(out: ArrayLike, ref: ArrayLike) -> float:
    """``||out - ref|| / ||ref||`` (2-norm, float64) over the finite entries of
    ``ref`` (the absolute error when those are all 0); ``inf`` when the shapes
    differ or the non-finite entries do not match exactly (NaN where ``ref``
    is finite, a wrong or missing infinity, a non-finite value where ``ref``
    is finite). The one error measure of the tests, scripts and benchmark."""
    o = np.asarray(out, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if o.shape != r.shape:
        return math.inf
    finite = np.isfinite(r)
    if not np.array_equal(np.isnan(o), np.isnan(r)):
        return math.inf
    nonfinite = ~finite & ~np.isnan(r)
    if not np.array_equal(o[nonfinite], r[nonfinite]):
        return math.inf
    if not np.all(np.isfinite(o[finite])):
        return math.inf
    num = float(np.linalg.norm(o[finite] - r[finite]))
    den = float(np.linalg.norm(r[finite]))
    return num if den == 0 else num / den


def paged_attention(
    q: ArrayLike,
    k_cache: ArrayLike,
    v_cache: ArrayLike,
    block_table: ArrayLike,
    key_lengths: ArrayLike,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Attention over a paged KV cache: :func:`attention` on the gathered keys.

    q is (B, H, Nq, d); k_cache and v_cache (num_blocks, block_size, Hk, d)
    and (..., dv); sequence b's key position p is
    ``k_cache[block_table[b, p // block_size], p % block_size]``, for
    ``p < key_lengths[b]``. Only the blocks a length needs are read (later
    entries of ``block_table`` may hold anything). Takes the other options
    of :func:`scores` (bias and mask broadcast to (B, H, Nq, max_blocks *
    block_size), in logical key positions). Returns ``(out, lse)``.
    """
    q = np.asarray(q, dtype=np.float64)
    kc, vc = (np.asarray(a, dtype=np.float64) for a in (k_cache, v_cache))
    table = np.asarray(block_table)
    lengths = np.asarray(key_lengths)
    b = q.shape[0]
    _, bs, hk, _ = kc.shape
    nk = table.shape[1] * bs
    k = np.zeros((b, hk, nk, kc.shape[-1]))
    v = np.zeros((b, hk, nk, vc.shape[-1]))
    for s in range(b):
        for p in range(int(lengths[s])):
            blk = int(table[s, p // bs])
            k[s, :, p] = kc[blk, p % bs]
            v[s, :, p] = vc[blk, p % bs]
    return attention(q, k, v, key_lengths=lengths, **options)
