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
    warp a team). A team takes ``KB`` consecutive keys at a time. Lane
    ``l`` holds EPL head dimensions of q (registers, all of the block's
    rows) in chunks of ``VW`` consecutive dimensions (:func:`vector_width`:
    16 bytes, 4 floats or 2 doubles), chunk ``l + WL*c``, and reads the
    same chunks of the KB key rows and value rows: consecutive lanes read
    consecutive 16 bytes of a row (a warp reads 512 contiguous bytes per
    instruction, one LDG.E.128 per lane and chunk), directly from the
    caller's arrays, no staging through shared memory. The loads go
    through a global-space pointer (:func:`_ldg_intrinsic`; Numba's array
    reads are generic LD.E, one element each) at byte offsets the kernel
    computes once per key row; 16-byte loads need aligned rows
    (``vec``, checked by the backend: :func:`numbattn.cuda.backend.vector_ok`),
    else the chunks are read element by element. K and V of the KB keys
    are loaded together before any arithmetic (2*KB*EPL/VW independent
    loads in flight per lane). Partial dot products are summed over the
    team's lanes (hardware: ``shfl_xor_sync`` butterflies, which leave the
    same sum in every lane; simulator: shared memory and barriers), so every
    lane holds the same scores and runs the same online softmax (row max
    ``m``, sum ``l``); each lane accumulates its own output columns.

    Why these numbers: decoding reads each K/V byte once
    for 1 flop per byte (fp32), so the kernel is a memory stream, and a
    stream runs at the memory's bandwidth only with enough bytes in flight
    (Little's law: on an H200, ~4.8 TB/s x ~600 ns / 132 SMs: 20-40 KB per
    SM) and few enough instructions per byte to issue them (an SM issues 4
    warp instructions a cycle, ~240 instructions per KiB of K+V at full
    bandwidth). Float32, d = 128, one row (MHA decode): KB = 4 keys a step,
    each 2 x 512 B per warp, 4 KiB in flight per warp when the step's loads
    are out, 16 warps per SM (launch bounds: at most 128 registers a thread,
    :func:`decode_threads_per_sm`): ~64 KiB per SM; the fast loop issues
    about 80 instructions per KiB read, against 355 before (scalar generic
    loads, 64-bit index arithmetic per element, visibility tests per key).
    Four rows (GQA groups of 4) take 2 keys a step in the same registers
    (``backend.decode_geometry``); float64 runs 12 warps per SM (8 for 4
    rows: its rows' state is twice as wide).

    Keys: the block's rows see keys [lo, hi) (lengths, causal, window,
    aligned per sequence by the table's ALIGN column); split ``s`` of
    ``n_split`` takes the s-th of ``n_split`` equal chunks of [lo, hi), so
    splits balance whatever the lengths, and the teams of the block take
    the chunk's keys in turn (the trip counts are block-uniform: the
    portable reduction has barriers). Two loops cover them:

    - the *fast* loop: the whole steps of NTEAM*KB keys that every real row
      of the block sees entirely, when there is no mask and no bias (the
      interior of a decode's split). No visibility test, no NaN-safe copy
      of P.V; K/V offsets by a multiply per step (contiguous cache) or a
      table read per key (paged: shift and mask for power-of-two blocks);
      two steps a trip, written out (the hot loop of ``gpu-report``).
    - the *general* loop: the keys before and after them, one key a team at
      a time (fewer registers: it must fit beside the fast loop), with every
      test: per key and row, visibility (row real, window, mask) sets a
      masked score to -inf; its probability is stored as -0.0 and its value
      row is never multiplied in (a NaN or inf in a masked value cannot
      reach the row, as in the fused kernel). A -inf bias masks.

    The block's coordinates and bounds are derived from the block index and
    the sequence table twice, before the fast loop and after it (behind a
    barrier that also keeps the compiler from carrying them in registers
    across the fast loop): the float32 kernel at 4 rows fits 128 registers
    without spilling that way.

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
from numba import cuda, int64, uint32

from .blocks import block_ranges
from .kernels import _device, _nanmax, _on_simulator, _softmax_shift, _types

U = uint32


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


_LDG: dict = {}


def _ldg_intrinsic(VW):
    """``ldg(ary, off)``: the VW elements at ``off`` bytes past ``ary``'s
    first element, as a tuple, read through a global-space pointer (LDG;
    one 8- or 16-byte vector load for VW > 1, whose address the caller has
    checked to be aligned to VW elements). Numba's own array reads compile
    to generic scalar loads (LD.E) with a 64-bit multiply per index; the
    kernel computes its byte offsets itself, once per key row. Inline LLVM
    IR (as the fused kernel's DMMA), compiled off the simulator only."""
    if VW not in _LDG:
        from llvmlite import ir
        from numba.core import types
        from numba.cuda.extending import intrinsic

        @intrinsic
        def ldg(typingctx, ary, off):
            sig = types.UniTuple(ary.dtype, VW)(ary, off)  # type: ignore[attr-defined]

            def codegen(context, builder, sig, args):
                aryty = sig.args[0]
                arr = context.make_array(aryty)(context, builder, args[0])
                i64 = ir.IntType(64)
                delta = context.cast(builder, args[1], sig.args[1], types.int64)
                addr = builder.add(builder.ptrtoint(arr.data, i64), delta)
                ety = context.get_data_type(aryty.dtype)
                size = context.get_abi_sizeof(ety)
                lty = ety if VW == 1 else ir.VectorType(ety, VW)
                gptr = builder.addrspacecast(
                    builder.inttoptr(addr, ir.PointerType(lty)), ir.PointerType(lty, 1)
                )
                val = builder.load(gptr, align=VW * size)
                if VW == 1:
                    vals = [val]
                else:
                    vals = [builder.extract_element(val, ir.IntType(32)(x)) for x in range(VW)]
                return context.make_tuple(builder, sig.return_type, vals)

            return sig, codegen

        _LDG[VW] = ldg
    return _LDG[VW]


def _ldg_simulator(VW, dtype):
    """The simulator's :func:`_ldg_intrinsic`: the same byte offset, read
    from the host memory behind the simulator's array."""
    import ctypes

    ctype = ctypes.c_float if np.dtype(dtype) == np.float32 else ctypes.c_double
    cast = np.dtype(dtype).type

    def ldg(a, off):
        host = getattr(a, "_ary", a)
        buf = (ctype * VW).from_address(host.__array_interface__["data"][0] + int(off))
        return tuple(cast(x) for x in buf)

    return cuda.jit(device=True)(ldg)


def vector_width(dtype, EPL):
    """Elements a lane reads at once from a K or V row: 16 bytes' worth (4
    float32, 2 float64), at most EPL."""
    return max(1, min(16 // np.dtype(dtype).itemsize, EPL))


def decode_threads_per_sm(dtype, RB):
    """Resident threads per SM the hardware path's launch bounds ask for
    (float32: 16 warps, at most 128 registers a thread; float64: 12 warps up
    to 2 rows per block, 8 for more: its rows' state is twice as wide)."""
    if np.dtype(dtype).itemsize == 4:
        return 512
    return 384 if RB <= 2 else 256


def make_decode(dtype, WL, NTEAM, RB, KB, EPL, hw=False, vec=False):
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

    ``vec``: K and V rows are read VW = :func:`vector_width` elements at a
    time (one 16-byte load for VW*itemsize = 16). Only for arrays whose last
    stride is one element, whose other strides and first element are
    multiples of VW elements in bytes, and d and dv multiples of VW (the
    backend checks: :func:`numbattn.cuda.backend.vector_ok`).
    """
    nt, sc_t = _types(dtype)
    NT = WL * NTEAM
    shift = _softmax_shift(dtype)  # the online softmax's rescale step (kernels.py)
    nanmax = _nanmax()
    DVM = WL * EPL
    VW = vector_width(dtype, EPL)
    NCH = EPL // VW  # VW-element chunks a lane holds of a row
    VEC = bool(vec)
    lay = decode_layout(WL, NTEAM, RB, KB, EPL, hw)
    SHFL = decode_shuffles_ok(WL, NTEAM, hw)
    MASK = 0xFFFFFFFF if NT >= 32 else (1 << NT) - 1
    OFF_M, OFF_L, OFF_A, TOTAL = lay["OFF_M"], lay["OFF_L"], lay["OFF_A"], lay["TOTAL"]
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    NZERO = sc_t(-0.0)
    ONE = sc_t(1.0)
    OFFS = tuple(WL >> (x + 1) for x in range(WL.bit_length() - 1))  # butterfly: WL/2 .. 1
    if _on_simulator():
        ldv, ld1 = _ldg_simulator(VW, dtype), _ldg_simulator(1, dtype)
    else:
        ldv, ld1 = _ldg_intrinsic(VW), _ldg_intrinsic(1)

    def col(lane, e):
        """Head dimension of a lane's element e: chunks of VW consecutive
        dimensions, consecutive lanes on consecutive chunks (coalesced)."""
        return U((lane + U(WL * (e // VW))) * U(VW) + U(e % VW))

    def row_offsets(k, v, table, ub1, p, block_size, paged):
        """Byte offsets of logical key p's K and V rows (head and column
        excluded): block ``table[b1, p // block_size]``, slot ``p %
        block_size`` for a paged cache, else block b1, slot p."""
        blk = ub1
        slot = p
        if paged:
            pg = p // U(block_size)
            blk = U(table[ub1, pg])
            slot = U(p - pg * U(block_size))
        ko = int64(blk) * k.strides[0] + int64(slot) * k.strides[1]
        vo = int64(blk) * v.strides[0] + int64(slot) * v.strides[1]
        return ko, vo

    def load_row(k, v, kf, vf, b, ko, vo, kl, vl, ulane, ud, udv):
        """K and V rows of one key (byte offsets ko / vo; the lane's chunk
        offsets kl / vl) into kf[b], vf[b]. A lane's chunk past d (dv) is
        not read and keeps its value: the caller zeroes kf / vf once."""
        for ch in range(NCH):
            c0 = col(ulane, ch * VW)
            if VEC:  # a chunk lies wholly inside or outside d (d % VW == 0)
                if c0 < ud:
                    kt = ldv(k, ko + kl[ch])
                    for x in range(VW):
                        kf[b, ch * VW + x] = kt[x]
                if c0 < udv:
                    vt = ldv(v, vo + vl[ch])
                    for x in range(VW):
                        vf[b, ch * VW + x] = vt[x]
            else:
                for x in range(VW):
                    c = c0 + U(x)
                    if c < ud:
                        kf[b, ch * VW + x] = ld1(k, ko + kl[ch] + x * k.strides[3])[0]
                    if c < udv:
                        vf[b, ch * VW + x] = ld1(v, vo + vl[ch] + x * v.strides[3])[0]

    def load_step_flat(k, v, kf, vf, p0, ub1, kl, vl, ulane, ud, udv):
        """K/V rows of the keys at positions p0 .. p0 + KB - 1 of a contiguous
        cache (block b1): one 64-bit multiply per step, then constant steps."""
        ko = int64(ub1) * k.strides[0] + int64(p0) * k.strides[1]
        vo = int64(ub1) * v.strides[0] + int64(p0) * v.strides[1]
        for b in range(KB):
            kb_ = ko + b * k.strides[1]
            vb_ = vo + b * v.strides[1]
            load_row(k, v, kf, vf, b, kb_, vb_, kl, vl, ulane, ud, udv)

    def load_step_paged(k, v, kf, vf, table, p0, ub1, bs, bsh, kl, vl, ulane, ud, udv):
        """The same through the block table; ``bsh`` = log2(block size) when
        it is a power of two (shift and mask), else -1 (division)."""
        for b in range(KB):
            p = p0 + U(b)
            if bsh >= 0:
                pg = p >> U(bsh)
                slot = p & (bs - U(1))
            else:
                pg = p // bs
                slot = p - pg * bs
            blk = U(table[ub1, pg])
            ko = int64(blk) * k.strides[0] + int64(slot) * k.strides[1]
            vo = int64(blk) * v.strides[0] + int64(slot) * v.strides[1]
            load_row(k, v, kf, vf, b, ko, vo, kl, vl, ulane, ud, udv)

    def make_dots(NK):
        def dots(qr, kf, sc, sh, nreal, tid, team):  # NK keys
            """sc[a, b] = q_a . k_b, summed over the team's lanes (every lane
            gets the sum)."""
            for a in range(RB):
                if a < nreal:
                    for b in range(NK):
                        t = ZERO
                        for e in range(EPL):
                            t += qr[a, e] * kf[b, e]
                        sc[a, b] = t
            if SHFL:
                for a in range(RB):
                    if a < nreal:
                        for b in range(NK):
                            t = sc[a, b]
                            for o in OFFS:
                                t += cuda.shfl_xor_sync(MASK, t, o)
                            sc[a, b] = t
            else:
                for a in range(RB):
                    for b in range(NK):
                        sh[(tid * RB + a) * NK + b] = sc[a, b]
                cuda.syncthreads()
                for a in range(RB):
                    for b in range(NK):
                        t = ZERO
                        for x in range(WL):
                            t += sh[((team * WL + x) * RB + a) * NK + b]
                        sc[a, b] = t
                cuda.syncthreads()

        return _device(dots)

    def fast_step(qr, acc, mr, lr, sc, kf, vf, sh, nreal, scale, tid, team):
        """One fast step on the KB keys in kf / vf: every key visible to every
        real row, no mask or bias, so no tests: scores, online softmax and
        O += P V (the general loop's arithmetic, same order)."""
        dots(qr, kf, sc, sh, nreal, tid, team)
        for a in range(RB):
            if a < nreal:
                mx = mr[a]
                for b in range(KB):
                    t = sc[a, b] * scale
                    sc[a, b] = t
                    mx = nanmax(mx, t)
                ms, alpha = shift(mr[a], mx)
                mr[a] = mx
                ps = ZERO
                for b in range(KB):
                    pv = math.exp(sc[a, b] - ms)
                    sc[a, b] = pv
                    ps += pv
                lr[a] = lr[a] * alpha + ps
                for e in range(EPL):
                    acc[a, e] *= alpha
                for b in range(KB):
                    pv = sc[a, b]
                    for e in range(EPL):
                        acc[a, e] += pv * vf[b, e]

    row_offsets = _device(row_offsets)
    load_row = _device(load_row)
    load_step_flat = _device(load_step_flat)
    load_step_paged = _device(load_step_paged)
    dots = make_dots(KB)
    dots1 = make_dots(1)
    fast_step = _device(fast_step)
    col = _device(col)

    rng = block_ranges()
    sequence, window = rng.sequence, rng.window
    keys_seen, keys_seen_by_all = rng.keys_seen, rng.keys_seen_by_all

    def setup(q, k, seq, gh, n_rt, n_split, wl, wr):
        """The block's coordinates (batch element b1, first head h0, first
        row r0, split s), its sequence (q_off, q_len, k_off), window sides
        (row i sees keys [i + lo_base, i + hi_base), aligned by the table's
        ALIGN column), the split's keys [ks, ke), the sequence's rows and
        the KV head. Derived from the block index and the sequence table
        (the kernel derives them again after its fast loop rather than
        keeping them in registers across it)."""
        hq = q.shape[1]
        group = hq // k.shape[2]
        n_hg = U(hq // gh)
        bid = U(cuda.blockIdx.x)
        s = bid % U(n_split)
        rest = bid // U(n_split)
        rt = rest % U(n_rt)
        rest = rest // U(n_rt)
        hg = rest % n_hg
        b1 = rest // n_hg
        h0 = int64(hg) * gh
        r0 = int64(rt) * RB  # first row of the block
        hk = h0 // group
        q_off, q_len, q_rows, k_off, k_len, offset = sequence(seq, b1, h0)
        lo_base, hi_base = window(offset, wl, wr)
        # The block's queries: r0 // gh .. (r0 + RB - 1) // gh.
        lo, hi = keys_seen(r0 // gh, (r0 + RB - 1) // gh + 1, q_len, k_len, lo_base, hi_base)
        nk = max(hi - lo, 0)
        per = (nk + n_split - 1) // n_split
        ks = lo + min(nk, int64(s) * per)
        ke = lo + min(nk, int64(s + U(1)) * per)
        return (int64(b1), h0, r0, int64(s), q_off, q_len, k_off, lo_base, hi_base, ks, ke,
                q_rows, hk)  # fmt: skip

    def fast_range(ks, ke, r0, gh, nreal, lo_base, hi_base, has_mask, has_bias):
        """(hf, nf): steps hf .. hf + nf - 1 of NTEAM*KB keys from ks are
        fast: every key visible to every real row, no mask or bias."""
        step = NTEAM * KB
        hf = 0
        nf = 0
        if not (has_mask or has_bias) and nreal > 0:
            # Rows in order of i: the first and the last real row bound the keys all see.
            lo_all, hi_all = keys_seen_by_all(r0 // gh, (r0 + nreal - 1) // gh, lo_base, hi_base)
            fs = max(ks, lo_all)
            fe = min(ke, hi_all)
            hf = (fs - ks + step - 1) // step
            nf = max(0, (fe - ks) // step - hf)
        return hf, nf

    def lane_offsets(k, v, kl, vl, ulane, uhk):
        """Byte offsets of the lane's chunks within a key row of head hk."""
        for ch in range(NCH):
            c0 = col(ulane, ch * VW)
            kl[ch] = int64(uhk) * k.strides[2] + int64(c0) * k.strides[3]
            vl[ch] = int64(uhk) * v.strides[2] + int64(c0) * v.strides[3]

    setup = _device(setup)
    fast_range = _device(fast_range)
    lane_offsets = _device(lane_offsets)

    # Hardware: launch bounds for decode_threads_per_sm resident threads
    # (float32: at most 128 registers, 16 warps per SM).
    opts = {}
    if hw and not _on_simulator() and NT % 32 == 0:
        want = decode_threads_per_sm(dtype, RB)
        opts["launch_bounds"] = (NT, max(1, want // NT))

    @cuda.jit(**opts)
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
        kf = cuda.local.array((KB, EPL), nt)
        vf = cuda.local.array((KB, EPL), nt)
        kl = cuda.local.array(NCH, int64)
        vl = cuda.local.array(NCH, int64)

        (b1, h0, r0, s, q_off, q_len, k_off, lo_base, hi_base, ks, ke, q_rows, hk) = setup(
            q, k, seq, gh, n_rt, n_split, wl, wr
        )
        if r0 // gh >= q_rows:
            return  # whole block: past this sequence's rows
        d = q.shape[3]
        dv = v.shape[3]
        tid = cuda.threadIdx.x
        lane = tid % WL
        team = tid // WL

        # Row a of the block: query (r0 + a) // gh of head h0 + (r0 + a) % gh;
        # it sees the keys j of [ks, ke) with i + lo_base <= j < i + hi_base.
        ulane = U(lane)
        uhk = U(hk)
        ud = U(d)
        udv = U(dv)
        ub1 = U(b1)
        for a in range(RB):
            i = (r0 + a) // gh
            h = h0 + (r0 + a) % gh
            mr[a] = NINF
            lr[a] = ZERO
            for e in range(EPL):
                c = col(ulane, e)
                val = ZERO
                if i < q_len and c < ud:
                    val = q[ub1, U(h), U(q_off + i), c]
                qr[a, e] = val
                acc[a, e] = ZERO
        # Rows of the block that exist (block-uniform): the loops below skip the others.
        nreal = min(RB, gh * q_len - r0)
        # K/V fragments start at zero (a chunk past d / dv is never read).
        lane_offsets(k, v, kl, vl, ulane, uhk)
        for b in range(KB):
            for e in range(EPL):
                kf[b, e] = ZERO
                vf[b, e] = ZERO

        step = NTEAM * KB
        hf, nf = fast_range(ks, ke, r0, gh, nreal, lo_base, hi_base, has_mask, has_bias)
        if nf > 0:
            # Two steps a trip (written out twice, the fast loop's body: KB
            # keys' K and V rows loaded, all before any arithmetic, then the
            # step's math); a block table with power-of-two blocks is read
            # with a shift and a mask.
            pt = U(k_off + ks + hf * step + team * KB)
            ust = U(step)
            if paged:
                bs = U(block_size)
                bsh = -1
                if block_size & (block_size - 1) == 0:
                    bsh = 0
                    while (1 << bsh) < block_size:
                        bsh += 1
                for _it in range(nf // 2):
                    load_step_paged(k, v, kf, vf, table, pt, ub1, bs, bsh, kl, vl, ulane, ud, udv)
                    fast_step(qr, acc, mr, lr, sc, kf, vf, sh, nreal, scale, tid, team)
                    pt += ust
                    load_step_paged(k, v, kf, vf, table, pt, ub1, bs, bsh, kl, vl, ulane, ud, udv)
                    fast_step(qr, acc, mr, lr, sc, kf, vf, sh, nreal, scale, tid, team)
                    pt += ust
                if nf % 2:
                    load_step_paged(k, v, kf, vf, table, pt, ub1, bs, bsh, kl, vl, ulane, ud, udv)
                    fast_step(qr, acc, mr, lr, sc, kf, vf, sh, nreal, scale, tid, team)
            else:
                for _it in range(nf // 2):
                    load_step_flat(k, v, kf, vf, pt, ub1, kl, vl, ulane, ud, udv)
                    fast_step(qr, acc, mr, lr, sc, kf, vf, sh, nreal, scale, tid, team)
                    pt += ust
                    load_step_flat(k, v, kf, vf, pt, ub1, kl, vl, ulane, ud, udv)
                    fast_step(qr, acc, mr, lr, sc, kf, vf, sh, nreal, scale, tid, team)
                    pt += ust
                if nf % 2:
                    load_step_flat(k, v, kf, vf, pt, ub1, kl, vl, ulane, ud, udv)
                    fast_step(qr, acc, mr, lr, sc, kf, vf, sh, nreal, scale, tid, team)

        # Barrier (also a compiler fence): the block's values are derived
        # again below, not kept in registers across the fast loop.
        cuda.syncthreads()
        (b1, h0, r0, s, q_off, q_len, k_off, lo_base, hi_base, ks, ke, q_rows, hk) = setup(
            q, k, seq, gh, n_rt, n_split, wl, wr
        )
        ub1 = U(b1)
        nreal = min(RB, gh * q_len - r0)
        hf, nf = fast_range(ks, ke, r0, gh, nreal, lo_base, hi_base, has_mask, has_bias)
        lane_offsets(k, v, kl, vl, ulane, U(hk))

        # The other keys (window edges, causal diagonals, lengths, mask,
        # bias; before and after the fast steps), with every test, one key
        # per team at a time (fewer registers than KB: this loop is not the
        # bandwidth-bound one, and it must fit beside the fast loop).
        n_head = hf * KB  # the fast keys start at ks + n_head * NTEAM
        t0 = ks + (hf + nf) * step  # first key after them
        n_gen = n_head + (max(ke - t0, 0) + NTEAM - 1) // NTEAM
        for g in range(n_gen):
            j = ks + g * NTEAM + team
            if g >= n_head:
                j = t0 + (g - n_head) * NTEAM + team
            # K and V row of the team's key (zeros past ke).
            if j < ke:
                ko, vo = row_offsets(k, v, table, ub1, U(k_off + j), block_size, paged)
                load_row(k, v, kf, vf, 0, ko, vo, kl, vl, ulane, ud, udv)
            else:
                for e in range(EPL):
                    kf[0, e] = ZERO
                    vf[0, e] = ZERO
            dots1(qr, kf, sc, sh, nreal, tid, team)
            # Scale and visibility (-inf: masked); mask and bias when given;
            # online softmax (P = -0.0: masked); O += P V, a masked key's
            # value row never multiplied in.
            for a in range(RB):
                if a < nreal:
                    i = int64(U(r0 + a) // U(gh))
                    t = sc[a, 0] * scale
                    if j >= ke or j < i + lo_base or j >= i + hi_base:
                        t = NINF
                    elif has_mask or has_bias:
                        hh = U(h0) + U(r0 + a) % U(gh)
                        mrow = U(q_off + i)
                        cc = U(k_off + j)
                        if has_mask and not mask[ub1, hh, mrow, cc]:
                            t = NINF
                        elif has_bias:
                            bv = bias[ub1, hh, mrow, cc]
                            t = NINF if bv == NINF else t + bv  # -inf bias masks
                    mx = mr[a]
                    mx = nanmax(mx, t)
                    ms, alpha = shift(mr[a], mx)
                    mr[a] = mx
                    pv = NZERO if t == NINF else math.exp(t - ms)
                    lr[a] = lr[a] * alpha + pv
                    for e in range(EPL):
                        acc[a, e] *= alpha
                    if pv != ZERO or math.copysign(ONE, pv) > ZERO:
                        for e in range(EPL):
                            acc[a, e] += pv * vf[0, e]

        # Combine the teams (in team order) and write the block's rows.
        for a in range(RB):
            if lane == 0:
                sh[OFF_M + team * RB + a] = mr[a]
                sh[OFF_L + team * RB + a] = lr[a]
            for e in range(EPL):
                c = col(ulane, e)
                if c < udv:
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
                    m = nanmax(m, t)
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
        vector=VW if VEC else 1,
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
    nanmax = _nanmax()
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    sequence = block_ranges().sequence

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
        q_off, _, q_rows, _, _, _ = sequence(seq, b1, h)
        if i >= q_rows:
            return
        row = q_off + i
        m = NINF
        for s in range(n_split):
            t = part_l[b1, h, s * split_rows + row]
            m = nanmax(m, t)
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
