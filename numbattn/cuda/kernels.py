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

Sequences, options and grouped-query attention
    The attention and scores kernels take q (G1, Hq, ...), k and v
    (G1, Hk, ...) and a device int64 sequence table ``seq`` (G1, Hq, 5)
    (:mod:`numbattn._sequences`; zero strides where rows repeat). Block
    (a, h) reads its row of the table once: query rows ``Q_OFF + i``,
    keys ``K_OFF + j`` of key head ``h // (Hq // Hk)``. Query tiles run
    over ``max_rows``; a block whose tile starts at or past its Q_ROWS
    returns at once (block-uniform, before any barrier). Windows arrive as
    two ints (-1 unbounded; causal is ``right = 0``); bias (input dtype)
    and mask (bool) as 4-d arrays indexed like q's rows x k's rows, with
    ``has_bias``/``has_mask`` flags (1-element dummies when absent), so one
    compiled kernel per dtype and geometry serves every combination; the
    flags are block-uniform branches that cost nothing on the fast path.

Fused attention (:func:`make_attention`)
    One block of ``TY*TX`` threads per (batch element, tile of ``BQ = TY*RQ``
    query rows); query tiles are visited last-first so that, under causal
    masking, the heaviest tiles start first. Thread (ty, tx) owns rows
    ``ty + TY*a`` (a < RQ). The keys any row of the tile can see form one
    range [lo, hi) (lengths and window, bottom-right aligned per sequence);
    only the ``ceil((hi - lo) / BK)`` key tiles starting at lo are visited,
    so causal, windowed and length-masked keys cost no loads and no
    arithmetic, and keys outside [0, K_LEN) are never read. Per key tile of
    ``BK = TX*RK`` keys:

    1. scores: the thread computes an RQ x RK register micro-tile
       (keys ``tx + TX*b``) from Q^T (resident in shared memory when
       d <= DC, else re-staged per d-chunk) and K^T staged in shared memory
       per chunk of DC dims: RQ+RK shared loads per RQ*RK FMAs;
    2. visibility: a tile that every row of the block sees entirely (all
       rows real, ``j0 >= lo`` of the last row, ``j0 + BK <= hi`` of the
       first) and no mask takes the fast path, ``s * scale`` (``+ bias``
       when given); otherwise each element is tested against its row's
       range ``[lo_i, hi_i)`` and the mask, and the bias is read only for
       visible elements;
    3. online softmax: row maxima and sums over the TX threads sharing a row
       go through two small shared buffers (no shuffles); every thread of a
       row computes the same values in the same order, so they agree;
       P = exp(S - m) is written to shared memory (aliasing the K^T tile,
       dead by then); a row whose scores are all -inf so far (window, mask,
       -inf bias) keeps m = -inf and exponentiates against 0, never NaN.
       A masked score (-inf) is stored as -0.0 in P, an unmasked one that
       underflows as +0.0 (the same in every product with a finite value);
    4. P @ V: the thread accumulates an RQ x RC register tile of the output
       (columns ``tx + TX*c``) from P and the V tile in shared memory.
       Masked keys are never read: when the V tile holds a NaN or inf
       (each thread flags what it staged; the barrier after the row maxima
       is a ``syncthreads_or`` that makes the flag block-uniform), P @ V
       skips the -0.0 entries of P instead of forming 0 * NaN; otherwise
       the plain loop runs. A -inf bias masks whatever the dot product.

    Rows ``Q_LEN <= i < Q_ROWS`` and rows that see no key get zeros and
    lse = -inf. dv is limited to ``DVC = TX*RC`` per launch; the backend
    splits larger dv into several launches over column slices of V and out
    (each recomputes the scores). Shared-memory rows are padded (+1) so the
    transposed stores and the strided reads are bank-conflict free. The
    options add no shared memory; registers: a handful of block-uniform
    scalars (table row, lo/hi bounds, flags) and two per-row bounds in the
    visibility step.

    Index arithmetic (registers): Numba's signed array indices carry a
    negative-index fix-up (compare, select, the dimension's extent kept
    live), and its floor division and modulo of a signed value carry sign
    fix-ups. The kernel therefore zero-extends the thread index (so
    ``tid // TX`` etc. are plain shifts), casts the batch indices and every
    global row/column index to ``uint32`` (token counts are < 2**31), and
    stages tiles with compile-time trip counts over an unsigned element
    index (``tid + NT*it``: fully unrolled, constant shared offsets). The
    Q^T/K^T reads of the scores loop and the P reads of P @ V use unsigned
    loop indices; the V reads keep a signed one (unsigned, ptxas pipelines
    the V loads and float64 needs ~60 more registers). Together this took
    the production geometries from 241 (float32) / 252 (float64) registers
    per thread to <= 168, with no spills.

Scores (:func:`make_scores`)
    Classic T x T shared-memory tiling (one output per thread, d in chunks
    of T). Sequence (a, h) writes its rows ``Q_OFF + i`` (i < Q_ROWS) across
    all columns (column c is its key ``c - K_OFF``); a tile none of whose
    rows sees any of its keys skips the products and writes -inf.

Merge (:func:`make_merge`)
    One thread per row combines two partial results: weights
    ``exp(l - max(l1, l2))``; elementwise, so it may run in place.

Softmax (:func:`make_softmax`)
    One block of NT threads per row; strided loops over the row (any N);
    max and sum by shared-memory tree reductions; the row (then its
    exponentials) is cached in shared memory when N <= CACHE, else re-read.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int32, int64, uint32


def _types(dtype):
    dtype = np.dtype(dtype)
    return (float32 if dtype == np.float32 else float64), dtype.type


def make_attention(dtype, TY, TX, RQ, RK, DC, RC):
    """Fused attention kernel for one geometry (see the module docstring).

    Signature::

        kernel(q, k, v, out, lse, seq, bias, mask, scale, n_qt,
               window_left, window_right, write_lse, has_bias, has_mask)

    q (G1, Hq, Tq, d), k (G1, Hk, Tk, d), v (G1, Hk, Tk, dv <= TX*RC),
    out (G1, Hq, Tq, dv), lse (G1, Hq, Tq) (ignored unless write_lse),
    seq int64 (G1, Hq, 5) (:mod:`numbattn._sequences`), bias (G1, Hq, Tq, Tk)
    of the array dtype and mask bool (G1, Hq, Tq, Tk) (any 4-d dummy unless
    has_bias / has_mask), scale of the array dtype, n_qt = ceil(max_rows/BQ),
    windows -1 = unbounded. Launch: grid = G1*Hq*n_qt, block = TY*TX.
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
    NZERO = sc_t(-0.0)  # P of a masked key
    ONE = sc_t(1.0)
    BIG = 1 << 40  # "unbounded" window side, far beyond any index

    @cuda.jit
    def attention_kernel(
        q,
        k,
        v,
        out,
        lse,
        seq,
        bias,
        mask,
        scale,
        n_qt,
        wl,
        wr,
        write_lse,
        has_bias,
        has_mask,
    ):
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
        d = q.shape[3]
        dv = v.shape[3]
        bid = cuda.blockIdx.x
        qt = n_qt - 1 - bid % n_qt
        rest = bid // n_qt
        b2 = uint32(rest % g2n)
        b1 = uint32(rest // g2n)
        i0 = qt * BQ
        q_rows = seq[b1, b2, 2]
        if i0 >= q_rows:
            return  # whole block: past this sequence's rows
        q_off = seq[b1, b2, 0]
        q_len = seq[b1, b2, 1]
        k_off = seq[b1, b2, 3]
        k_len = seq[b1, b2, 4]
        hk = uint32(b2 // (g2n // k.shape[1]))  # grouped-query attention
        tid = int64(uint32(cuda.threadIdx.x))  # zero-extended: known >= 0
        tx = tid % TX
        ty = tid // TX
        offset = k_len - q_len

        # Row i (local) sees keys [i + lo_base, min(k_len, i + hi_base)):
        # block constants, so the per-element test has no window branches.
        lo_base = -BIG
        hi_base = BIG
        if wl >= 0:
            lo_base = offset - wl
        if wr >= 0:
            hi_base = offset + wr + 1
        # Keys [lo, hi) are the only ones any row of this tile can see. A
        # key tile [j0, j0 + BK) needs no per-element test when every row
        # sees all of it (j0 >= lo_max, j0 + BK <= hi_min) and there is no
        # mask; hi_min = -1 forces the test.
        lo = 0
        hi = 0
        if i0 < q_len:
            lo = max(0, i0 + lo_base)
            hi = min(k_len, min(i0 + BQ, q_len) - 1 + hi_base)
        lo_max = i0 + BQ - 1 + lo_base
        hi_min = min(k_len, i0 + hi_base)
        if has_mask or i0 + BQ > q_len:
            hi_min = -1
        n_kt = 0
        if hi > lo:
            n_kt = (hi - lo + BK - 1) // BK
        q_resident = d <= DC

        for a in range(RQ):
            mrow[a] = NINF
            lrow[a] = ZERO
            for c in range(RC):
                acc[a, c] = ZERO

        # Staging loops: element idx = tid + NT*it of a row-major tile.
        if q_resident and n_kt > 0:
            for it in range((BQ * DC + NT - 1) // NT):
                idx = uint32(tid + NT * it)
                if idx >= BQ * DC:
                    continue
                r = idx // DC
                p = idx % DC
                i = i0 + r
                val = ZERO
                if i < q_len and p < d:
                    val = q[b1, b2, uint32(q_off + i), uint32(p)]
                sh[p * QS + r] = val

        for kt in range(n_kt):
            j0 = lo + kt * BK
            for a in range(RQ):
                for b in range(RK):
                    s[a, b] = ZERO
            # V tile (BK x DVC), zero-padded past hi; bad: a NaN or inf staged.
            bad = int32(0)  # int: syncthreads_or takes no bool on hardware
            for it in range((BK * DVC + NT - 1) // NT):
                idx = uint32(tid + NT * it)
                if idx >= BK * DVC:
                    continue
                j = idx // DVC
                c = idx % DVC
                jj = j0 + j
                val = ZERO
                if jj < hi and c < dv:
                    val = v[b1, hk, uint32(k_off + jj), uint32(c)]
                    if not math.isfinite(val):
                        bad = int32(1)
                sh[OFF_V + idx] = val
            # S = Q K^T, d in chunks of DC.
            for p0 in range(0, d, DC):
                if p0 > 0:
                    cuda.syncthreads()
                if not q_resident:
                    for it in range((BQ * DC + NT - 1) // NT):
                        idx = uint32(tid + NT * it)
                        if idx >= BQ * DC:
                            continue
                        r = idx // DC
                        p = idx % DC
                        i = i0 + r
                        pp = p0 + p
                        val = ZERO
                        if i < q_len and pp < d:
                            val = q[b1, b2, uint32(q_off + i), uint32(pp)]
                        sh[p * QS + r] = val
                for it in range((BK * DC + NT - 1) // NT):
                    idx = uint32(tid + NT * it)
                    if idx >= BK * DC:
                        continue
                    j = idx // DC
                    p = idx % DC
                    jj = j0 + j
                    pp = p0 + p
                    val = ZERO
                    if jj < hi and pp < d:
                        val = k[b1, hk, uint32(k_off + jj), uint32(pp)]
                    sh[OFF_K + p * KS + j] = val
                cuda.syncthreads()
                pc = min(DC, d - p0)
                for pi in range(pc):
                    p = uint32(pi)  # unsigned: no negative-index fix-up
                    for a in range(RQ):
                        qa[a] = sh[p * QS + ty + TY * a]
                    for b in range(RK):
                        kb[b] = sh[OFF_K + p * KS + tx + TX * b]
                    for a in range(RQ):
                        for b in range(RK):
                            s[a, b] += qa[a] * kb[b]
            # Scale, visibility / mask / bias, partial row maxima.
            check = j0 < lo_max or j0 + BK > hi_min
            # Key jj is visible to row i iff lo_base <= jj - i < hi_base,
            # jj < k_len and i < q_len; jj - i = diag + (TX*b - TY*a) with
            # one per-tile value and compile-time offsets (no per-row
            # bounds for the compiler to hoist into registers).
            diag = j0 - i0 + tx - ty
            kmax = k_len - j0 - tx  # visible keys need TX*b < kmax
            rmax = q_len - i0 - ty  # real rows need TY*a < rmax
            for a in range(RQ):
                r = ty + TY * a
                i = i0 + r
                mx = NINF
                for b in range(RK):
                    t = s[a, b] * scale
                    if check or has_bias:
                        vis = True
                        if check:
                            u = diag + (TX * b - TY * a)
                            vis = u >= lo_base and u < hi_base and TX * b < kmax and TY * a < rmax
                            if vis and has_mask:
                                vis = mask[
                                    b1, b2, uint32(q_off + i), uint32(k_off + j0 + tx + TX * b)
                                ]
                        if not vis:
                            t = NINF
                        elif has_bias:
                            bv = bias[b1, b2, uint32(q_off + i), uint32(k_off + j0 + tx + TX * b)]
                            t = NINF if bv == NINF else t + bv  # -inf bias masks
                    s[a, b] = t
                    if t > mx or t != t:
                        mx = t
                sh[OFF_R1 + r * TX + tx] = mx
            vbad = cuda.syncthreads_or(bad)  # block-uniform: a non-finite V
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
                    t = s[a, b]
                    e = NZERO if t == NINF else math.exp(t - ms)
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
            if vbad:  # skip masked keys (P = -0.0): never 0 * NaN
                for j in range(BK):
                    for a in range(RQ):
                        qa[a] = sh[OFF_K + (ty + TY * a) * KS + uint32(j)]
                    for c in range(RC):
                        vc[c] = sh[OFF_V + j * DVC + tx + TX * c]
                    for a in range(RQ):
                        pa = qa[a]
                        if pa != ZERO or math.copysign(ONE, pa) > ZERO:
                            for c in range(RC):
                                acc[a, c] += pa * vc[c]
            else:
                for j in range(BK):
                    for a in range(RQ):
                        qa[a] = sh[OFF_K + (ty + TY * a) * KS + uint32(j)]
                    for c in range(RC):
                        vc[c] = sh[OFF_V + j * DVC + tx + TX * c]
                    for a in range(RQ):
                        for c in range(RC):
                            acc[a, c] += qa[a] * vc[c]
            cuda.syncthreads()

        for a in range(RQ):
            i = i0 + ty + TY * a
            if i < q_rows:
                m = mrow[a]
                if m == NINF:
                    for c in range(RC):
                        col = tx + TX * c
                        if col < dv:
                            out[b1, b2, q_off + i, col] = ZERO
                    if write_lse and tx == 0:
                        lse[b1, b2, q_off + i] = NINF
                else:
                    inv = ONE / lrow[a]
                    for c in range(RC):
                        col = tx + TX * c
                        if col < dv:
                            out[b1, b2, q_off + i, col] = acc[a, c] * inv
                    if write_lse and tx == 0:
                        lse[b1, b2, q_off + i] = m + math.log(lrow[a])

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
    """Scores kernel for a T x T tile.

    Signature: ``kernel(q, k, out, seq, bias, mask, scale, n_it, window_left,
    window_right, has_bias, has_mask)`` with the arrays of
    :func:`make_attention` and out (G1, Hq, Tq, Tk). Sequence (a, h) writes
    rows ``Q_OFF + i`` (i < Q_ROWS) of out, every column c (Tk of them), the
    column's local key being ``c - K_OFF``. Launch: grid =
    G1*Hq*n_it*ceil(Tk/T) with n_it = ceil(max_rows/T), block = T*T.
    """
    nt, sc_t = _types(dtype)
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    T1 = T + 1  # padded rows: conflict-free column reads

    @cuda.jit
    def scores_kernel(q, k, out, seq, bias, mask, scale, n_it, wl, wr, has_bias, has_mask):
        sq = cuda.shared.array((T, T1), nt)
        sk = cuda.shared.array((T, T1), nt)
        g2n = q.shape[1]
        d = q.shape[3]
        ncol = out.shape[3]
        n_jt = (ncol + T - 1) // T
        bid = cuda.blockIdx.x
        jt = bid % n_jt
        rest = bid // n_jt
        it = rest % n_it
        rest = rest // n_it
        b2 = rest % g2n
        b1 = rest // g2n
        i0 = it * T
        q_rows = seq[b1, b2, 2]
        if i0 >= q_rows:
            return
        q_off = seq[b1, b2, 0]
        q_len = seq[b1, b2, 1]
        k_off = seq[b1, b2, 3]
        k_len = seq[b1, b2, 4]
        hk = b2 // (g2n // k.shape[1])
        tx = cuda.threadIdx.x % T
        ty = cuda.threadIdx.x // T
        offset = k_len - q_len
        i = i0 + ty
        j0 = jt * T - k_off  # local key of the tile's first column
        j = j0 + tx
        # Keys any row of the tile sees: [lo, hi); skip the products if the
        # tile's keys [j0, j0 + T) miss it.
        lo = 0
        hi = k_len
        if i0 >= q_len:
            hi = 0
        else:
            if wl >= 0:
                lo = i0 + offset - wl
            if wr >= 0:
                hi = min(k_len, min(i0 + T, q_len) - 1 + offset + wr + 1)
        skip = j0 + T <= lo or j0 >= hi or hi <= lo
        acc = ZERO
        if not skip:
            for p0 in range(0, d, T):
                pp = p0 + tx
                val = ZERO
                if i < q_len and pp < d:
                    val = q[b1, b2, q_off + i, pp]
                sq[ty, tx] = val
                jl = j0 + ty
                val = ZERO
                if jl >= 0 and jl < k_len and pp < d:
                    val = k[b1, hk, k_off + jl, pp]
                sk[ty, tx] = val
                cuda.syncthreads()
                for p in range(T):
                    acc += sq[ty, p] * sk[tx, p]
                cuda.syncthreads()
        c = jt * T + tx
        if i < q_rows and c < ncol:
            vis = (not skip) and i < q_len and j >= 0 and j < k_len
            if vis and wl >= 0:
                vis = j >= i + offset - wl
            if vis and wr >= 0:
                vis = j <= i + offset + wr
            if vis and has_mask:
                vis = mask[b1, b2, q_off + i, c]
            if vis:
                t = acc * scale
                if has_bias:
                    bv = bias[b1, b2, q_off + i, c]
                    t = NINF if bv == NINF else t + bv  # -inf bias masks
                out[b1, b2, q_off + i, c] = t
            else:
                out[b1, b2, q_off + i, c] = NINF

    return scores_kernel


def make_merge(dtype, NT):
    """``kernel(o1, l1, o2, l2, out, lse, write_lse)``: combine two partial results.

    o (G1, G2, Nq, dv), l (G1, G2, Nq); one thread per row, so ``out``/``lse``
    may be ``o1``/``l1`` (or ``o2``/``l2``) themselves: a thread reads each
    element before writing it. Launch: grid = ceil(G1*G2*Nq / NT), block = NT.
    """
    _, sc_t = _types(dtype)
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    ONE = sc_t(1.0)

    @cuda.jit
    def merge_kernel(o1, l1, o2, l2, out, lse, write_lse):
        g2n = o1.shape[1]
        nq = o1.shape[2]
        dv = o1.shape[3]
        row = cuda.blockIdx.x * NT + cuda.threadIdx.x
        if row >= o1.shape[0] * g2n * nq:
            return
        i = row % nq
        rest = row // nq
        b2 = rest % g2n
        b1 = rest // g2n
        x1 = l1[b1, b2, i]
        x2 = l2[b1, b2, i]
        m = x1
        if x2 > x1 or x2 != x2:
            m = x2
        if m == NINF:
            for c in range(dv):
                out[b1, b2, i, c] = ZERO
            if write_lse:
                lse[b1, b2, i] = NINF
            return
        w1 = math.exp(x1 - m)
        w2 = math.exp(x2 - m)
        tot = w1 + w2
        inv = ONE / tot
        w1 *= inv
        w2 *= inv
        for c in range(dv):
            out[b1, b2, i, c] = w1 * o1[b1, b2, i, c] + w2 * o2[b1, b2, i, c]
        if write_lse:
            lse[b1, b2, i] = m + math.log(tot)

    return merge_kernel


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
