"""CUDA kernels (``numba.cuda.jit``), built by factories per compile-time geometry.

Every kernel takes arrays with exactly two leading batch dimensions (G1, G2)
and arbitrary strides (layout 'A'), writes every element of its outputs and
validates nothing. Shared-memory sizes must be compile-time constants in
Numba, so each factory closes over its tile sizes; :mod:`numbattn.cuda.backend`
caches one kernel per (dtype, geometry) and picks the geometry from
:mod:`numbattn.config` at call time.

No warp shuffles and no libdevice-only intrinsics are used, so every kernel
also runs under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``). No
``fastmath``: NVVM contracts multiply-adds into FMAs by default, and exp/log
stay the accurate libdevice versions (float32 ``math.exp`` maps to
``__nv_expf``), which keeps float32 within 1e-5 and float64 within 1e-12 of
the float64 reference.

Fused attention (:func:`make_attention`)
    One block of ``TY*TX`` threads per (batch element, tile of ``BQ = TY*RQ``
    query rows); query tiles are visited last-first so that, under causal
    masking, the heaviest tiles start first. Thread (ty, tx) owns rows
    ``ty + TY*a`` (a < RQ). Per key tile of ``BK = TX*RK`` keys:

    1. scores: the thread computes an RQ x RK register micro-tile
       (keys ``tx + TX*b``) from Q^T (resident in shared memory when
       d <= DC, else re-staged per d-chunk) and K^T staged in shared memory
       per chunk of DC dims: RQ+RK shared loads per RQ*RK FMAs;
    2. online softmax: row maxima and sums over the TX threads sharing a row
       go through two small shared buffers (no shuffles); every thread of a
       row computes the same values in the same order, so they agree;
       P = exp(S - m) is written to shared memory (aliasing the K^T tile,
       dead by then);
    3. P @ V: the thread accumulates an RQ x RC register tile of the output
       (columns ``tx + TX*c``) from P and the V tile in shared memory.

    Fully masked key tiles (causal) are never visited. dv is limited to
    ``DVC = TX*RC`` per launch; the backend splits larger dv into several
    launches over column slices of V and out (each recomputes the scores).
    Shared-memory rows are padded (+1) so the transposed stores and the
    strided reads are bank-conflict free.

Scores (:func:`make_scores`)
    Classic T x T shared-memory tiling (one output per thread, d in chunks
    of T); a fully masked tile (causal) skips the products and writes -inf.

Softmax (:func:`make_softmax`)
    One block of NT threads per row; strided loops over the row (any N);
    max and sum by shared-memory tree reductions; the row (then its
    exponentials) is cached in shared memory when N <= CACHE, else re-read.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64


def _types(dtype):
    dtype = np.dtype(dtype)
    return (float32 if dtype == np.float32 else float64), dtype.type


def make_attention(dtype, TY, TX, RQ, RK, DC, RC):
    """Fused attention kernel for one geometry (see the module docstring).

    Signature: ``kernel(q, k, v, out, lse, scale, causal, write_lse)`` with
    q (G1, G2, Nq, d), k (G1, G2, Nk, d), v (G1, G2, Nk, dv <= TX*RC),
    out (G1, G2, Nq, dv), lse (G1, G2, Nq) (ignored unless write_lse),
    scale of the array dtype. Launch: grid = G1*G2*ceil(Nq/BQ), block = TY*TX.
    """
    nt, sc_t = _types(dtype)
    NT = TY * TX
    BQ = TY * RQ
    BK = TX * RK
    DVC = TX * RC
    QS = BQ + 1  # row stride of Q^T (one row per head dimension)
    KS = BK + 1  # row stride of K^T and of P
    OFF_K = DC * QS
    OFF_V = OFF_K + max(DC * KS, BQ * KS)
    OFF_R1 = OFF_V + BK * DVC
    OFF_R2 = OFF_R1 + BQ * TX
    TOTAL = OFF_R2 + BQ * TX
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    ONE = sc_t(1.0)

    @cuda.jit
    def attention_kernel(q, k, v, out, lse, scale, causal, write_lse):
        sh = cuda.shared.array(TOTAL, nt)
        acc = cuda.local.array((RQ, RC), nt)
        s = cuda.local.array((RQ, RK), nt)
        mrow = cuda.local.array(RQ, nt)
        lrow = cuda.local.array(RQ, nt)
        alpha = cuda.local.array(RQ, nt)
        qa = cuda.local.array(RQ, nt)
        kb = cuda.local.array(RK, nt)
        vc = cuda.local.array(RC, nt)

        g2n = q.shape[1]
        nq = q.shape[2]
        d = q.shape[3]
        nk = k.shape[2]
        dv = v.shape[3]
        n_qt = (nq + BQ - 1) // BQ
        bid = cuda.blockIdx.x
        qt = n_qt - 1 - bid % n_qt
        rest = bid // n_qt
        b2 = rest % g2n
        b1 = rest // g2n
        tid = cuda.threadIdx.x
        tx = tid % TX
        ty = tid // TX
        i0 = qt * BQ
        offset = nk - nq

        kend = nk
        if causal:
            kend = min(nk, min(i0 + BQ, nq) + offset)
            if kend < 0:
                kend = 0
        n_kt = (kend + BK - 1) // BK
        q_resident = d <= DC

        for a in range(RQ):
            mrow[a] = NINF
            lrow[a] = ZERO
            for c in range(RC):
                acc[a, c] = ZERO

        if q_resident:
            for idx in range(tid, BQ * DC, NT):
                r = idx // DC
                p = idx % DC
                i = i0 + r
                val = ZERO
                if i < nq and p < d:
                    val = q[b1, b2, i, p]
                sh[p * QS + r] = val

        for kt in range(n_kt):
            j0 = kt * BK
            for a in range(RQ):
                for b in range(RK):
                    s[a, b] = ZERO
            # V tile (BK x DVC), zero-padded.
            for idx in range(tid, BK * DVC, NT):
                j = idx // DVC
                c = idx % DVC
                jj = j0 + j
                val = ZERO
                if jj < nk and c < dv:
                    val = v[b1, b2, jj, c]
                sh[OFF_V + idx] = val
            # S = Q K^T, d in chunks of DC.
            for p0 in range(0, d, DC):
                if p0 > 0:
                    cuda.syncthreads()
                if not q_resident:
                    for idx in range(tid, BQ * DC, NT):
                        r = idx // DC
                        p = idx % DC
                        i = i0 + r
                        pp = p0 + p
                        val = ZERO
                        if i < nq and pp < d:
                            val = q[b1, b2, i, pp]
                        sh[p * QS + r] = val
                for idx in range(tid, BK * DC, NT):
                    j = idx // DC
                    p = idx % DC
                    jj = j0 + j
                    pp = p0 + p
                    val = ZERO
                    if jj < nk and pp < d:
                        val = k[b1, b2, jj, pp]
                    sh[OFF_K + p * KS + j] = val
                cuda.syncthreads()
                pc = min(DC, d - p0)
                for p in range(pc):
                    for a in range(RQ):
                        qa[a] = sh[p * QS + ty + TY * a]
                    for b in range(RK):
                        kb[b] = sh[OFF_K + p * KS + tx + TX * b]
                    for a in range(RQ):
                        for b in range(RK):
                            s[a, b] += qa[a] * kb[b]
            # Scale, mask, partial row maxima.
            for a in range(RQ):
                r = ty + TY * a
                i = i0 + r
                mx = NINF
                for b in range(RK):
                    jj = j0 + tx + TX * b
                    t = s[a, b] * scale
                    if jj >= nk or (causal and jj > i + offset):
                        t = NINF
                    s[a, b] = t
                    if t > mx or t != t:
                        mx = t
                sh[OFF_R1 + r * TX + tx] = mx
            cuda.syncthreads()
            # Row maxima, rescale factors, P = exp(S - m) into shared memory.
            for a in range(RQ):
                r = ty + TY * a
                mt = mrow[a]
                for x in range(TX):
                    t = sh[OFF_R1 + r * TX + x]
                    if t > mt or t != t:
                        mt = t
                ms = mt
                if mt == NINF:
                    ms = ZERO
                alpha[a] = math.exp(mrow[a] - ms)
                mrow[a] = mt
                ps = ZERO
                for b in range(RK):
                    e = math.exp(s[a, b] - ms)
                    sh[OFF_K + r * KS + tx + TX * b] = e
                    ps += e
                sh[OFF_R2 + r * TX + tx] = ps
            cuda.syncthreads()
            for a in range(RQ):
                r = ty + TY * a
                tot = ZERO
                for x in range(TX):
                    tot += sh[OFF_R2 + r * TX + x]
                lrow[a] = lrow[a] * alpha[a] + tot
                for c in range(RC):
                    acc[a, c] *= alpha[a]
            # O += P V
            for j in range(BK):
                for a in range(RQ):
                    qa[a] = sh[OFF_K + (ty + TY * a) * KS + j]
                for c in range(RC):
                    vc[c] = sh[OFF_V + j * DVC + tx + TX * c]
                for a in range(RQ):
                    for c in range(RC):
                        acc[a, c] += qa[a] * vc[c]
            cuda.syncthreads()

        for a in range(RQ):
            i = i0 + ty + TY * a
            if i < nq:
                m = mrow[a]
                if m == NINF:
                    for c in range(RC):
                        col = tx + TX * c
                        if col < dv:
                            out[b1, b2, i, col] = ZERO
                    if write_lse and tx == 0:
                        lse[b1, b2, i] = NINF
                else:
                    inv = ONE / lrow[a]
                    for c in range(RC):
                        col = tx + TX * c
                        if col < dv:
                            out[b1, b2, i, col] = acc[a, c] * inv
                    if write_lse and tx == 0:
                        lse[b1, b2, i] = m + math.log(lrow[a])

    attention_kernel.geometry = dict(
        threads=NT,
        query_tile=BQ,
        key_tile=BK,
        head_chunk=DC,
        value_chunk=DVC,
        shared_bytes=TOTAL * np.dtype(dtype).itemsize,
    )
    return attention_kernel


def attention_shared_bytes(dtype, TY, TX, RQ, RK, DC, RC):
    BQ, BK = TY * RQ, TX * RK
    total = DC * (BQ + 1) + max(DC, BQ) * (BK + 1) + BK * TX * RC + 2 * BQ * TX
    return total * np.dtype(dtype).itemsize


def make_scores(dtype, T):
    """``kernel(q, k, out, scale, causal)``; grid = G1*G2*ceil(Nq/T)*ceil(Nk/T), block = T*T."""
    nt, sc_t = _types(dtype)
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    T1 = T + 1  # padded rows: conflict-free column reads

    @cuda.jit
    def scores_kernel(q, k, out, scale, causal):
        sq = cuda.shared.array((T, T1), nt)
        sk = cuda.shared.array((T, T1), nt)
        g2n = q.shape[1]
        nq = q.shape[2]
        d = q.shape[3]
        nk = k.shape[2]
        n_it = (nq + T - 1) // T
        n_jt = (nk + T - 1) // T
        bid = cuda.blockIdx.x
        jt = bid % n_jt
        rest = bid // n_jt
        it = rest % n_it
        rest = rest // n_it
        b2 = rest % g2n
        b1 = rest // g2n
        tx = cuda.threadIdx.x % T
        ty = cuda.threadIdx.x // T
        i = it * T + ty
        j = jt * T + tx
        offset = nk - nq
        skip = causal and jt * T > min(it * T + T, nq) - 1 + offset
        acc = ZERO
        if not skip:
            for p0 in range(0, d, T):
                pp = p0 + tx
                val = ZERO
                if i < nq and pp < d:
                    val = q[b1, b2, i, pp]
                sq[ty, tx] = val
                jl = jt * T + ty
                val = ZERO
                if jl < nk and pp < d:
                    val = k[b1, b2, jl, pp]
                sk[ty, tx] = val
                cuda.syncthreads()
                for p in range(T):
                    acc += sq[ty, p] * sk[tx, p]
                cuda.syncthreads()
        if i < nq and j < nk:
            if causal and j > i + offset:
                out[b1, b2, i, j] = NINF
            else:
                out[b1, b2, i, j] = acc * scale

    return scores_kernel


def make_softmax(dtype, NT, CACHE):
    """``kernel(x, out)``; grid = G1*G2 rows, block = NT (a power of two)."""
    nt, sc_t = _types(dtype)
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    ONE = sc_t(1.0)
    NAN = sc_t(np.nan)

    @cuda.jit
    def softmax_kernel(x, out):
        red = cuda.shared.array(NT, nt)
        cache = cuda.shared.array(CACHE, nt)
        g2n = x.shape[1]
        n = x.shape[2]
        row = cuda.blockIdx.x
        b2 = row % g2n
        b1 = row // g2n
        tid = cuda.threadIdx.x
        cached = n <= CACHE

        mx = NINF
        for j in range(tid, n, NT):
            t = x[b1, b2, j]
            if cached:
                cache[j] = t
            if t > mx or t != t:
                mx = t
        red[tid] = mx
        cuda.syncthreads()
        w = NT // 2
        while w > 0:
            if tid < w:
                o = red[tid + w]
                if o > red[tid] or o != o:
                    red[tid] = o
            cuda.syncthreads()
            w //= 2
        m = red[0]
        cuda.syncthreads()

        if m != m or m == NINF:
            fill = NAN if m != m else ZERO
            for j in range(tid, n, NT):
                out[b1, b2, j] = fill
            return

        tot = ZERO
        for j in range(tid, n, NT):
            if cached:
                e = math.exp(cache[j] - m)
                cache[j] = e
            else:
                e = math.exp(x[b1, b2, j] - m)
            tot += e
        red[tid] = tot
        cuda.syncthreads()
        w = NT // 2
        while w > 0:
            if tid < w:
                red[tid] += red[tid + w]
            cuda.syncthreads()
            w //= 2
        inv = ONE / red[0]
        for j in range(tid, n, NT):
            if cached:
                e = cache[j]
            else:
                e = math.exp(x[b1, b2, j] - m)
            out[b1, b2, j] = e * inv

    return softmax_kernel
