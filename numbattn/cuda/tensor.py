"""The fused forward and ``scores`` on the tensor cores, float32 and float64.

One fused kernel for every product step of :mod:`numbattn.cuda.steps` (3xTF32 or
TF32 for float32; m16n8k8 or m8n8k4 DMMA for float64): same arguments,
launch and results as the FMA kernel (:func:`numbattn.cuda.kernels.make_attention`).

Warp ``w`` owns query rows ``16w .. 16w + 15`` of the tile; lane (g, t) =
(lane // 4, lane % 4) owns rows ``r0 = 16w + g`` and ``r0 + 8``.

* S = Q K^T: per k-step of 8 head dimensions ``p`` and n-tile of 8 keys
  ``n``, A = Q[r][p + .] and B = K[8n + g][p + .] from shared memory; the
  lane holds S[r0 + 8h][8n + 2t + e] (h, e < 2) in ``sacc[4n + 2h + e]``.
* O += P V takes P straight from those registers: the k-step over the
  8 keys of n-tile ``j`` relabels its index, k-column ``t`` being key
  ``8j + 2t`` and ``t + 4`` key ``8j + 2t + 1``, so A = (sacc[4j], sacc[4j + 2],
  sacc[4j + 1], sacc[4j + 3]) and B = V[8j + 2t + {0, 1}][8m + g]. No
  shuffle, no shared-memory round trip.
* Row maxima and sums combine the four lanes of a row: shuffles on
  hardware, shared memory on the simulator.
* A NaN or inf staged in V (a block-uniform flag) takes a scalar path for
  the tile: P through shared memory, masked keys (P = -0.0) skipped, so
  that they never meet 0 * inf.

The scores kernel (:func:`make_scores_tc`) computes S = Q K^T the same way
over a tile of columns and writes it, scaled, biased and masked, in place
of the FMA kernel (:func:`numbattn.cuda.kernels.make_scores`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, int32, int64, uint32

from .blocks import block_ranges
from .geometry import TensorCoreGeometry, TensorCoreScoresGeometry, scratch_elements
from .kernels import (
    _block_keys,
    _device,
    _nanmax,
    _on_simulator,
    _softmax_shift,
    _stage_plan,
    _types,
)
from .steps import product_step

U = uint32
I31 = (1 << 31) - 1
M32 = (1 << 32) - 1


def _stager(ROWS: int, COLS: int, NT: int, CHECK: bool, zero):
    """Device function ``stage(sh, x, b1, bh, row0, nrows, col0, ncols, off,
    stride, utid) -> bad``: copies ``x[b1, bh, row0 + r, col0 + c]`` for
    r < ROWS, c < COLS into ``sh[off + r * stride + c]``, zeros outside
    ``nrows`` x ``ncols``. ``bad`` (``CHECK`` only) is 1 where this thread
    copied a NaN or inf. Consecutive threads take consecutive columns
    (:func:`numbattn.cuda.kernels._stage_plan`)."""
    FAST, STEP = _stage_plan(COLS, NT)

    def stage(sh, x, b1, bh, row0, nrows, col0, ncols, off, stride, utid):
        bad = int32(0)
        if FAST:
            rr = U(utid // U(COLS))
            p = U(utid % U(COLS))
            while rr < U(ROWS):
                val = zero
                if rr < nrows and p < ncols:
                    val = x[b1, bh, U(row0 + rr), U(col0 + p)]
                    if CHECK and not math.isfinite(val):
                        bad = int32(1)
                sh[U(off + rr * stride + p)] = val
                rr = U(rr + U(STEP))
        else:
            idx = utid
            while idx < U(ROWS * COLS):
                rr = U(idx // U(COLS))
                p = U(idx % U(COLS))
                val = zero
                if rr < nrows and p < ncols:
                    val = x[b1, bh, U(row0 + rr), U(col0 + p)]
                    if CHECK and not math.isfinite(val):
                        bad = int32(1)
                sh[U(off + rr * stride + p)] = val
                idx = U(idx + U(NT))
        return bad

    return _device(stage)


def make_attention_tc(geo: TensorCoreGeometry, hw: bool = False):
    """The fused attention kernel of ``geo`` (see the module docstring).

    ``hw``: the product step as inline PTX, shuffles, launch bounds and
    aligned shared memory; otherwise the simulator's portable path, whose
    step emulates the hardware's fragment layout.
    """
    dtype = np.dtype(geo.dtype)
    nt, sc_t = _types(dtype)
    HW = bool(hw)
    NT, BQ, BK, DC, DVC = geo.threads, geo.query_tile, geo.key_tile, geo.head_chunk, geo.value_chunk
    NB, NO = BK // 8, DVC // 8
    NB4, NO4 = 4 * NB, 4 * NO  # accumulators a lane holds
    lay = geo.layout(HW)
    QS, VS, PS = U(lay["QS"]), U(lay["VS"]), U(lay["PS"])
    Q8 = U(8 * lay["QS"])
    OFF_K, OFF_V = U(lay["OFF_K"]), U(lay["OFF_V"])
    OFF_R1, OFF_R2, OFF_X = U(lay["OFF_R1"]), U(lay["OFF_R2"]), U(lay["OFF_X"])
    TOTAL = lay["TOTAL"]
    XW = U(scratch_elements(geo.kind))
    ALIGN = 16 if HW else None
    NINF, ZERO, NZERO, ONE = sc_t(-np.inf), sc_t(0.0), sc_t(-0.0), sc_t(1.0)
    split, mma = product_step(geo.kind, HW)
    sequence = block_ranges().sequence
    block_keys = _block_keys(BQ, BK)
    shift = _softmax_shift(dtype)
    nanmax = _nanmax()
    stage_q = _stager(BQ, DC, NT, False, ZERO)
    stage_k = _stager(BK, DC, NT, False, ZERO)
    stage_v = _stager(BK, DVC, NT, True, ZERO)
    opts = {}
    if HW and not _on_simulator():
        opts["launch_bounds"] = geo.launch_bounds()

    @cuda.jit(**opts)
    def attention_tc_kernel(
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
        sh = cuda.shared.array(TOTAL, nt, alignment=ALIGN)
        oacc = cuda.local.array(NO4, nt)
        sacc = cuda.local.array(NB4, nt)

        g2n = q.shape[1]
        d = q.shape[3]
        dv = v.shape[3]
        bid = cuda.blockIdx.x
        qt = n_qt - 1 - bid % n_qt  # heaviest (last, under causal masks) first
        rest = bid // n_qt
        b2 = uint32(rest % g2n)
        b1 = uint32(rest // g2n)
        i0 = qt * BQ
        _, _, q_rows, _, _, _ = sequence(seq, b1, b2)
        if i0 >= q_rows:
            return
        q_off, q_len, k_off, k_len, lo_base, hi_base, lo, hi, lo_max, hi_min, n_kt = block_keys(
            seq, b1, b2, i0, wl, wr, has_mask
        )
        hk = uint32(b2 // (g2n // k.shape[1]))
        utid = U(cuda.threadIdx.x)
        lane = U(utid & U(31))
        g = U(lane >> U(2))
        t = U(lane & U(3))
        r0 = U(U(utid >> U(5)) * U(16) + g)  # the lane's rows: r0 and r0 + 8
        t2 = U(t * U(2))
        xw = U(OFF_X + U(utid >> U(5)) * XW)  # the warp's emulation scratch
        q_resident = d <= DC
        # Key kk of the sequence is visible to row i when lo_base <= kk - i
        # < hi_base: one unsigned compare of kk - i - lo_base against the
        # window's width, modulo 2**32 (token counts < 2**31).
        lb = max(lo_base, -I31)
        wid = U(max(min(hi_base, I31) - lb, 0))
        dl_a = U((int64(t2) - int64(r0) - i0 - lb) & M32)
        dl_b = U((int64(t2) - int64(r0) - 8 - i0 - lb) & M32)
        real_a = int64(r0) < q_len - i0
        real_b = int64(r0) + 8 < q_len - i0
        mrow_a = U(q_off + i0 + int64(r0))
        mrow_b = U(mrow_a + U(8))
        lo_u = U(max(lo, 0))
        hi_u = U(max(hi, 0))
        lomax_u = U(min(max(lo_max, 0), I31))
        himin_i = int64(max(hi_min, -1))
        klt = k_len - int64(t2)
        kot_u = U(k_off + int64(t2))
        koff_u = U(k_off)
        qn_u = U(max(min(q_len - i0, BQ), 0))  # real rows of the tile
        qrow_u = U(q_off + i0)
        qw_u = U(min(q_rows - i0, BQ))  # rows of the tile to write
        qa = U(r0 * QS + t)  # A of S: Q[r0][p + t]
        kb = U(OFF_K + g * QS + t)  # B of S: K[8n + g][p + t]
        vb = U(OFF_V + t2 * VS + g)  # B of O: V[8j + 2t][8m + g]

        m_a = NINF
        m_b = NINF
        l_a = ZERO
        l_b = ZERO
        for c in range(NO4):
            oacc[c] = ZERO
        if q_resident and n_kt > 0:
            stage_q(sh, q, b1, b2, qrow_u, qn_u, U(0), d, U(0), QS, utid)

        j0 = lo_u
        while j0 < hi_u:  # key tiles [j0, j0 + BK)
            nk = U(hi_u - j0)
            kj = U(koff_u + j0)
            for c in range(NB4):
                sacc[c] = ZERO
            bad = stage_v(sh, v, b1, hk, kj, nk, U(0), dv, OFF_V, VS, utid)
            for p0 in range(0, d, DC):
                if p0 > 0:
                    cuda.syncthreads()
                dp = d - p0
                if not q_resident:
                    stage_q(sh, q, b1, b2, qrow_u, qn_u, U(p0), dp, U(0), QS, utid)
                stage_k(sh, k, b1, hk, kj, nk, U(p0), dp, OFF_K, QS, utid)
                cuda.syncthreads()
                for ks in range((min(DC, dp) + 7) // 8):
                    p = U(ks * 8)
                    a0 = split(sh[U(qa + p)])
                    a1 = split(sh[U(qa + Q8 + p)])
                    a2 = split(sh[U(qa + p + U(4))])
                    a3 = split(sh[U(qa + Q8 + p + U(4))])
                    for n in range(NB):
                        kn = U(kb + U(n * 8) * QS + p)
                        s0, s1, s2, s3 = mma(
                            sh, xw, lane, a0, a1, a2, a3, split(sh[kn]), split(sh[U(kn + U(4))]),
                            sacc[4 * n], sacc[4 * n + 1], sacc[4 * n + 2], sacc[4 * n + 3],
                        )  # fmt: skip
                        sacc[4 * n] = s0
                        sacc[4 * n + 1] = s1
                        sacc[4 * n + 2] = s2
                        sacc[4 * n + 3] = s3
            # Scale, mask and bias; the lane's keys are 8n + 2t + e.
            check = j0 < lomax_u or int64(j0) + BK > himin_i
            kcnt = U(min(max(klt - int64(j0), 0), BK))
            mcol = U(kot_u + j0)
            mx_a = NINF
            mx_b = NINF
            for n in range(NB):
                for h in range(2):
                    for e in range(2):
                        x = sacc[4 * n + 2 * h + e] * scale
                        if check or has_bias:
                            mrow = mrow_a if h == 0 else mrow_b
                            vis = True
                            if check:
                                dl = dl_a if h == 0 else dl_b
                                real = real_a if h == 0 else real_b
                                vis = (
                                    U((int64(j0) + dl + (8 * n + e)) & M32) < wid
                                    and U(8 * n + e) < kcnt
                                    and real
                                )
                                if vis and has_mask:
                                    vis = mask[b1, b2, mrow, U(mcol + U(8 * n + e))]
                            if not vis:
                                x = NINF
                            elif has_bias:
                                bv = bias[b1, b2, mrow, U(mcol + U(8 * n + e))]
                                x = NINF if bv == NINF else x + bv  # -inf bias masks
                        sacc[4 * n + 2 * h + e] = x
                        if h == 0:
                            mx_a = nanmax(mx_a, x)
                        else:
                            mx_b = nanmax(mx_b, x)
            if HW:
                for o in (1, 2):
                    mx_a = nanmax(mx_a, cuda.shfl_xor_sync(0xFFFFFFFF, mx_a, o))
                    mx_b = nanmax(mx_b, cuda.shfl_xor_sync(0xFFFFFFFF, mx_b, o))
            else:
                sh[OFF_R1 + r0 * U(4) + t] = mx_a
                sh[OFF_R1 + U(r0 + U(8)) * U(4) + t] = mx_b
                cuda.syncthreads()
                for y in range(4):
                    mx_a = nanmax(mx_a, sh[OFF_R1 + r0 * U(4) + U(y)])
                    mx_b = nanmax(mx_b, sh[OFF_R1 + U(r0 + U(8)) * U(4) + U(y)])
            mt = nanmax(m_a, mx_a)
            ms_a, alpha_a = shift(m_a, mt)
            m_a = mt
            mt = nanmax(m_b, mx_b)
            ms_b, alpha_b = shift(m_b, mt)
            m_b = mt
            ps_a = ZERO
            ps_b = ZERO
            for n in range(NB):
                for h in range(2):
                    for e in range(2):
                        x = sacc[4 * n + 2 * h + e]
                        ms = ms_a if h == 0 else ms_b
                        x = NZERO if x == NINF else math.exp(x - ms)  # -0.0: masked
                        sacc[4 * n + 2 * h + e] = x
                        if h == 0:
                            ps_a += x
                        else:
                            ps_b += x
            if HW:
                for o in (1, 2):
                    ps_a += cuda.shfl_xor_sync(0xFFFFFFFF, ps_a, o)
                    ps_b += cuda.shfl_xor_sync(0xFFFFFFFF, ps_b, o)
            else:
                sh[OFF_R2 + r0 * U(4) + t] = ps_a
                sh[OFF_R2 + U(r0 + U(8)) * U(4) + t] = ps_b
                cuda.syncthreads()
                ps_a = ZERO
                ps_b = ZERO
                for y in range(4):
                    ps_a += sh[OFF_R2 + r0 * U(4) + U(y)]
                    ps_b += sh[OFF_R2 + U(r0 + U(8)) * U(4) + U(y)]
            l_a = l_a * alpha_a + ps_a
            l_b = l_b * alpha_b + ps_b
            for m in range(NO):
                oacc[4 * m] *= alpha_a
                oacc[4 * m + 1] *= alpha_a
                oacc[4 * m + 2] *= alpha_b
                oacc[4 * m + 3] *= alpha_b
            # Every warp is past its reads of K: P may take K's region.
            vbad = cuda.syncthreads_or(bad)
            if vbad:
                for n in range(NB):
                    for h in range(2):
                        for e in range(2):
                            row = U(r0 + U(8 * h))
                            sh[U(OFF_K + row * PS + t2 + U(8 * n + e))] = sacc[4 * n + 2 * h + e]
                cuda.syncthreads()
                for j in range(BK):
                    p_a = sh[U(OFF_K + r0 * PS + U(j))]
                    p_b = sh[U(OFF_K + U(r0 + U(8)) * PS + U(j))]
                    use_a = p_a != ZERO or math.copysign(ONE, p_a) > ZERO
                    use_b = p_b != ZERO or math.copysign(ONE, p_b) > ZERO
                    vrow = U(OFF_V + U(j) * VS + t2)
                    for m in range(NO):
                        for e in range(2):
                            vv = sh[U(vrow + U(8 * m + e))]
                            if use_a:
                                oacc[4 * m + e] += p_a * vv
                            if use_b:
                                oacc[4 * m + 2 + e] += p_b * vv
            else:  # O += P V on the tensor cores
                for j in range(NB):
                    a0 = split(sacc[4 * j])
                    a1 = split(sacc[4 * j + 2])
                    a2 = split(sacc[4 * j + 1])
                    a3 = split(sacc[4 * j + 3])
                    vj = U(vb + U(8 * j) * VS)
                    for m in range(NO):
                        o0, o1, o2, o3 = mma(
                            sh, xw, lane, a0, a1, a2, a3,
                            split(sh[U(vj + U(8 * m))]), split(sh[U(vj + VS + U(8 * m))]),
                            oacc[4 * m], oacc[4 * m + 1], oacc[4 * m + 2], oacc[4 * m + 3],
                        )  # fmt: skip
                        oacc[4 * m] = o0
                        oacc[4 * m + 1] = o1
                        oacc[4 * m + 2] = o2
                        oacc[4 * m + 3] = o3
            cuda.syncthreads()
            j0 = U(j0 + U(BK))

        for h in range(2):
            r = U(r0 + U(8 * h))
            m_r = m_a if h == 0 else m_b
            l_r = l_a if h == 0 else l_b
            if r < qw_u:
                row = U(qrow_u + r)
                inv = ONE
                if m_r != NINF:
                    inv = ONE / l_r
                for m in range(NO):
                    for e in range(2):
                        col = U(t2 + U(8 * m + e))
                        if col < dv:
                            val = ZERO  # a row that saw no key
                            if m_r != NINF:
                                val = oacc[4 * m + 2 * h + e] * inv
                            out[b1, b2, row, col] = val
                if write_lse and t == U(0):
                    lse[b1, b2, row] = NINF if m_r == NINF else m_r + math.log(l_r)

    attention_tc_kernel.geometry = dict(
        threads=NT,
        query_tile=BQ,
        key_tile=BK,
        head_chunk=DC,
        value_chunk=DVC,
        shared_bytes=TOTAL * dtype.itemsize,
        step=geo.kind,
        path="hardware" if HW else "simulator",
    )
    return attention_tc_kernel


def make_scores_tc(geo: TensorCoreScoresGeometry, hw: bool = False):
    """The scores kernel of ``geo``: the arguments, launch and results of
    :func:`numbattn.cuda.kernels.make_scores`, with ``row_tile`` x
    ``column_tile`` output tiles (grid = G1*Hq*n_it*ceil(Tk/column_tile),
    n_it = ceil(max_rows/row_tile), block = ``geo.threads``).

    Warp ``w`` owns rows ``16w .. 16w + 15`` of the tile and every column;
    lane (g, t) holds S[r0 + 8h][8n + 2t + e] in ``sacc[4n + 2h + e]``, as
    in :func:`make_attention_tc`. Q and K are staged per head chunk, zeros
    outside the sequence's rows and ``d``. A float32 chunk holding a NaN or
    inf (a block-uniform flag) is multiplied on the FMA units instead: the
    TF32 halves of an inf are inf and NaN, which would turn an infinite
    score into NaN. The finished tile goes through shared memory, so that
    the writes are coalesced.

    ``hw``: the product step as inline PTX, launch bounds and aligned shared
    memory; otherwise the simulator's portable path.
    """
    dtype = np.dtype(geo.dtype)
    nt, sc_t = _types(dtype)
    HW = bool(hw)
    NT, BQ, BN, DC = geo.threads, geo.row_tile, geo.column_tile, geo.head_chunk
    NB = BN // 8
    NB4 = 4 * NB
    lay = geo.layout(HW)
    QS, Q8, PS = U(lay["QS"]), U(8 * lay["QS"]), U(lay["PS"])
    OFF_K, OFF_X, TOTAL = U(lay["OFF_K"]), U(lay["OFF_X"]), lay["TOTAL"]
    XW = U(scratch_elements(geo.kind))
    ALIGN = 16 if HW else None
    NINF, ZERO = sc_t(-np.inf), sc_t(0.0)
    CHECK = dtype == np.float32  # the TF32 splits of inf or NaN are NaN
    split, mma = product_step(geo.kind, HW)
    sequence = block_ranges().sequence
    block_keys = _block_keys(BQ, BN)
    stage_q = _stager(BQ, DC, NT, CHECK, ZERO)
    stage_k = _stager(BN, DC, NT, CHECK, ZERO)
    opts = {}
    if HW and not _on_simulator():
        opts["launch_bounds"] = geo.launch_bounds()

    @cuda.jit(**opts)
    def scores_tc_kernel(q, k, out, seq, bias, mask, scale, n_it, wl, wr, has_bias, has_mask):
        sh = cuda.shared.array(TOTAL, nt, alignment=ALIGN)
        sacc = cuda.local.array(NB4, nt)

        g2n = q.shape[1]
        d = q.shape[3]
        ncol = out.shape[3]
        n_jt = (ncol + BN - 1) // BN
        bid = cuda.blockIdx.x
        jt = bid % n_jt
        rest = bid // n_jt
        it = rest % n_it
        rest = rest // n_it
        b2 = uint32(rest % g2n)
        b1 = uint32(rest // g2n)
        i0 = it * BQ
        _, _, q_rows, _, _, _ = sequence(seq, b1, b2)
        if i0 >= q_rows:
            return  # the whole block: past this sequence's rows
        q_off, q_len, k_off, k_len, lo_base, hi_base, lo, hi, lo_max, hi_min, _ = block_keys(
            seq, b1, b2, i0, wl, wr, has_mask
        )
        hk = uint32(b2 // (g2n // k.shape[1]))
        utid = U(cuda.threadIdx.x)
        lane = U(utid & U(31))
        g = U(lane >> U(2))
        t = U(lane & U(3))
        r0 = U(U(utid >> U(5)) * U(16) + g)  # the lane's rows: r0 and r0 + 8
        t2 = U(t * U(2))
        xw = U(OFF_X + U(utid >> U(5)) * XW)  # the warp's emulation scratch
        c0 = jt * BN  # the tile's first column, key row c0 of k
        j0 = c0 - k_off  # its local key (negative before the sequence's keys)
        # No row of the tile sees a key of [j0, j0 + BN): no products, no loads.
        skip = j0 + BN <= lo or j0 >= hi or hi <= lo
        for c in range(NB4):
            sacc[c] = ZERO
        qn_u = U(max(min(q_len - i0, BQ), 0))  # real rows of the tile
        qrow_u = U(q_off + i0)
        c0_u = U(c0)
        if not skip:
            kn_u = U(max(min(k.shape[2] - c0, BN), 0))  # rows of k in the tile
            qa = U(r0 * QS + t)  # A: Q[r0][p + t]
            kb = U(OFF_K + g * QS + t)  # B: K[8n + g][p + t]
            for p0 in range(0, d, DC):
                if p0 > 0:
                    cuda.syncthreads()
                dp = d - p0
                bad = stage_q(sh, q, b1, b2, qrow_u, qn_u, U(p0), dp, U(0), QS, utid)
                bad |= stage_k(sh, k, b1, hk, c0_u, kn_u, U(p0), dp, OFF_K, QS, utid)
                nonfinite = False
                if CHECK:
                    nonfinite = cuda.syncthreads_or(bad)
                else:
                    cuda.syncthreads()
                if nonfinite:  # FMAs: inf and NaN as the reference has them
                    kt2 = U(OFF_K + t2 * QS)
                    for pp in range(min(DC, dp)):
                        qv_a = sh[U(r0 * QS + U(pp))]
                        qv_b = sh[U(U(r0 + U(8)) * QS + U(pp))]
                        for n in range(NB):
                            for e in range(2):
                                kv = sh[U(kt2 + U(8 * n + e) * QS + U(pp))]
                                sacc[4 * n + e] += qv_a * kv
                                sacc[4 * n + 2 + e] += qv_b * kv
                else:
                    for ks in range((min(DC, dp) + 7) // 8):
                        p = U(ks * 8)
                        a0 = split(sh[U(qa + p)])
                        a1 = split(sh[U(qa + Q8 + p)])
                        a2 = split(sh[U(qa + p + U(4))])
                        a3 = split(sh[U(qa + Q8 + p + U(4))])
                        for n in range(NB):
                            kn = U(kb + U(n * 8) * QS + p)
                            s0, s1, s2, s3 = mma(
                                sh, xw, lane, a0, a1, a2, a3,
                                split(sh[kn]), split(sh[U(kn + U(4))]),
                                sacc[4 * n], sacc[4 * n + 1], sacc[4 * n + 2], sacc[4 * n + 3],
                            )  # fmt: skip
                            sacc[4 * n] = s0
                            sacc[4 * n + 1] = s1
                            sacc[4 * n + 2] = s2
                            sacc[4 * n + 3] = s3

            # S replaces Q and K once every warp is past its reads.
            cuda.syncthreads()
            for n in range(NB):
                for h in range(2):
                    for e in range(2):
                        row = U(r0 + U(8 * h))
                        sh[U(row * PS + t2 + U(8 * n + e))] = sacc[4 * n + 2 * h + e]
            cuda.syncthreads()

        # Written a row at a time, consecutive threads on consecutive
        # columns. A tile whose rows are real and see every column (inside
        # the window, no mask) writes without per-element tests (block-uniform).
        full = not skip and j0 >= max(lo_max, 0) and j0 + BN <= hi_min and c0 + BN <= ncol
        # Local key kk is visible to local row i when lo_base <= kk - i <
        # hi_base and 0 <= kk < k_len: unsigned compares modulo 2**32, as in
        # make_attention_tc (token counts < 2**31).
        lb = max(lo_base, -I31)
        wid = U(max(min(hi_base, I31) - lb, 0))
        klen_u = U(k_len)
        ncol_u = U(ncol)
        qw_u = U(min(q_rows - i0, BQ))  # rows of the tile to write
        j0_u = U(j0 & M32)  # the tile's first local key
        dl0 = U((j0 - i0 - lb) & M32)  # its key - row - lb in row 0
        idx = utid
        while idx < U(BQ * BN):
            r = U(idx // U(BN))
            cl = U(idx % U(BN))
            col = U(c0_u + cl)
            if r < qw_u and col < ncol_u:
                orow = U(qrow_u + r)
                vis = full
                if not full:
                    kk = U((int64(j0_u) + cl) & M32)
                    dl = U((int64(dl0) + cl - r) & M32)
                    vis = not skip and r < qn_u and kk < klen_u and dl < wid
                    if vis and has_mask:
                        vis = mask[b1, b2, orow, col]
                x = NINF
                if vis:
                    x = sh[U(r * PS + cl)] * scale
                    if has_bias:
                        bv = bias[b1, b2, orow, col]
                        x = NINF if bv == NINF else x + bv  # -inf bias masks
                out[b1, b2, orow, col] = x
            idx = U(idx + U(NT))

    scores_tc_kernel.geometry = dict(
        threads=NT,
        row_tile=BQ,
        column_tile=BN,
        head_chunk=DC,
        shared_bytes=TOTAL * dtype.itemsize,
        step=geo.kind,
        path="hardware" if HW else "simulator",
    )
    return scores_tc_kernel
