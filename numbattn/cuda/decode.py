"""CUDA kernels for few queries over many keys: split-K streaming attention
(decoding, chunked prefill) over contiguous or paged KV caches, and the
device merge of the splits' partial results.

Built by factories per compile-time geometry, like :mod:`numbattn.cuda.kernels`
(same conventions: layout-'A' arrays, every output element written, nothing
validated, a hardware path with warp shuffles and a portable path for the
simulator, no fastmath).

Streaming kernel (:func:`make_decode`)
    One block per (batch element, query-head group, row tile, split). A
    *row* is one (query head, query) pair: the ``gh`` query heads that share
    a KV head (grouped-query attention; ``gh = 1`` for MHA) times the
    sequence's query rows, row ``R`` being query ``R // gh`` of head
    ``hg*gh + R % gh``. A block owns ``RB`` consecutive rows, so each K and
    V element is read once per head group and row tile, not once per query
    head. There is no per-query padding: a block with fewer real rows skips
    the others (block-uniform tests), and rows are only ever multiplied
    where they exist.

    The block is ``NTEAM`` teams of ``WL`` lanes (hardware: ``WL = 32``, one
    warp a team). A team takes ``KB`` consecutive keys at a time; lane ``l``
    holds head dimensions ``l + WL*e`` (``e < EPL``) of q (registers, all of
    the block's rows) and loads the same dimensions of the KB key rows and
    value rows: consecutive lanes read consecutive elements of a row (one
    coalesced 128-byte transaction per warp and element), read directly from
    the caller's arrays, no staging through shared memory. K and V of the KB
    keys are loaded together before any arithmetic (2*KB*EPL independent
    loads in flight per lane). Partial dot products are summed over the
    team's lanes (hardware: ``shfl_xor_sync`` butterflies, which leave the
    same sum in every lane; simulator: shared memory and barriers), so every
    lane holds the same scores and runs the same online softmax (row max
    ``m``, sum ``l``); each lane accumulates its own output columns.

    Keys: the block's rows see keys [lo, hi) (lengths, causal, window,
    aligned per sequence by the table's ALIGN column); split ``s`` of
    ``n_split`` takes the s-th of ``n_split`` equal chunks of [lo, hi), so
    splits balance whatever the lengths, and the teams of the block take
    the chunk's keys in turn, KB at a time (the trip count is block-uniform:
    the portable reduction has barriers). Per key and row, visibility (row
    real, window, mask) sets a masked score to -inf; its probability is
    stored as -0.0 and its value row is never multiplied in (a NaN or inf
    in a masked value cannot reach the row, as in the fused kernel). A -inf
    bias masks.

    Paged cache: k and v are always indexed ``k[blk, slot, hk, c]``. For a
    contiguous cache the backend passes (G1, Tk, Hk, d) views of the
    (G1, Hk, Tk, d) arrays (re-strided, nothing copied) and ``paged`` False:
    ``blk = b1``, ``slot = K_OFF + j``. For a paged cache (num_blocks,
    block_size, Hk, d) with ``paged`` True: logical key ``p = K_OFF + j``
    lives in block ``table[b1, p // block_size]`` at slot
    ``p % block_size``.

    At the end the teams' states (m, l and the unnormalised accumulators)
    meet in shared memory and are combined in team order (deterministic);
    the block writes its rows' normalised output and lse at row
    ``s*split_rows + Q_OFF + i`` of ``out``/``lse``: the caller's arrays
    when ``n_split`` is 1, else a scratch of partials (O(splits * rows *
    dv)) that :func:`make_split_merge` combines. A row that sees no key gets
    zeros and lse -inf, which the merge weighs 0.

Split merge (:func:`make_split_merge`)
    One block per (batch element, query head, query row), threads over the
    value columns (coalesced): ``out = sum_s exp(lse_s - L) o_s`` with
    ``L = log sum_s exp(lse_s)``, the :func:`numbattn.merge_attention` math,
    summed in split order (deterministic).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64, int64, uint32

U = uint32


def _types(dtype):
    dtype = np.dtype(dtype)
    return (float32 if dtype == np.float32 else float64), dtype.type


def decode_shuffles_ok(WL, NTEAM, hw):
    """Team reductions by warp shuffles: on hardware, when a team's lanes
    lie in one warp (WL a power of two <= 32) and warps are full (or the
    block is one partial warp)."""
    nt = WL * NTEAM
    return bool(hw) and WL <= 32 and 32 % WL == 0 and (nt % 32 == 0 or nt < 32)


def decode_layout(WL, NTEAM, RB, KB, EPL, hw):
    """Shared-memory layout of :func:`make_decode` (element offsets)."""
    nt = WL * NTEAM
    red = 0 if decode_shuffles_ok(WL, NTEAM, hw) else nt * RB * KB
    lay = dict(OFF_M=red, OFF_L=red + NTEAM * RB, OFF_A=red + 2 * NTEAM * RB)
    lay["TOTAL"] = lay["OFF_A"] + NTEAM * RB * WL * EPL
    return lay


def decode_shared_bytes(dtype, WL, NTEAM, RB, KB, EPL, hw=False):
    return decode_layout(WL, NTEAM, RB, KB, EPL, hw)["TOTAL"] * np.dtype(dtype).itemsize


def make_decode(dtype, WL, NTEAM, RB, KB, EPL, hw=False):
    """Streaming split-K attention kernel for one geometry (module docstring).

    Signature::

        kernel(q, k, v, out, lse, seq, table, bias, mask, scale, gh, n_rt,
               n_split, split_rows, block_size, wl, wr, write_lse,
               has_bias, has_mask, paged)

    q (G1, Hq, Tq, d) with d <= WL*EPL; k and v (blocks, slots, Hk, d / dv)
    (see the module docstring; dv <= WL*EPL); out (G1, Hq, *, dv) and lse
    (G1, Hq, *) with rows ``s*split_rows + Q_OFF + i``; seq int64 (G1, Hq, C)
    (:mod:`numbattn._sequences`; equal rows within each group of ``gh``
    heads); table int32 (G1, pages) (a dummy unless paged); bias / mask as
    the fused kernel. Launch: grid = G1 * (Hq // gh) * n_rt * n_split with
    n_rt = ceil(gh * max_rows / RB), block = WL * NTEAM.
    """
    nt, sc_t = _types(dtype)
    NT = WL * NTEAM
    DVM = WL * EPL
    lay = decode_layout(WL, NTEAM, RB, KB, EPL, hw)
    SHFL = decode_shuffles_ok(WL, NTEAM, hw)
    MASK = 0xFFFFFFFF if NT >= 32 else (1 << NT) - 1
    OFF_M, OFF_L, OFF_A, TOTAL = lay["OFF_M"], lay["OFF_L"], lay["OFF_A"], lay["TOTAL"]
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    NZERO = sc_t(-0.0)
    ONE = sc_t(1.0)
    BIG = 1 << 40  # "unbounded" window side
    OFFS = tuple(WL >> (x + 1) for x in range(WL.bit_length() - 1))  # butterfly: WL/2 .. 1

    @cuda.jit
    def decode_kernel(
        q,
        k,
        v,
        out,
        lse,
        seq,
        table,
        bias,
        mask,
        scale,
        gh,
        n_rt,
        n_split,
        split_rows,
        block_size,
        wl,
        wr,
        write_lse,
        has_bias,
        has_mask,
        paged,
    ):
        sh = cuda.shared.array(TOTAL, nt)
        qr = cuda.local.array((RB, EPL), nt)
        acc = cuda.local.array((RB, EPL), nt)
        mr = cuda.local.array(RB, nt)
        lr = cuda.local.array(RB, nt)
        sc = cuda.local.array((RB, KB), nt)
        al = cuda.local.array(RB, nt)
        rh = cuda.local.array(RB, int64)
        ri = cuda.local.array(RB, int64)
        rlo = cuda.local.array(RB, int64)
        rhi = cuda.local.array(RB, int64)
        kf = cuda.local.array((KB, EPL), nt)
        vf = cuda.local.array((KB, EPL), nt)

        hq = q.shape[1]
        d = q.shape[3]
        dv = v.shape[3]
        group = hq // k.shape[2]
        n_hg = hq // gh
        bid = cuda.blockIdx.x
        s = bid % n_split
        rest = bid // n_split
        rt = rest % n_rt
        rest = rest // n_rt
        hg = rest % n_hg
        b1 = rest // n_hg
        h0 = hg * gh
        r0 = rt * RB  # first row of the block
        q_rows = seq[b1, h0, 2]
        i_first = r0 // gh
        if i_first >= q_rows:
            return  # whole block: past this sequence's rows
        q_off = seq[b1, h0, 0]
        q_len = seq[b1, h0, 1]
        k_off = seq[b1, h0, 3]
        k_len = seq[b1, h0, 4]
        hk = h0 // group
        off = seq[b1, h0, 5]  # ALIGN: query i is aligned with key i + off
        tid = cuda.threadIdx.x
        lane = tid % WL
        team = tid // WL

        # Row i sees keys [i + lo_base, min(k_len, i + hi_base)).
        lo_base = -BIG
        hi_base = BIG
        if wl >= 0:
            lo_base = off - wl
        if wr >= 0:
            hi_base = off + wr + 1
        i_last = min((r0 + RB - 1) // gh, q_len - 1)
        lo = 0
        hi = 0
        if i_first < q_len:
            lo = max(0, i_first + lo_base)
            hi = min(k_len, i_last + hi_base)
        nk = max(hi - lo, 0)
        per = (nk + n_split - 1) // n_split
        ks = lo + min(nk, s * per)
        ke = lo + min(nk, (s + 1) * per)

        # Per row (block-local a): head, query, visible keys [rlo, rhi) of
        # this split (rhi = ks: none, for rows past Q_LEN or the table).
        ulane = U(lane)
        uhk = U(hk)
        ud = U(d)
        udv = U(dv)
        ub1 = U(b1)
        for a in range(RB):
            i = (r0 + a) // gh
            h = h0 + (r0 + a) % gh
            rh[a] = h
            ri[a] = i
            rlo[a] = ks
            rhi[a] = ks
            if i < q_len:
                rlo[a] = max(ks, i + lo_base)
                rhi[a] = min(ke, i + hi_base)
            mr[a] = NINF
            lr[a] = ZERO
            for e in range(EPL):
                c = U(ulane + U(WL * e))
                val = ZERO
                if i < q_len and c < ud:
                    val = q[ub1, U(h), U(q_off + i), c]
                qr[a, e] = val
                acc[a, e] = ZERO
        # Rows of the block that exist (block-uniform): the loops below skip the others.
        nreal = min(RB, gh * q_len - r0)

        step = NTEAM * KB
        n_steps = (ke - ks + step - 1) // step
        for it in range(n_steps):
            jb = ks + it * step + team * KB
            # K and V rows of the team's KB keys (zeros past ke), all loads first.
            for b in range(KB):
                j = jb + b
                if j < ke:
                    p = U(k_off + j)
                    blk = ub1
                    slot = p
                    if paged:
                        pg = p // U(block_size)
                        blk = U(table[ub1, pg])
                        slot = p - pg * U(block_size)
                    for e in range(EPL):
                        c = U(ulane + U(WL * e))
                        kv = ZERO
                        vv = ZERO
                        if c < ud:
                            kv = k[blk, slot, uhk, c]
                        if c < udv:
                            vv = v[blk, slot, uhk, c]
                        kf[b, e] = kv
                        vf[b, e] = vv
                else:
                    for e in range(EPL):
                        kf[b, e] = ZERO
                        vf[b, e] = ZERO
            for a in range(RB):
                if a < nreal:
                    for b in range(KB):
                        t = ZERO
                        for e in range(EPL):
                            t += qr[a, e] * kf[b, e]
                        sc[a, b] = t
            # Sum the partial dots over the team's lanes: every lane gets the same sum.
            if SHFL:
                for a in range(RB):
                    if a < nreal:
                        for b in range(KB):
                            t = sc[a, b]
                            for o in OFFS:
                                t += cuda.shfl_xor_sync(MASK, t, o)
                            sc[a, b] = t
            else:
                for a in range(RB):
                    for b in range(KB):
                        sh[(tid * RB + a) * KB + b] = sc[a, b]
                cuda.syncthreads()
                for a in range(RB):
                    for b in range(KB):
                        t = ZERO
                        for x in range(WL):
                            t += sh[((team * WL + x) * RB + a) * KB + b]
                        sc[a, b] = t
                cuda.syncthreads()
            # Scale and visibility (-inf: masked); mask and bias when given.
            for a in range(RB):
                if a < nreal:
                    for b in range(KB):
                        j = jb + b
                        t = sc[a, b] * scale
                        if j < rlo[a] or j >= rhi[a]:
                            t = NINF
                        elif has_mask or has_bias:
                            h = U(rh[a])
                            mrow = U(q_off + ri[a])
                            col = U(k_off + j)
                            if has_mask and not mask[ub1, h, mrow, col]:
                                t = NINF
                            elif has_bias:
                                bv = bias[ub1, h, mrow, col]
                                t = NINF if bv == NINF else t + bv  # -inf bias masks
                        sc[a, b] = t
            # Online softmax: row maxima, rescale, P = exp(S - m) (-0.0: masked).
            for a in range(RB):
                if a < nreal:
                    mx = mr[a]
                    for b in range(KB):
                        t = sc[a, b]
                        if t > mx or t != t:
                            mx = t
                    ms = mx
                    if mx == NINF:
                        ms = ZERO
                    al[a] = math.exp(mr[a] - ms)
                    mr[a] = mx
                    ps = ZERO
                    for b in range(KB):
                        t = sc[a, b]
                        pv = NZERO if t == NINF else math.exp(t - ms)
                        sc[a, b] = pv
                        ps += pv
                    lr[a] = lr[a] * al[a] + ps
            for a in range(RB):
                if a < nreal:
                    for e in range(EPL):
                        acc[a, e] *= al[a]
            # O += P V; a masked key's value row is never multiplied in.
            for a in range(RB):
                if a < nreal:
                    for b in range(KB):
                        pv = sc[a, b]
                        if pv != ZERO or math.copysign(ONE, pv) > ZERO:
                            for e in range(EPL):
                                acc[a, e] += pv * vf[b, e]

        # Combine the teams (in team order) and write the block's rows.
        for a in range(RB):
            if lane == 0:
                sh[OFF_M + team * RB + a] = mr[a]
                sh[OFF_L + team * RB + a] = lr[a]
            for e in range(EPL):
                c = lane + WL * e
                if c < dv:
                    sh[OFF_A + (team * RB + a) * DVM + c] = acc[a, e]
        cuda.syncthreads()
        idx = tid
        while idx < RB * (dv + 1):
            a = idx // (dv + 1)
            c = idx % (dv + 1) - 1  # -1: the row's lse
            i = (r0 + a) // gh
            if i < q_rows:
                h = h0 + (r0 + a) % gh
                row = s * split_rows + q_off + i
                m = NINF
                for x in range(NTEAM):
                    t = sh[OFF_M + x * RB + a]
                    if t > m or t != t:
                        m = t
                if m == NINF:
                    if c >= 0:
                        out[b1, h, row, c] = ZERO
                    elif write_lse:
                        lse[b1, h, row] = NINF
                else:
                    tot = ZERO
                    o = ZERO
                    for x in range(NTEAM):
                        w = math.exp(sh[OFF_M + x * RB + a] - m)
                        tot += sh[OFF_L + x * RB + a] * w
                        if c >= 0:
                            o += sh[OFF_A + (x * RB + a) * DVM + c] * w
                    if c >= 0:
                        out[b1, h, row, c] = o / tot
                    elif write_lse:
                        lse[b1, h, row] = m + math.log(tot)
            idx += NT

    decode_kernel.geometry = dict(
        threads=NT,
        lanes=WL,
        teams=NTEAM,
        rows=RB,
        keys=KB,
        max_head=DVM,
        shared_bytes=TOTAL * np.dtype(dtype).itemsize,
        path="hardware" if hw else "simulator",
    )
    return decode_kernel


def make_split_merge(dtype, NT):
    """``kernel(part_o, part_l, out, lse, seq, n_split, split_rows, write_lse)``:
    combine ``n_split`` partial results (module docstring).

    part_o (G1, Hq, *, dv) and part_l (G1, Hq, *) hold split s of row
    ``Q_OFF + i`` at row ``s*split_rows + Q_OFF + i``; out (G1, Hq, Tq, dv),
    lse (G1, Hq, Tq) (ignored unless write_lse). Launch: grid =
    G1*Hq*max_rows, block = NT.
    """
    _, sc_t = _types(dtype)
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)

    @cuda.jit
    def split_merge_kernel(part_o, part_l, out, lse, seq, n_split, split_rows, write_lse):
        hq = out.shape[1]
        dv = out.shape[3]
        max_rows = cuda.gridDim.x // (out.shape[0] * hq)
        bid = cuda.blockIdx.x
        i = bid % max_rows
        rest = bid // max_rows
        h = rest % hq
        b1 = rest // hq
        if i >= seq[b1, h, 2]:
            return
        row = seq[b1, h, 0] + i
        m = NINF
        for s in range(n_split):
            t = part_l[b1, h, s * split_rows + row]
            if t > m or t != t:
                m = t
        tid = cuda.threadIdx.x
        if m == NINF:
            for c in range(tid, dv, NT):
                out[b1, h, row, c] = ZERO
            if write_lse and tid == 0:
                lse[b1, h, row] = NINF
            return
        tot = ZERO
        for s in range(n_split):
            tot += math.exp(part_l[b1, h, s * split_rows + row] - m)
        for c in range(tid, dv, NT):
            o = ZERO
            for s in range(n_split):
                w = math.exp(part_l[b1, h, s * split_rows + row] - m)
                if w != ZERO:  # an empty split (zeros) or one that underflows
                    o += w * part_o[b1, h, s * split_rows + row, c]
            out[b1, h, row, c] = o / tot
        if write_lse and tid == 0:
            lse[b1, h, row] = m + math.log(tot)

    split_merge_kernel.geometry = dict(threads=NT)
    return split_merge_kernel
