"""CUDA kernels of the attention backward pass (FlashAttention-2's recurrence).

Given the forward's ``out`` and ``lse`` and the incoming gradient ``dout``,
with ``P = exp(S - lse)`` recomputed tile by tile (``S = scale * q k^T +
bias``, masked entries excluded) and ``D = rowsum(dout * out)``::

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D),
    dQ = scale * dS K,   dK = scale * dS^T Q.

No Nq x Nk array exists: two kernels recompute P, each accumulating its
outputs in registers, and neither uses atomics, so the gradients are
**deterministic** (bitwise the same on every run and for every launch
order; the float sums run in a fixed order):

1. the *query* kernel (``kv=False``), one block per (batch element, query
   head, tile of BR query rows), computes D for its rows (written to a
   scratch array ``delta`` shaped like ``lse``), then streams the key tiles
   its rows can see and accumulates ``dQ``;
2. the *key* kernel (``kv=True``), one block per (batch element, key head,
   tile of BR key rows), keeps K and V of its keys in shared memory and
   streams, for each query head of the key head's group (grouped-query
   attention: dK and dV are summed over the group in registers, in a fixed
   order: see the fast loop below), the query tiles that can see its keys,
   accumulating ``dK`` and ``dV``. It reads the D the query kernel wrote
   (same stream: ordered).

One factory (:func:`make_backward`) builds both: the block's *own* rows
(queries, or keys) stay resident in shared memory (A1 = Q or K, width d;
A2 = dO or V, width dv) and the *streamed* rows arrive BC at a time (B1 = K
or Q, B2 = V or dO). Per streamed tile:

* S = A1 B1^T and dP = A2 B2^T (transposed for the key kernel): thread
  (tr, tc) computes an RR x RC register micro-tile (own rows ``tr + TR*a``,
  streamed rows ``tc + TC*b``), reading PV consecutive head dimensions per
  (vector) shared-memory load, as the forward kernel;
* visibility (lengths, window, causal: the diagonal offset, the table's
  ALIGN column, read in one place per query head; mask; a -inf bias),
  ``P = exp(S - lse)`` and ``dS = P (dP - D)`` for visible elements, exact
  zeros elsewhere (a masked key or query contributes nothing, and rows whose
  lse is -inf, which see no key, get zero gradients, never NaN);
* P and dS go to shared memory, and each thread accumulates RR own rows x
  (d or dv)/TC columns (groups of CV adjacent columns) of the outputs:
  ``dQ += dS K`` (query kernel), ``dV += P^T dO`` and ``dK += dS^T Q`` (key
  kernel); ``scale`` is applied once at the end.

The visited range of streamed tiles is the one the block's rows can see
(causal, window and lengths cost nothing outside it): visiting it
heaviest-first (last query tiles, first key tiles). Rows and keys outside
the lengths are never read: tiles are zero-filled past them. The key
kernel writes dK/dV for all the key rows a sequence owns, ``max(K_LEN,
k_rows)`` (``k_rows``: the whole of k's axis for dense batches, 0 for
packed varlen sequences): rows past K_LEN get zeros.

Head dimensions are compile-time: the backend builds one kernel per
(dtype, geometry, DP, DVP), DP and DVP being d and dv rounded up to CV*TC
columns (padded columns are zero and cost a little arithmetic). The whole
rows stay in shared memory (48 KiB static): the backend picks the largest
tiles of numbattn.config that fit (:func:`backward_shared_bytes`).

On the tensor cores
    With a product step (``kind``: 3xTF32 or TF32 for float32, DMMA for
    float64, :mod:`numbattn.cuda.steps`, the forward's) and a geometry of
    16 own rows a warp (:func:`backward_tc_ok`), every product is a
    ``mma.sync`` m16n8k8 step: lane (g, t) of warp w owns rows ``mr =
    16w + g`` and ``mr + 8`` and holds ``S[mr + 8h][8n + 2t + e]`` (h, e <
    2) after one step per (8-dim k-step, 8-row n-tile), A = A1[mr][p + t],
    B = B1[8n + g][p + t] (:func:`tile_products` in the factory); dP
    likewise; P and dS go through shared memory and the outputs accumulate
    ``[mr + 8h][8n + 2t + e]`` with A = dS or P [mr][c + t] and B = B1 or
    B2 [c + t][8n + g] (``out_products``). The simulator runs the steps'
    emulation (the same fragment layout). The float32 fast loop is an FMA
    loop: the tensor-core kernels do not build it.

Non-finite inputs
    A masked entry contributes exactly nothing: when a streamed tile holds a
    NaN or inf (each thread flags what it stages; the barrier before the
    output products is a ``syncthreads_or``), a second copy of the output
    loop skips the zero entries of P and dS instead of multiplying them
    (the tensor-core kernel sums key by key there), so a NaN in a key no
    row sees, or in a fully masked query row, reaches no gradient. (A
    visible entry whose P underflows to exactly 0 is skipped too.)

The float32 fast loop (as the forward kernel's)
    Two loops over streamed tiles, as FlashAttention's masked and unmasked
    steps. The *interior* tiles come first, in a fast loop: tiles of BC
    real streamed rows, seen whole by a block of BR real own rows (every
    (query, key) pair inside the window/causal band, ``head_tiles``
    computes the range [sa, sb) per query head), no mask, no bias, float32
    and whole rows padded to DP, DVP <= 64. Its body is one tile's work in
    straight-line code (:func:`numbattn.cuda.kernels._unrolled`: every
    shared offset a compile-time constant): S = A1 B1^T over DP/PV steps
    and dP = A2 B2^T over DVP/PV steps (the zero padding makes the trip
    counts fixed), P and dS without visibility tests, then the output
    products over BC/JV steps (:func:`out_step`, the plain loop of the
    general path): 2048 FMAs a thread and tile for dK/dV at d = dv = 64,
    1536 for dQ. Staging reads only real rows (the column is clamped and
    zeroed past d by a select). The key kernel's loop runs over (head,
    tile) pairs of its group, the query kernel's over its one head. The
    barrier that publishes a tile is a ``syncthreads_or`` of "a NaN or inf
    was staged": set, the block leaves the fast loop before touching the
    tile, and the general loop redoes it (with its NaN-safe output loop)
    and every tile the fast loop did not do. The general loop then visits,
    head by head, every other tile of the range (window and causal edges,
    lengths, mask, bias, d or dv > 64). The order of the float sums is
    fixed (interior tiles of each head in head order, then the others), so
    the gradients stay deterministic; with the fast loop switched off
    (``numbattn.config.CUDA_BWD_FAST_LOOP``) they differ only by that
    order. Registers: the block's constants are read again from ``seq``
    after the fast loop rather than kept across it, the loop state is
    32-bit, and the query kernel reads its rows' lse and D from shared
    memory in the fast loop (``L``/``DD``), which keeps both kernels free
    of spills at their launch bounds (dQ: 128 registers, 16 warps per SM;
    dK/dV: 158, 12 warps per SM; ``python -m numbattn gpu-report``).

The float32 kernel has no warp-level code: its hardware path (``hw``)
differs from the portable one the simulator runs only by launch bounds and
16-byte aligned shared memory (vector loads).
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, int32, int64, uint32

from . import limits
from .blocks import block_ranges
from .geometry import scratch_elements
from .kernels import _device, _on_simulator, _qk_step, _stride, _types, _unrolled, _vec
from .steps import product_step

U = uint32


def backward_vec(dtype) -> int:
    """Columns per vector access (16 bytes: 4 float32, 2 float64)."""
    return 16 // np.dtype(dtype).itemsize


def padded_dim(n: int, dtype, TC: int) -> int:
    """Head dimension ``n`` rounded up to a multiple of CV*TC (at least that)."""
    unit = backward_vec(dtype) * TC
    return max(unit, -(-int(n) // unit) * unit)


def backward_tc_ok(TR, TC, RR, RC, DP, DVP) -> bool:
    """Whether the geometry fits the tensor-core product step's contract
    (:mod:`numbattn.cuda.steps`): whole warps of 16 own rows each
    (``TR*TC == 2*BR``), streamed tiles in 8-row n-tiles and padded head
    dimensions in 8-wide k-steps."""
    NT, BR, BC = TR * TC, TR * RR, TC * RC
    return NT % 32 == 0 and NT == 2 * BR and BC % 8 == 0 and DP % 8 == 0 and DVP % 8 == 0


def backward_layout(dtype, kv, TR, TC, RR, RC, DP, DVP, kind=None):
    """Shared-memory layout of :func:`make_backward`: element offsets and
    strides; ``kind``: the tensor-core step (its emulation's scratch)."""
    isz = np.dtype(dtype).itemsize
    al = 16 // isz
    BR, BC = TR * RR, TC * RC
    # Row strides == 16 bytes (mod 128): the lanes of a vector-load phase read
    # distinct rows at distinct bank groups; P/dS rows == 32 (mod 128).
    lay = dict(AS=_stride(DP, isz, 16), AVS=_stride(DVP, isz, 16), PS=_stride(BC, isz, 32))
    off = 0
    for name, size in (
        ("A1", BR * lay["AS"]),
        ("A2", BR * lay["AVS"]),
        ("B1", BC * lay["AS"]),
        ("B2", BC * lay["AVS"]),
        ("PT", BR * lay["PS"] if kv else 0),
        ("DS", BR * lay["PS"]),
        # lse of the streamed queries (key kernel), or of the own rows (the
        # float32 query kernel's fast loop reads it there)
        ("L", BC if kv else (BR if isz == 4 else 0)),
        ("DD", BC if kv else BR),  # D of the streamed (key) or own (query) rows
        # the emulated mma.sync's operands (simulator), per warp
        ("X", (TR * TC // 32) * scratch_elements(kind) if kind else 0),
    ):
        lay["OFF_" + name] = off
        off += -(-size // al) * al
    lay["TOTAL"] = max(off, 1)
    return lay


def backward_shared_bytes(dtype, kv, TR, TC, RR, RC, DP, DVP, kind=None) -> int:
    lay = backward_layout(dtype, kv, TR, TC, RR, RC, DP, DVP, kind)
    return lay["TOTAL"] * np.dtype(dtype).itemsize


def make_backward(dtype, kv, TR, TC, RR, RC, DP, DVP, hw=False, fast=True, kind=None):
    """The query (``kv=False``) or key (``kv=True``) kernel of the backward pass.

    Signature (:class:`numbattn.cuda.args.BackwardArgs`)::

        kernel(q, k, v, out, dout, lse, delta, dq, dk, dv, seq, bias, mask,
               scale, n_tiles, k_rows, wl, wr, has_bias, has_mask)

    q, out, dout, dq (G1, Hq, Tq, d or dv); k, v, dk, dv (G1, Hk, Tk, d or
    dv) with d <= DP, dv <= DVP; lse and delta (G1, Hq, Tq) (the query
    kernel writes delta, the key kernel reads it); seq, bias, mask, scale,
    windows as the forward kernels. ``n_tiles``: own-row tiles per sequence;
    ``k_rows``: a sequence writes dk/dv rows ``K_OFF .. K_OFF + max(K_LEN,
    k_rows) - 1`` (dense: Nk; packed varlen: 0). Launch:
    grid = G1 * (Hq or Hk) * n_tiles, block = TR*TC threads.

    ``fast``: float32 with DP, DVP <= 64 runs its interior tiles in the
    fast loop (module docstring); False builds the general loop alone.
    ``kind``: every product on the tensor cores with that step
    (:mod:`numbattn.cuda.steps`; the geometry must satisfy
    :func:`backward_tc_ok`), else on the FMA units.
    The kernel's ``head_tiles`` attribute is the Python function that
    computes a block's streamed range and interior tiles (for tests).
    """
    nt, sc_t = _types(dtype)
    KV = bool(kv)
    NT = TR * TC
    BR, BC = TR * RR, TC * RC
    CV = backward_vec(dtype)  # adjacent output columns per group, dims per vector read
    PV = CV
    JV = _vec(BC)  # streamed rows per vector read of P / dS
    NCD = DP // TC  # output columns per thread, width d
    NCV = DVP // TC if KV else 1  # width dv (dV, key kernel)
    NCX = max(NCD, NCV)
    MMA = kind is not None
    if MMA and not backward_tc_ok(TR, TC, RR, RC, DP, DVP):
        raise ValueError(f"geometry {(TR, TC, RR, RC, DP, DVP)} does not fit the tensor cores")
    lay = backward_layout(dtype, KV, TR, TC, RR, RC, DP, DVP, kind)
    AS, AVS, PS = (U(lay[x]) for x in ("AS", "AVS", "PS"))
    ASI, AVSI, PSI = lay["AS"], lay["AVS"], lay["PS"]
    OFF_A1, OFF_A2, OFF_B1, OFF_B2 = (U(lay[x]) for x in ("OFF_A1", "OFF_A2", "OFF_B1", "OFF_B2"))
    OFF_PT, OFF_DS, OFF_L, OFF_DD = (U(lay[x]) for x in ("OFF_PT", "OFF_DS", "OFF_L", "OFF_DD"))
    TOTAL = lay["TOTAL"]
    OFF_X = U(lay["OFF_X"])
    XW = U(scratch_elements(kind) if MMA else 0)
    ROWN = max(RR, 2)  # own rows a thread keeps lse and D of (a lane: 2 on the tensor cores)
    HW = bool(hw)
    NB = BC // 8  # n-tiles of S (tensor cores)
    NOD = DP // 8  # n-tiles of the outputs, width d
    NOV = DVP // 8 if KV else 1  # width dv
    MS, MA1, MA2 = (4 * NB, 4 * NOD, 4 * NOV) if MMA else (1, 1, 1)
    split, mma = product_step(kind if MMA else "f64", HW)
    ALIGN = 16 if hw else None
    NINF = sc_t(-np.inf)
    PINF = sc_t(np.inf)
    ZERO = sc_t(0.0)
    I31 = (1 << 31) - 1
    M32 = (1 << 32) - 1
    # The key index minus the query index of element (a, b) is
    # SG * (own - streamed): keys are the own rows of the key kernel.
    SG = 1 if KV else -1
    uTC = U(TC)
    # S = A1 B1^T (width d) and dP = A2 B2^T (width dv), PV dims a step.
    s_step = _qk_step(RR, RC, PV, TR * ASI, TC * ASI)
    dp_step = _qk_step(RR, RC, PV, TR * AVSI, TC * AVSI)
    # The fast loop (interior tiles, float32 FMA kernel, whole rows of at
    # most 64 dims): both score products and both output products written
    # out step by step over the zero-padded rows (see _unrolled).
    FAST = bool(fast) and np.dtype(dtype) == np.float32 and not MMA and DP <= 64 and DVP <= 64

    def make_out_step(SAFE):
        def out_step(sh, acc1, acc2, df, pf, cf, pp, pt, pb, pv2):
            """acc1 += dS B1 (and acc2 += P B2, key kernel) over JV streamed
            rows: one vector read of dS (and P) per own row, CV columns per
            read of B1 (B2). One step of the general path's output loop;
            ``SAFE`` (a NaN or inf in the tile): exact zeros of dS and P
            (masked entries) are skipped, never multiplied (0 * NaN)."""
            for a in range(RR):
                for e in range(JV):
                    df[a, e] = sh[pp + U(a * TR * PSI + e)]
                    if KV:
                        pf[a, e] = sh[pt + U(a * TR * PSI + e)]
            for e in range(JV):
                for x in range(NCD):
                    cf[x] = sh[pb + U(e * ASI + (x // CV) * CV * TC + x % CV)]
                for a in range(RR):
                    for x in range(NCD):
                        if not SAFE or df[a, e] != ZERO:
                            acc1[a, x] += df[a, e] * cf[x]
                if KV:
                    for x in range(NCV):
                        cf[x] = sh[pv2 + U(e * AVSI + (x // CV) * CV * TC + x % CV)]
                    for a in range(RR):
                        for x in range(NCV):
                            if not SAFE or pf[a, e] != ZERO:
                                acc2[a, x] += pf[a, e] * cf[x]

        return _device(out_step)

    out_step, out_step_safe = make_out_step(False), make_out_step(True)
    fast_s = _unrolled(
        "fast_s",
        DP // PV,
        "sh, s, af, bf, pa, pb",
        "s_step(sh, s, af, bf, pa + U({i} * PV), pb + U({i} * PV))",
        dict(s_step=s_step, U=U, PV=PV),
    )
    fast_dp = _unrolled(
        "fast_dp",
        DVP // PV,
        "sh, s, af, bf, pa, pb",
        "dp_step(sh, s, af, bf, pa + U({i} * PV), pb + U({i} * PV))",
        dict(dp_step=dp_step, U=U, PV=PV),
    )
    fast_out = _unrolled(
        "fast_out",
        BC // JV,
        "sh, acc1, acc2, df, pf, cf, pp, pt, pb, pv2",
        "out_step(sh, acc1, acc2, df, pf, cf, pp + U({i} * JV), pt + U({i} * JV),"
        " pb + U({i} * JV * ASI), pv2 + U({i} * JV * AVSI))",
        dict(out_step=out_step, U=U, JV=JV, ASI=ASI, AVSI=AVSI),
    )

    # The fast loop's staging of B1 and B2 (one definition): element idx =
    # tid + NT*trip of a BC x W tile, consecutive threads on consecutive
    # columns; `bad` is set (an int, for syncthreads_or) when a staged value
    # is NaN or inf.
    def make_stage_fast(W, RS, OFF):
        def stage_fast(sh, src, b1, hh, us0, wm1, utid, bad):
            """The fast loop's: BC real rows from us0, columns past ``wm1``
            (the last real one) zeroed by a select after a clamped load."""
            idx = utid
            while idx < U(BC * W):
                r = U(idx // U(W))
                p = U(idx % U(W))
                row = U(us0 + r)
                val = src[b1, hh, row, min(p, wm1)]
                val = val if p <= wm1 else ZERO
                if not math.isfinite(val):
                    bad = int32(1)
                sh[U(OFF + r * RS + p)] = val
                idx = U(idx + U(NT))
            return bad

        return _device(stage_fast)

    fast_b1, fast_b2 = make_stage_fast(DP, AS, OFF_B1), make_stage_fast(DVP, AVS, OFF_B2)

    def tile_products(sh, xw, lane, acc, pa, pb, stride, nks):
        """acc += A B^T on the tensor cores, over ``nks`` 8-dim k-steps: A the
        own rows at ``pa`` (the lane's row, column t), B the streamed rows at
        ``pb`` (row g of each n-tile, column t), both ``stride`` apart."""
        for ks in range(nks):
            p = U(8 * ks)
            a0 = split(sh[U(pa + p)])
            a1 = split(sh[U(pa + U(8) * stride + p)])
            a2 = split(sh[U(pa + p + U(4))])
            a3 = split(sh[U(pa + U(8) * stride + p + U(4))])
            for n in range(NB):
                bb = U(pb + U(8 * n) * stride + p)
                c0, c1, c2, c3 = mma(
                    sh, xw, lane, a0, a1, a2, a3, split(sh[bb]), split(sh[U(bb + U(4))]),
                    acc[4 * n], acc[4 * n + 1], acc[4 * n + 2], acc[4 * n + 3],
                )  # fmt: skip
                acc[4 * n] = c0
                acc[4 * n + 1] = c1
                acc[4 * n + 2] = c2
                acc[4 * n + 3] = c3

    def make_out_products(NTILES):
        def out_products(sh, xw, lane, acc, pa, pb, stride):
            """acc += A B on the tensor cores over the streamed tile (BC / 8
            k-steps): A = dS or P at ``pa`` (rows of stride PS, the lane's
            row, column t), B the streamed rows at ``pb`` (row t, column g),
            ``stride`` apart; NTILES 8-column n-tiles of output."""
            for ks in range(BC // 8):
                p = U(8 * ks)
                a0 = split(sh[U(pa + p)])
                a1 = split(sh[U(pa + U(8) * PS + p)])
                a2 = split(sh[U(pa + p + U(4))])
                a3 = split(sh[U(pa + U(8) * PS + p + U(4))])
                for n in range(NTILES):
                    bb = U(pb + p * stride + U(8 * n))
                    c0, c1, c2, c3 = mma(
                        sh, xw, lane, a0, a1, a2, a3, split(sh[bb]), split(sh[U(bb + U(4) * stride)]),
                        acc[4 * n], acc[4 * n + 1], acc[4 * n + 2], acc[4 * n + 3],
                    )  # fmt: skip
                    acc[4 * n] = c0
                    acc[4 * n + 1] = c1
                    acc[4 * n + 2] = c2
                    acc[4 * n + 3] = c3

        return _device(out_products)

    tile_products = _device(tile_products)
    out_products_d, out_products_v = make_out_products(NOD), make_out_products(NOV)

    def make_head_tiles(rng):
        """``head_tiles`` built on ``rng``, the helpers of
        :func:`numbattn.cuda.blocks.block_ranges` (device or Python)."""
        read, sides = rng.sequence, rng.window
        seen, seen_by_all = rng.keys_seen, rng.keys_seen_by_all
        seeing, seeing_all = rng.queries_seeing, rng.queries_seeing_all

        def head_tiles(seq, b1, h, o0, k_off, k_len, wl, wr, full):
            """Query head h's streamed rows for this block: (s_off, s_len,
            lo_base, hi_base, slo, shi, n_st, sa, sb). Key j is visible to query
            i iff lo_base <= j - i < hi_base; the block's rows see streamed rows
            [slo, shi), n_st tiles of BC from slo; tiles [sa, sb) are interior:
            every (own, streamed) pair of the tile is a real, visible one
            (``full``: the block's BR own rows are real, no mask, no bias)."""
            q_off, q_len, _, _, _, offset = read(seq, b1, h)
            lo_base, hi_base = sides(offset, wl, wr)
            # Streamed tiles [s0, s0 + BC) with s0 in [smin, smax] see the
            # own rows whole (window only).
            if KV:
                slo, shi = seeing(o0, o0 + BR, q_len, k_len, lo_base, hi_base)
                s_len = q_len
                s_off = q_off
                smin, send = seeing_all(o0, o0 + BR - 1, lo_base, hi_base)
            else:
                slo, shi = seen(o0, o0 + BR, q_len, k_len, lo_base, hi_base)
                s_len = k_len
                s_off = k_off
                smin, send = seen_by_all(o0, o0 + BR - 1, lo_base, hi_base)
            smax = send - BC
            n_st = 0
            if shi > slo:
                n_st = (shi - slo + BC - 1) // BC
            sa = 0
            sb = 0
            if full and n_st > 0:
                # s0 = slo + BC*st in [smin, smax] and s0 + BC <= shi.
                sa = min(n_st, max(0, -((slo - smin) // BC)))
                sb = max(sa, min(n_st, (min(smax, shi - BC) - slo) // BC + 1))
            return s_off, s_len, lo_base, hi_base, slo, shi, n_st, sa, sb

        return head_tiles

    head_tiles_py = make_head_tiles(block_ranges(device=False))
    head_tiles = _device(make_head_tiles(block_ranges()))
    read_sequence = block_ranges().sequence

    def block_rows(seq, n_tiles, k_rows, g2n, group):
        """The block's (b1, b2, o0, h0, hk, k_off, k_len, own_off, own_len,
        own_rows): batch element, query (or key) head, first own row, a query
        head of its table rows, key head, keys, own rows."""
        bid = cuda.blockIdx.x
        # Heaviest tiles first under causal masking: the first key tiles,
        # the last query tiles.
        tile = bid % n_tiles if KV else n_tiles - 1 - bid % n_tiles
        rest = bid // n_tiles
        b2 = U(rest % g2n)
        b1 = U(rest // g2n)
        o0 = tile * BR
        h0 = b2 * U(group) if KV else b2  # a query head of this block's table rows
        hk = U(b2 if KV else b2 // U(group))
        q_off, q_len, q_rows, k_off, k_len, _ = read_sequence(seq, b1, h0)
        if KV:
            own_off = k_off
            own_len = k_len
            own_rows = max(k_len, k_rows)
        else:
            own_off = q_off
            own_len = q_len
            own_rows = q_rows
        return b1, b2, o0, h0, hk, k_off, k_len, own_off, own_len, own_rows

    block_rows = _device(block_rows)
    opts = {}
    if hw and NT % 32 == 0 and not _on_simulator():
        # Resident threads per SM asked of ptxas (registers: 65536 / that,
        # in whole warps per sub-partition), as shared memory allows: 512
        # (128 registers) for the float32 query kernel, 384 (168) for the
        # float32 key kernel and the float64 query kernel, 256 for the
        # float64 key kernel (dK and dV in registers: fewer spill).
        want = 384
        if np.dtype(dtype) == np.float32 and not KV:
            want = 512
        elif MMA and KV:
            want = 256
        want = max(1, -(-want // NT))
        smem = TOTAL * np.dtype(dtype).itemsize
        opts["launch_bounds"] = (NT, limits.launch_blocks(want, smem))

    @cuda.jit(**opts)
    def backward_kernel(
        q,
        k,
        v,
        out,
        dout,
        lse,
        delta,
        dq,
        dk,
        dv,
        seq,
        bias,
        mask,
        scale,
        n_tiles,
        k_rows,
        wl,
        wr,
        has_bias,
        has_mask,
    ):
        sh = cuda.shared.array(TOTAL, nt, alignment=ALIGN)
        s = cuda.local.array((RR, RC), nt)
        dp = cuda.local.array((RR, RC), nt)
        af = cuda.local.array((RR, PV), nt)
        bf = cuda.local.array((RC, PV), nt)
        pf = cuda.local.array((RR, JV), nt)
        df = cuda.local.array((RR, JV), nt)
        cf = cuda.local.array(NCX, nt)
        acc1 = cuda.local.array((RR, NCD), nt)  # dQ (query kernel) or dK
        acc2 = cuda.local.array((RR, NCV), nt)  # dV (key kernel)
        own_l = cuda.local.array(ROWN, nt)  # query kernel: lse of its rows
        own_d = cuda.local.array(ROWN, nt)  # query kernel: D of its rows
        ms = cuda.local.array(MS, nt)  # tensor cores: S, dP and outputs of a lane
        mdp = cuda.local.array(MS, nt)
        macc1 = cuda.local.array(MA1, nt)
        macc2 = cuda.local.array(MA2, nt)

        hq_n = q.shape[1]
        group = hq_n // k.shape[1]
        d = q.shape[3]
        dvw = v.shape[3]
        g2n = k.shape[1] if KV else hq_n
        b1, b2, o0, h0, hk, k_off, k_len, own_off, own_len, own_rows = block_rows(
            seq, n_tiles, k_rows, g2n, group
        )
        if o0 >= own_rows:
            return  # whole block: past this sequence's rows
        utid = U(cuda.threadIdx.x)
        utc = utid % uTC
        utr = utid // uTC
        tc = int64(utc)
        tr = int64(utr)
        # Tensor cores: lane (g, t) of warp w owns rows mr = 16w + g and
        # mr + 8 of the tile.
        lane = U(utid & U(31))
        ug = U(lane >> U(2))
        ut = U(lane & U(3))
        ut2 = U(ut * U(2))
        t2 = int64(ut2)
        umr = U(U(utid >> U(5)) * U(16) + ug)
        mr = int64(umr)
        xw = U(OFF_X + U(utid >> U(5)) * XW)  # the warp's emulation scratch

        # Own rows, resident: A1 (Q or K, width d), A2 (dO or V, width dv),
        # zero-filled past own_len and past the head dimensions.
        idx = utid
        while idx < U(BR * DP):
            r = U(idx // U(DP))
            p = U(idx % U(DP))
            val = ZERO
            if r < own_len - o0 and p < d:
                if KV:
                    val = k[b1, hk, U(own_off + o0 + r), p]
                else:
                    val = q[b1, b2, U(own_off + o0 + r), p]
            sh[U(OFF_A1 + r * AS + p)] = val
            idx = U(idx + U(NT))
        idx = utid
        while idx < U(BR * DVP):
            r = U(idx // U(DVP))
            p = U(idx % U(DVP))
            val = ZERO
            if r < own_len - o0 and p < dvw:
                if KV:
                    val = v[b1, hk, U(own_off + o0 + r), p]
                else:
                    val = dout[b1, b2, U(own_off + o0 + r), p]
            sh[U(OFF_A2 + r * AVS + p)] = val
            idx = U(idx + U(NT))
        if not KV:
            # D = rowsum(dO * O) of the own rows (one thread a row), for
            # this kernel and, through delta, the key kernel.
            if utid < U(BR):
                r = utid
                tot = ZERO
                if r < own_len - o0:
                    row = U(own_off + o0 + r)
                    for c in range(dvw):
                        tot += dout[b1, b2, row, c] * out[b1, b2, row, c]
                sh[OFF_DD + r] = tot
                if r < own_rows - o0:
                    delta[b1, b2, U(own_off + o0 + r)] = tot
        cuda.syncthreads()
        if MMA:
            for c in range(MA1):
                macc1[c] = ZERO
            for c in range(MA2):
                macc2[c] = ZERO
            if not KV:
                for hr in range(2):
                    x = PINF
                    if mr + 8 * hr < own_len - o0:
                        x = lse[b1, b2, U(own_off + o0 + mr + 8 * hr)]
                        if x == NINF:
                            x = PINF
                    dx = sh[OFF_DD + U(umr + U(8 * hr))]
                    if hr == 0:  # constant indices (see the visibility loop)
                        own_l[0] = x
                        own_d[0] = dx
                    else:
                        own_l[1] = x
                        own_d[1] = dx
        else:
            for a in range(RR):
                for c in range(NCD):
                    acc1[a, c] = ZERO
                for c in range(NCV):
                    acc2[a, c] = ZERO
                if not KV:
                    r = tr + TR * a
                    x = PINF  # rows past own_len: no visible key
                    if r < own_len - o0:
                        x = lse[b1, b2, U(own_off + o0 + r)]
                        if x == NINF:
                            x = PINF  # no visible key: exp(s - inf) = 0
                    own_l[a] = x
                    own_d[a] = sh[OFF_DD + U(r)]
                    if FAST and tc == 0:  # for the fast loop, which reads it from there
                        sh[OFF_L + U(r)] = x

        n_heads = group if KV else 1
        # The fast loop: the interior tiles of every head of the group (head
        # order; whole blocks of real own rows, no mask, no bias), one
        # loop over (head, tile), fixed trip counts over the zero-padded
        # rows, no visibility tests, no NaN-safe output loop. A NaN or inf
        # staged (block-uniform, from the barrier that publishes the tile)
        # leaves it: the general loop redoes that tile and the rest.
        full = FAST and not has_mask and not has_bias and o0 + BR <= own_len
        full = full and d > 0 and dvw > 0
        gstop = -1  # heads < gstop: interior tiles done; head gstop: [sa, ststop)
        ststop = U(0)
        if full:
            # 32-bit loop state (token counts < 2**31): fewer live registers.
            # The query kernel's one head is set up here; the key kernel
            # starts each head of its group inside the loop.
            gi = -1 if KV else 0
            h = h0
            ust, usb, uslo, usoff = U(0), U(0), U(0), U(0)
            if not KV:
                s_off, _sl, _lb, _hb, slo, _sh, _n, sa, sb = head_tiles(
                    seq, b1, h, o0, k_off, k_len, wl, wr, True
                )
                ust, usb, uslo, usoff = U(sa), U(sb), U(slo), U(s_off)
            dm1 = U(d - 1)
            dvm1 = U(dvw - 1)
            while True:
                if ust >= usb:  # the next head's interior tiles (key kernel)
                    gi += 1
                    if not KV or gi >= n_heads:
                        break
                    h = U(h0 + U(gi))
                    s_off, _sl, _lb, _hb, slo, _sh, _n, sa, sb = head_tiles(
                        seq, b1, h, o0, k_off, k_len, wl, wr, True
                    )
                    ust, usb, uslo, usoff = U(sa), U(sb), U(slo), U(s_off)
                    continue
                us0 = U(usoff + uslo + ust * U(BC))  # the tile's first streamed row
                # Every streamed row is real: only the columns are tested
                # (clamped loads, then a select).
                bad = int32(0)
                if KV:
                    bad = fast_b1(sh, q, b1, h, us0, dm1, utid, bad)
                    bad = fast_b2(sh, dout, b1, h, us0, dvm1, utid, bad)
                else:
                    bad = fast_b1(sh, k, b1, hk, us0, dm1, utid, bad)
                    bad = fast_b2(sh, v, b1, hk, us0, dvm1, utid, bad)
                if KV and utid < U(BC):
                    row = U(us0 + utid)
                    lx = lse[b1, h, row]
                    if lx == NINF:
                        lx = PINF
                    sh[OFF_L + utid] = lx
                    sh[OFF_DD + utid] = delta[b1, h, row]
                if cuda.syncthreads_or(bad):
                    break
                for a in range(RR):
                    for b in range(RC):
                        s[a, b] = ZERO
                        dp[a, b] = ZERO
                # Shared offsets from the thread's coordinates (fewer live
                # registers than keeping them across the loop).
                utc = utid % uTC
                utr = utid // uTC
                fast_s(sh, s, af, bf, U(OFF_A1 + utr * AS), U(OFF_B1 + utc * AS))  # S = A1 B1^T
                fast_dp(sh, dp, af, bf, U(OFF_A2 + utr * AVS), U(OFF_B2 + utc * AVS))  # dP
                pp = U(OFF_DS + utr * PS)
                pt = U(OFF_PT + utr * PS)
                for a in range(RR):
                    for b in range(RC):
                        x = s[a, b] * scale
                        if KV:
                            lx = sh[OFF_L + utc + U(TC * b)]
                            dx = sh[OFF_DD + utc + U(TC * b)]
                        else:  # (fewer live registers than own_l, own_d)
                            lx = sh[OFF_L + utr + U(TR * a)]
                            dx = sh[OFF_DD + utr + U(TR * a)]
                        pv = ZERO
                        dsv = ZERO
                        if x != NINF:
                            pv = math.exp(x - lx)
                            dsv = pv * (dp[a, b] - dx)
                        if KV:
                            sh[U(pt + U(TR * a * PSI + TC * b) + utc)] = pv
                        sh[U(pp + U(TR * a * PSI + TC * b) + utc)] = dsv
                cuda.syncthreads()
                # dQ += dS K, or dK += dS^T Q and dV += P^T dO.
                fast_out(
                    sh, acc1, acc2, df, pf, cf, pp, pt,
                    U(OFF_B1 + utc * U(CV)), U(OFF_B2 + utc * U(CV)),
                )  # fmt: skip
                cuda.syncthreads()
                ust = U(ust + U(1))
            gstop = gi
            ststop = ust
            # The block's constants, read again rather than kept in registers
            # across the fast loop.
            b1, b2, o0, h0, hk, k_off, k_len, own_off, own_len, own_rows = block_rows(
                seq, n_tiles, k_rows, g2n, group
            )
            utid = U(cuda.threadIdx.x)
            utc = utid % uTC
            utr = utid // uTC
            tc = int64(utc)
            tr = int64(utr)

        # The general loop: every head, every other tile (or all of them).
        for g in range(n_heads):
            h = U(h0 + U(g)) if KV else b2
            s_off, s_len, lo_base, hi_base, slo, shi, n_st, sa, sb = head_tiles(
                seq, b1, h, o0, k_off, k_len, wl, wr, full
            )
            # Interior tiles [sa, sa + ndone) were done by the fast loop.
            ndone = U(0)
            if g < gstop:
                ndone = U(sb - sa)
            elif g == gstop:
                ndone = U(ststop - sa)
            usa = U(sa)
            ocnt = U(min(max(own_len - o0 - tr, 0), BR))  # real own rows: TR*a < ocnt
            for st in range(n_st):
                if U(st - usa) < ndone:
                    continue
                s0 = slo + st * BC
                ns = shi - s0
                # Streamed rows: B1 (K or Q, width d), B2 (V or dO, width dv);
                # bad: a NaN or inf staged (an int: for syncthreads_or).
                bad = int32(0)
                idx = utid
                while idx < U(BC * DP):
                    r = U(idx // U(DP))
                    p = U(idx % U(DP))
                    val = ZERO
                    if r < ns and p < d:
                        if KV:
                            val = q[b1, h, U(s_off + s0 + r), p]
                        else:
                            val = k[b1, hk, U(s_off + s0 + r), p]
                        if not math.isfinite(val):
                            bad = int32(1)
                    sh[U(OFF_B1 + r * AS + p)] = val
                    idx = U(idx + U(NT))
                idx = utid
                while idx < U(BC * DVP):
                    r = U(idx // U(DVP))
                    p = U(idx % U(DVP))
                    val = ZERO
                    if r < ns and p < dvw:
                        if KV:
                            val = dout[b1, h, U(s_off + s0 + r), p]
                        else:
                            val = v[b1, hk, U(s_off + s0 + r), p]
                        if not math.isfinite(val):
                            bad = int32(1)
                    sh[U(OFF_B2 + r * AVS + p)] = val
                    idx = U(idx + U(NT))
                if KV:
                    if utid < U(BC):
                        lx = PINF
                        dx = ZERO
                        if utid < ns:
                            row = U(s_off + s0 + utid)
                            lx = lse[b1, h, row]
                            if lx == NINF:
                                lx = PINF
                            dx = delta[b1, h, row]
                        sh[OFF_L + utid] = lx
                        sh[OFF_DD + utid] = dx
                cuda.syncthreads()
                if MMA:
                    # Tensor cores: lane (g, t) of warp w holds S[mr + 8hr][8n + 2t + e]
                    # (mr = 16w + g) in ms[4n + 2hr + e] after one step per
                    # (8-dim k-step, n-tile); dP likewise in mdp.
                    for c in range(MS):
                        ms[c] = ZERO
                        mdp[c] = ZERO
                    tile_products(sh, xw, lane, ms, U(OFF_A1 + umr * AS + ut),
                                  U(OFF_B1 + ug * AS + ut), AS, (d + 7) // 8)  # fmt: skip
                    tile_products(sh, xw, lane, mdp, U(OFF_A2 + umr * AVS + ut),
                                  U(OFF_B2 + ug * AVS + ut), AVS, (dvw + 7) // 8)  # fmt: skip
                    ocnt_ = own_len - o0
                    scnt_ = shi - s0
                    for hr in range(2):
                        r_ = mr + 8 * hr
                        orow = own_off + o0 + r_
                        for n in range(NB):
                            for e in range(2):
                                c = 8 * n + t2 + e
                                diff = SG * ((o0 + r_) - (s0 + c))
                                vis = (
                                    lo_base <= diff and diff < hi_base and r_ < ocnt_ and c < scnt_
                                )
                                srow = s_off + s0 + c
                                if KV:
                                    qrow = U(srow)
                                    kcol = U(orow)
                                else:
                                    qrow = U(orow)
                                    kcol = U(srow)
                                if vis and has_mask:
                                    vis = mask[b1, h, qrow, kcol]
                                pv = ZERO
                                dsv = ZERO
                                if vis:
                                    # Constant indices, chosen by hr: the
                                    # loop over hr stays rolled, and an index
                                    # depending on it would put the arrays
                                    # in local memory.
                                    x = ms[4 * n + e] if hr == 0 else ms[4 * n + 2 + e]
                                    x = x * scale
                                    if has_bias:
                                        x += bias[b1, h, qrow, kcol]
                                    if KV:
                                        lx = sh[OFF_L + U(c)]
                                        dx = sh[OFF_DD + U(c)]
                                    else:
                                        lx = own_l[0] if hr == 0 else own_l[1]
                                        dx = own_d[0] if hr == 0 else own_d[1]
                                    if x != NINF:
                                        pv = math.exp(x - lx)
                                        dpx = mdp[4 * n + e] if hr == 0 else mdp[4 * n + 2 + e]
                                        dsv = pv * (dpx - dx)
                                if KV:
                                    sh[U(OFF_PT + U(r_) * PS + U(c))] = pv
                                sh[U(OFF_DS + U(r_) * PS + U(c))] = dsv
                else:
                    # S = A1 B1^T, dP = A2 B2^T: own rows tr + TR*a, streamed
                    # rows tc + TC*b, PV consecutive dims per (vector) read.
                    for a in range(RR):
                        for b in range(RC):
                            s[a, b] = ZERO
                            dp[a, b] = ZERO
                    npv = U((d + PV - 1) // PV)
                    pa = OFF_A1 + utr * AS
                    pb = OFF_B1 + utc * AS
                    for _pi in range(npv):
                        s_step(sh, s, af, bf, pa, pb)
                        pa = U(pa + U(PV))
                        pb = U(pb + U(PV))
                    npv = U((dvw + PV - 1) // PV)
                    pa = OFF_A2 + utr * AVS
                    pb = OFF_B2 + utc * AVS
                    for _pi in range(npv):
                        dp_step(sh, dp, af, bf, pa, pb)
                        pa = U(pa + U(PV))
                        pb = U(pb + U(PV))
                    # Visibility: key - query = SG*(own - streamed) = diag +
                    # SG*(TR*a - TC*b); the window test is one unsigned compare
                    # (as the forward kernel), the counts clamp to the tile.
                    diag = SG * ((o0 - s0) + (tr - tc))
                    dl = diag - max(lo_base, -I31)
                    wid = U(max(min(hi_base, I31) - max(lo_base, -I31), 0))
                    scnt = U(min(max(min(s_len, shi) - s0 - tc, 0), BC))  # TC*b < scnt
                    for a in range(RR):
                        r = tr + TR * a
                        orow = own_off + o0 + r
                        for b in range(RC):
                            c = tc + TC * b
                            srow = s_off + s0 + c
                            vis = (
                                U((dl + SG * (TR * a - TC * b)) & M32) < wid
                                and U(TR * a) < ocnt
                                and U(TC * b) < scnt
                            )
                            if KV:
                                qrow = U(srow)
                                kcol = U(orow)
                            else:
                                qrow = U(orow)
                                kcol = U(srow)
                            if vis and has_mask:
                                vis = mask[b1, h, qrow, kcol]
                            pv = ZERO
                            dsv = ZERO
                            if vis:
                                x = s[a, b] * scale
                                if has_bias:
                                    x += bias[b1, h, qrow, kcol]
                                if KV:
                                    lx = sh[OFF_L + U(c)]
                                    dx = sh[OFF_DD + U(c)]
                                else:
                                    lx = own_l[a]
                                    dx = own_d[a]
                                if x != NINF:  # a -inf bias masks
                                    pv = math.exp(x - lx)
                                    dsv = pv * (dp[a, b] - dx)
                            if KV:
                                sh[U(OFF_PT + U(r) * PS + U(c))] = pv
                            sh[U(OFF_DS + U(r) * PS + U(c))] = dsv
                vbad = cuda.syncthreads_or(bad)  # block-uniform
                if MMA:
                    if vbad:  # key by key, skipping masked entries (as above)
                        for hr in range(2):
                            prow = U(U(umr + U(8 * hr)) * PS)
                            for j in range(BC):
                                dsj = sh[U(OFF_DS + prow + U(j))]
                                if dsj != ZERO:
                                    for n in range(NOD):
                                        for e in range(2):
                                            bv = sh[U(OFF_B1 + U(j) * AS + U(8 * n + e) + ut2)]
                                            if hr == 0:  # constant indices (see above)
                                                macc1[4 * n + e] += dsj * bv
                                            else:
                                                macc1[4 * n + 2 + e] += dsj * bv
                                if KV:
                                    pj = sh[U(OFF_PT + prow + U(j))]
                                    if pj != ZERO:
                                        for n in range(NOV):
                                            for e in range(2):
                                                bv = sh[U(OFF_B2 + U(j) * AVS + U(8 * n + e) + ut2)]
                                                if hr == 0:
                                                    macc2[4 * n + e] += pj * bv
                                                else:
                                                    macc2[4 * n + 2 + e] += pj * bv
                    else:  # A = dS or P [mr][8ks + t], B = B1 or B2 [8ks + t][8n + g]
                        out_products_d(sh, xw, lane, macc1, U(OFF_DS + umr * PS + ut),
                                       U(OFF_B1 + ut * AS + ug), AS)  # fmt: skip
                        if KV:
                            out_products_v(sh, xw, lane, macc2, U(OFF_PT + umr * PS + ut),
                                           U(OFF_B2 + ut * AVS + ug), AVS)  # fmt: skip
                else:
                    # dQ += dS K (query kernel); dK += dS^T Q and dV += P^T dO
                    # (key kernel): own rows tr + TR*a, columns
                    # CV*tc + CV*TC*g + w; JV streamed rows per read of dS / P.
                    pp = OFF_DS + utr * PS
                    pt = OFF_PT + utr * PS
                    pb = OFF_B1 + utc * U(CV)
                    pv2 = OFF_B2 + utc * U(CV)
                    # A NaN or inf in the streamed tile: masked entries (exact zeros)
                    # are skipped, never multiplied (0 * NaN); the plain copy of
                    # the loop carries no such test.
                    if vbad:
                        for ci in range(BC // JV):
                            out_step_safe(
                                sh, acc1, acc2, df, pf, cf, pp + U(ci * JV), pt + U(ci * JV),
                                pb + U(ci * JV * ASI), pv2 + U(ci * JV * AVSI),
                            )  # fmt: skip
                    else:
                        for ci in range(BC // JV):
                            out_step(
                                sh, acc1, acc2, df, pf, cf, pp + U(ci * JV), pt + U(ci * JV),
                                pb + U(ci * JV * ASI), pv2 + U(ci * JV * AVSI),
                            )  # fmt: skip
                cuda.syncthreads()

        if MMA:
            for hr in range(2):
                if o0 + mr + 8 * hr < own_rows:
                    row = U(own_off + o0 + mr + 8 * hr)
                    for n in range(NOD):
                        for e in range(2):
                            col = U(8 * n + e) + ut2
                            if col < d:
                                val = macc1[4 * n + e] if hr == 0 else macc1[4 * n + 2 + e]
                                val = val * scale
                                if KV:
                                    dk[b1, b2, row, col] = val
                                else:
                                    dq[b1, b2, row, col] = val
                    if KV:
                        for n in range(NOV):
                            for e in range(2):
                                col = U(8 * n + e) + ut2
                                if col < dvw:
                                    val = macc2[4 * n + e] if hr == 0 else macc2[4 * n + 2 + e]
                                    dv[b1, b2, row, col] = val
        else:
            for a in range(RR):
                r = o0 + tr + TR * a
                if r < own_rows:
                    row = U(own_off + r)
                    for x in range(NCD):
                        col = utc * U(CV) + U((x // CV) * CV * TC + x % CV)
                        if col < d:
                            if KV:
                                dk[b1, b2, row, col] = acc1[a, x] * scale
                            else:
                                dq[b1, b2, row, col] = acc1[a, x] * scale
                    if KV:
                        for x in range(NCV):
                            col = utc * U(CV) + U((x // CV) * CV * TC + x % CV)
                            if col < dvw:
                                dv[b1, b2, row, col] = acc2[a, x]

    backward_kernel.geometry = dict(
        threads=NT,
        own_tile=BR,
        streamed_tile=BC,
        head_dims=DP,
        value_dims=DVP,
        shared_bytes=TOTAL * np.dtype(dtype).itemsize,
        path="hardware" if hw else "simulator",
        fast_loop=FAST,
    )
    # For tests: which tiles a block takes through the fast loop (Python).
    backward_kernel.head_tiles = head_tiles_py
    return backward_kernel
