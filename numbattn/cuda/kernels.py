"""CUDA kernels (``numba.cuda.jit``), built by factories per compile-time geometry.

Every kernel takes arrays with exactly two leading batch dimensions (G1, G2)
and arbitrary strides (layout 'A'), writes every element of its outputs and
validates nothing. Shared-memory sizes must be compile-time constants in
Numba, so each factory closes over its tile sizes; :mod:`numbattn.cuda.backend`
caches one kernel per (dtype, geometry) and picks the geometry from
:mod:`numbattn.config` at call time.

Kernels with hardware-only code (the fused attention kernel: warp
shuffles, launch bounds, aligned shared memory) are built in two paths by
their factory's ``hw`` flag; the backend builds the hardware path on a GPU
and the portable one under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, which has no shuffles and no inline PTX); the
two give the same results within tolerance. No libdevice-only intrinsics. No
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
       (keys ``tx + TX*b``) from Q (resident in shared memory when d <= DC,
       else re-staged per d-chunk) and K staged in shared memory per chunk
       of DC dims, both row-major; it reads PV (4) consecutive head
       dimensions of a row at once (one LDS.128 for float32), so a step
       costs RQ + RK vector loads for PV*RQ*RK FMAs. The chunk is
       zero-padded, so the trip count is ceil(min(DC, d - p0) / PV);
    2. visibility: a tile that every row of the block sees entirely (all
       rows real, ``j0 >= lo`` of the last row, ``j0 + BK <= hi`` of the
       first) and no mask takes the fast path, ``s * scale`` (``+ bias``
       when given); otherwise each element is tested against its row's
       window (one unsigned 32-bit compare), the key and row counts and
       the mask, and the bias is read only for visible elements;
    3. online softmax: row maxima and sums over the TX threads sharing a
       row: on hardware by warp shuffles (``shfl_xor_sync`` butterflies
       within the row's TX lanes, when TX divides 32), in the portable path
       the simulator runs through two small shared buffers and a barrier
       each; either way every thread of a row gets the same values (the
       butterfly adds each pair in both lanes alike), so they agree. P =
       exp(S - m) is written to its own shared region; a row whose scores
       are all -inf so far (window, mask, -inf bias) keeps m = -inf and
       exponentiates against 0, never NaN;
    4. P @ V: the thread accumulates an RQ x RC register tile of the output
       (columns ``CV*tx + CV*TX*g + w``: groups of CV (4) adjacent columns)
       from P (JV keys per vector read) and the row-major V tile (one vector
       read per group and key).

    Masked keys are never read (as FlashAttention): a masked score (-inf:
    window, lengths, mask, or a -inf bias, which masks whatever the dot
    product) is stored as -0.0 in P, an unmasked one that underflows as
    +0.0. Each thread flags a NaN or inf it stages into V; the barrier
    before P @ V is a ``syncthreads_or`` that makes the flag block-uniform,
    and only then does P @ V run a second copy of its loop that skips the
    -0.0 entries instead of forming 0 * NaN (the float64 tensor-core kernel
    sums key by key there). The plain loop carries no such test.

    Rows ``Q_LEN <= i < Q_ROWS`` and rows that see no key get zeros and
    lse = -inf. dv is limited to ``DVC = TX*RC`` per launch; the backend
    splits larger dv into several launches over column slices of V and out
    (each recomputes the scores).

    Two loops over key tiles (as FlashAttention's masked and unmasked
    steps). The *interior* tiles, those that every row of a full block of
    real rows sees entirely (``lo_max <= j0``, ``j0 + BK <= hi_min``; no
    mask, no bias), form one range [ka, ka + n_in) and run first, in the
    fast loop: Q resident and prefetch only (d <= DC), fixed trip counts
    over the zero-padded chunk, no visibility tests, no NaN-safe copy of
    P @ V, both products written out step by step (:func:`_unrolled`: every
    shared offset a compile-time constant), so its body is one key tile's
    work, FMA-dense (``gpu-report``: its ``inner_loop``). Every other tile
    (boundary tiles of windows, causal diagonals, lengths, masks, bias;
    d > DC; no prefetch plan) runs in the general loop after it, leading
    tiles then trailing ones: the online softmax takes the tiles in any
    order. The barrier that publishes a tile in the fast loop is a
    ``syncthreads_or`` of "V holds a NaN or inf"; when set, the block
    leaves the fast loop before touching the tile, and the general loop
    redoes it (its K and V are still in the prefetch registers) and the
    rest. The general loop re-reads the block's constants from ``seq``
    (``block_keys``), so that they are not kept in registers across the
    fast loop (ptxas spilled them at the 128-register cap).

    Shared memory (:func:`attention_layout`): Q, K, P, V (and the two
    reduction buffers of the portable path), each region 16-byte aligned
    (``alignment=16`` on hardware, so the row reads compile to LDS.128).
    Row strides: Q and K ``== 16 bytes (mod 128)``, so the 8 lanes of a
    vector-load phase (consecutive tx, keys tx + TX*b) hit 8 distinct
    16-byte bank groups; P ``== 32 (mod 128)``, so its scalar stores from
    (ty, tx) are conflict-free; the Q/P row reads are broadcasts (one row
    per phase). Staging is row-major (consecutive threads: consecutive
    columns, coalesced global reads, contiguous shared stores). Prefetch:
    when Q is resident (d <= DC) and NT is a multiple of DC and of DVC, the
    next key tile's K and V elements are loaded into registers (BK*DC/NT +
    BK*DVC/NT a thread: 16 for float32) while the current tile is computed
    (the general loop: right after it is stored and synchronised; the fast
    loop: after the Q K^T product, when fewer registers are live), so their
    global latency overlaps the products and the softmax; the next tile
    starts by storing them (one barrier for both tiles). The prefetch loads
    are unconditional: row and column clamped into the tile, the value
    zeroed past it by a select (a guarded load was a branch and ~20
    instructions per element). Otherwise K (per d-chunk) and V are staged at the tile's
    start. (Double-buffered shared tiles would exceed the 48 KiB of static
    shared memory, and numba-cuda 0.30 has no API for the opt-in to more
    dynamic shared memory (cuFuncSetAttribute), so the buffer is the
    registers.)

    Index arithmetic (registers): Numba's signed array indices carry a
    negative-index fix-up, and its integer arithmetic is 64-bit. The kernel
    uses unsigned 32-bit indices everywhere (``U(...)``: truncating the
    result lets LLVM narrow the arithmetic to 32 bits; token counts are
    < 2**31): thread coordinates, global rows and columns, and shared
    offsets, which are a per-thread base computed once plus compile-time
    offsets. Staging loops are runtime loops with per-thread coordinates
    computed once (unrolled, their per-trip addresses were hoisted out of
    the key-tile loop into ~60 registers). The hardware path carries launch
    bounds asking for 512 resident threads per SM (16 warps; at most 128
    registers) where shared memory allows; ``gpu-report`` shows both paths.

The tensor cores (:mod:`numbattn.cuda.tensor`)
    On compute capability 8.0 and up (and on the simulator, which emulates
    them) the backend builds the fused forward on the tensor cores instead,
    float32 (3xTF32) and float64 (DMMA) alike; this kernel runs where they
    are switched off (``CUDA_TENSOR_CORES``) or absent.

Scores (:func:`make_scores`)
    A register-blocked SIMT GEMM with the attention kernel's masking. One
    block of ``(T/R)**2`` threads per (sequence, T x T output tile: rows
    ``i0 + ...``, columns ``c0 + ...``; defaults T = 64, R = 4: 256
    threads); thread (ty, tx) computes the R x R outputs of rows
    ``ty + TX*a`` and columns ``tx + TX*b`` (TX = T/R: a warp's stores of
    one (a, b) are contiguous columns). Sequence (a, h) writes its rows
    ``Q_OFF + i`` (i < Q_ROWS) across all columns (column c is its key
    ``c - K_OFF``); a tile none of whose rows sees any of its keys (lengths,
    window) skips every load and product and writes -inf; one that every
    row sees whole (and no mask) writes without per-element tests.

    Q and K are staged per chunk of DC (16) head dimensions into shared
    memory, row-major, rows an odd multiple of 16 bytes apart (8 lanes of a
    16-byte read phase, 8 consecutive keys, hit 8 distinct bank groups;
    the Q reads are broadcasts); each region 16-byte aligned. The product
    step reads PV dims (16 bytes: 4 floats, 2 doubles) of each of its R
    rows and R keys (LDS.128) and does PV*R*R FMAs; a chunk is DC/PV steps
    in straight-line code (:func:`_unrolled`: NVVM does not fully unroll a
    loop with a body this large), a fixed trip count. Staging: when the
    threads split a chunk evenly into runs of E dims of one row, a thread
    owns one Q row and one K row (a row view: one address, then a dim
    stride per element; 8- or 16-byte shared stores); otherwise element
    ``tid + NT*e`` of the chunk. Rows past the real queries or keys are
    read from the nearest real row, without a branch (they only feed
    outputs written -inf), so a chunk's loads issue together. Whole chunks
    run in a loop that loads the next chunk into registers (E + E a
    thread) while the current one is multiplied (one barrier after the
    store, one after the products); the tail chunk (d % DC dims) follows,
    reading dim d - 1 for its padding and staging zeros there (both
    operands: 0 * inf would be NaN). Indices are unsigned 32-bit (no
    negative-index fix-ups) and shared offsets are per-thread bases plus
    compile-time constants. The hardware path adds launch bounds asking for
    16 warps per SM (at most 128 registers) and aligned shared memory; the
    simulator runs the same code without them.

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
import textwrap

import numpy as np
from numba import cuda, float32, float64, int32, int64, uint32

from . import limits
from .blocks import block_keys as _block_keys  # also imported from here by other kernels
from .blocks import block_ranges
from .inline import _device, _on_simulator

U = uint32


def _types(dtype):
    dtype = np.dtype(dtype)
    return (float32 if dtype == np.float32 else float64), dtype.type


def _stride(n, itemsize, rem):
    """Smallest row stride >= n elements whose byte size is a multiple of 16
    and is ``rem`` modulo 128 (the bank pattern of the row-wise reads)."""
    s = n
    while (s * itemsize) % 16 or (s * itemsize) % 128 != rem:
        s += 1
    return s


def _vec(n):
    """Widest vector (4, 2 or 1 elements) that divides n."""
    return 4 if n % 4 == 0 else (2 if n % 2 == 0 else 1)


def attention_layout(dtype, TY, TX, RQ, RK, DC, RC, hw):
    """Shared-memory layout of :func:`make_attention`: element offsets and strides."""
    isz = np.dtype(dtype).itemsize
    al = 16 // isz  # elements per 16 bytes: every region starts 16-byte aligned
    BQ, BK, DVC = TY * RQ, TX * RK, TX * RC
    lay = dict(QS=_stride(DC, isz, 16), PS=_stride(BK, isz, 32), VS=-(-DVC // al) * al)
    lay["KS"] = lay["QS"]
    off = 0
    for name, size in (
        ("Q", BQ * lay["QS"]),
        ("K", BK * lay["KS"]),
        ("P", BQ * lay["PS"]),
        ("V", BK * lay["VS"]),
        ("R1", 0 if shuffles_ok(TY, TX, hw) else BQ * TX),
        ("R2", 0 if shuffles_ok(TY, TX, hw) else BQ * TX),
    ):
        lay["OFF_" + name] = off
        off += -(-size // al) * al
    lay["TOTAL"] = max(off, 1)
    return lay


def shuffles_ok(TY, TX, hw):
    """Row reductions by warp shuffles: on hardware, when a row's TX threads
    are lanes of one warp (TX a power of two <= 32) and every warp is full
    or the block is one partial warp (the shuffle mask names its lanes)."""
    nt = TY * TX
    return bool(hw) and TX <= 32 and 32 % TX == 0 and (nt % 32 == 0 or nt < 32)


def _unrolled(name, n, params, body, env):
    """Device function ``name(params)`` that runs ``body`` (Python source of
    one step, ``{i}`` its index) for i = 0 .. n-1, written out.

    NVVM does not unroll loops of this size and numba-cuda has no unroll
    pragma, so the fast loop of :func:`make_attention` and the d-chunk loop
    of :func:`make_scores` get their fixed-trip products (every shared
    offset a compile-time constant, no loop counters) as straight-line
    source; the small loops inside a step are
    unrolled by NVVM. ``env``: the constants the body uses. Inlined into
    the kernel (``forceinline``; the simulator runs it as it is)."""
    step = textwrap.dedent(body).strip("\n")
    lines = [f"def {name}({params}):"]
    for i in range(n):
        lines += ["    " + line for line in step.replace("{i}", str(i)).splitlines()]
    ns = dict(env)
    exec(compile("\n".join(lines), f"<numbattn {name} x{n}>", "exec"), ns)
    return _device(ns[name])


_SHIFT: dict = {}


def _softmax_shift(dtype):
    """Device function ``shift(m_old, m_new) -> (ms, alpha)``, the online
    softmax's rescale step, shared by the fused kernels and the streaming
    decode kernel: ``m_new`` is the row's new running maximum (``m_old``
    included, NaN-propagating), ``ms`` the shift the exponentials use (0
    while the row has seen only masked keys, so ``exp(-inf - ms)`` is 0,
    never NaN) and ``alpha = exp(m_old - ms)`` the factor that rescales the
    row's sum and accumulators."""
    key = np.dtype(dtype)
    if key not in _SHIFT:
        sc_t = key.type
        NINF = sc_t(-np.inf)
        ZERO = sc_t(0.0)

        def shift(m_old, m_new):
            ms = m_new
            if m_new == NINF:
                ms = ZERO
            return ms, math.exp(m_old - ms)

        _SHIFT[key] = _device(shift)
    return _SHIFT[key]


_NANMAX: list = []


def _nanmax():
    """Device function ``nanmax(a, b)``: ``b`` if ``b > a`` or ``b`` is NaN,
    else ``a``: the running maximum every softmax in these kernels keeps
    (a NaN score makes the row's maximum NaN, so the row comes out NaN as
    in the reference). One function for the ~15 places that take such a
    maximum (shuffles, shared-memory reductions, merges), so that they
    cannot drift apart; inlined, it compiles to what the inline tests
    did. Any float type (one specialisation per argument types)."""
    if not _NANMAX:

        def nanmax(a, b):
            if b > a or b != b:
                return b
            return a

        _NANMAX.append(_device(nanmax))
    return _NANMAX[0]


def _stage_plan(COLS, NT):
    """(fast, rows per trip) of a staging loop over a tile with COLS columns
    and NT threads: when COLS divides NT (fast), each thread keeps one
    column and steps through rows NT // COLS apart, so its coordinates are
    computed once; otherwise the element index ``tid + NT*it`` is split per
    trip. Either way consecutive threads read consecutive columns, and the
    loops run (not unrolled: unrolled, the per-trip addresses were hoisted
    out of the key-tile loop into ~60 registers)."""
    if NT % COLS == 0:
        return True, NT // COLS
    return False, 0


def _qk_step(NR, NK, PV, RSTEP, KSTEP):
    """Device function ``step(sh, acc, qf, kf, pq, pk)``: acc[a, b] += the
    dot product over PV consecutive head dimensions of the shared rows at
    ``pq + RSTEP*a`` (a < NR) and ``pk + KSTEP*b`` (b < NK): one vector read
    (16 bytes) per row and key, then PV*NR*NK FMAs. The step of the fused
    kernel's Q K^T and of the scores kernel."""

    def step(sh, acc, qf, kf, pq, pk):
        for a in range(NR):
            for e in range(PV):
                qf[a, e] = sh[pq + U(a * RSTEP + e)]
        for b in range(NK):
            for e in range(PV):
                kf[b, e] = sh[pk + U(b * KSTEP + e)]
        for e in range(PV):
            for a in range(NR):
                for b in range(NK):
                    acc[a, b] += qf[a, e] * kf[b, e]

    return _device(step)


def make_attention(dtype, TY, TX, RQ, RK, DC, RC, hw=False):
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

    ``hw``: build the hardware path (warp-shuffle row reductions, aligned
    shared memory, launch bounds); False gives the portable path the
    simulator runs (shared-memory reductions). Same results.
    """
    nt, sc_t = _types(dtype)
    NT = TY * TX
    BQ = TY * RQ
    BK = TX * RK
    DVC = TX * RC
    lay = attention_layout(dtype, TY, TX, RQ, RK, DC, RC, hw)
    SHFL = shuffles_ok(TY, TX, hw)
    MASK = 0xFFFFFFFF if NT >= 32 else (1 << NT) - 1
    PV = _vec(DC)  # head dims per vector read of Q and K
    JV = _vec(BK)  # keys per vector read of P
    CV = _vec(RC)  # contiguous value columns per thread and group
    NG = RC // CV
    QS, KS, PS, VS = (U(lay[x]) for x in ("QS", "KS", "PS", "VS"))
    OFF_K, OFF_P, OFF_V = (U(lay[x]) for x in ("OFF_K", "OFF_P", "OFF_V"))
    OFF_R1, OFF_R2, TOTAL = lay["OFF_R1"], lay["OFF_R2"], lay["TOTAL"]
    QSI, KSI, PSI, VSI = lay["QS"], lay["KS"], lay["PS"], lay["VS"]
    ALIGN = 16 if hw else None  # the simulator takes no alignment
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    NZERO = sc_t(-0.0)  # P of a masked key
    ONE = sc_t(1.0)
    I31 = (1 << 31) - 1
    M32 = (1 << 32) - 1
    FQ, RQP = _stage_plan(DC, NT)
    FK, RKP = _stage_plan(DC, NT)
    FV, RVP = _stage_plan(DVC, NT)
    # Prefetch: with Q resident and both fast staging plans, the next K/V
    # tile is loaded into registers (TKT + TVT a thread) while this one is
    # computed, and stored to shared memory at the next tile's start.
    PF = FK and FV and BK % max(RKP, 1) == 0 and BK % max(RVP, 1) == 0
    TKT = BK // RKP if PF else 1
    TVT = BK // RVP if PF else 1
    uTX = U(TX)

    def pv_step(sh, acc, pf, vf, pp, pv):
        """O += P V over JV keys: one P read per row, one V read per key and
        column group."""
        for a in range(RQ):
            for e in range(JV):
                pf[a, e] = sh[pp + U(a * TY * PSI + e)]
        for e in range(JV):
            for g in range(NG):
                for w in range(CV):
                    vf[g * CV + w] = sh[pv + U(e * VSI + g * CV * TX + w)]
            for a in range(RQ):
                for c in range(RC):
                    acc[a, c] += pf[a, e] * vf[c]

    qk_step = _qk_step(RQ, RK, PV, TY * QSI, TX * KSI)
    pv_step = _device(pv_step)
    # The fast loop's products, written out step by step (see _unrolled).
    qk_chunk = _unrolled(
        "qk_chunk",
        DC // PV,
        "sh, s, qf, kf, qb, kb",
        "qk_step(sh, s, qf, kf, qb + U({i} * PV), kb + U({i} * PV))",
        dict(qk_step=qk_step, U=U, PV=PV),
    )
    pv_tile = _unrolled(
        "pv_tile",
        BK // JV,
        "sh, acc, pf, vf, pb, vb",
        "pv_step(sh, acc, pf, vf, pb + U({i} * JV), vb + U({i} * JV) * VS)",
        dict(pv_step=pv_step, U=U, JV=JV, VS=VS),
    )
    # Registers: the hardware path asks ptxas for enough resident blocks to
    # fill 16 warps per SM (at most 65536 / (512) = 128 registers a thread),
    # when shared memory allows that many blocks.
    opts = {}
    # Whole warps only (the test geometries have tiny blocks); the simulator
    # takes no launch bounds (it builds, never runs, the hardware path).
    if hw and NT % 32 == 0 and not _on_simulator():
        want = max(1, -(-512 // NT))
        smem = lay["TOTAL"] * np.dtype(dtype).itemsize
        opts["launch_bounds"] = (NT, limits.launch_blocks(want, smem))

    sequence = block_ranges().sequence
    block_keys = _block_keys(BQ, BK)
    shift = _softmax_shift(dtype)
    nanmax = _nanmax()

    # The online-softmax step, shared by the fast and the general loop.
    def row_max(sh, alpha, a, r, mx, tx):
        """The tile's maximum of row ty + TY*a from each thread's partial mx:
        a shuffle butterfly into alpha[a] (hardware), else a shared slot."""
        if SHFL:
            o = TX // 2
            while o > 0:
                t = cuda.shfl_xor_sync(MASK, mx, o)
                mx = nanmax(mx, t)
                o //= 2
            alpha[a] = mx
        else:
            sh[OFF_R1 + r * TX + tx] = mx

    def exponentials(sh, s, mrow, lrow, alpha, ty, tx, utx, pbase):
        """New row maxima, rescale factors alpha, P = exp(S - m) into shared
        memory (-0.0 where masked) and the row sums (into lrow on hardware,
        into a shared slot for the caller's barrier otherwise)."""
        if not SHFL:
            cuda.syncthreads()
        for a in range(RQ):
            r = ty + TY * a
            mt = mrow[a]
            if SHFL:
                t = alpha[a]
                mt = nanmax(mt, t)
            else:
                for x in range(TX):
                    t = sh[OFF_R1 + r * TX + x]
                    mt = nanmax(mt, t)
            ms, al = shift(mrow[a], mt)
            alpha[a] = al
            mrow[a] = mt
            ps = ZERO
            for b in range(RK):
                t = s[a, b]
                e = NZERO if t == NINF else math.exp(t - ms)  # -0.0: masked
                sh[pbase + U(a * TY * PSI + b * TX) + utx] = e
                ps += e
            if SHFL:
                o = TX // 2
                while o > 0:
                    ps += cuda.shfl_xor_sync(MASK, ps, o)
                    o //= 2
                lrow[a] = lrow[a] * alpha[a] + ps
            else:
                sh[OFF_R2 + r * TX + tx] = ps

    def rescale(sh, acc, lrow, alpha, ty, tx):
        """After the barrier: the row sums (portable path) and the output
        accumulators rescaled by alpha."""
        for a in range(RQ):
            if not SHFL:
                r = ty + TY * a
                tot = ZERO
                for x in range(TX):
                    tot += sh[OFF_R2 + r * TX + x]
                lrow[a] = lrow[a] * alpha[a] + tot
            for c in range(RC):
                acc[a, c] *= alpha[a]

    row_max, exponentials, rescale = _device(row_max), _device(exponentials), _device(rescale)

    @cuda.jit(**opts)
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
        sh = cuda.shared.array(TOTAL, nt, alignment=ALIGN)
        acc = cuda.local.array((RQ, RC), nt)
        s = cuda.local.array((RQ, RK), nt)
        mrow = cuda.local.array(RQ, nt)
        lrow = cuda.local.array(RQ, nt)
        alpha = cuda.local.array(RQ, nt)
        qf = cuda.local.array((RQ, PV), nt)
        kf = cuda.local.array((RK, PV), nt)
        pf = cuda.local.array((RQ, JV), nt)
        vf = cuda.local.array(RC, nt)
        kreg = cuda.local.array(TKT, nt)
        vreg = cuda.local.array(TVT, nt)

        g2n = q.shape[1]
        d = q.shape[3]
        dv = v.shape[3]
        bid = cuda.blockIdx.x
        qt = n_qt - 1 - bid % n_qt
        rest = bid // n_qt
        b2 = uint32(rest % g2n)
        b1 = uint32(rest // g2n)
        i0 = qt * BQ
        _, _, q_rows, _, _, _ = sequence(seq, b1, b2)
        if i0 >= q_rows:
            return  # whole block: past this sequence's rows
        q_off, q_len, k_off, k_len, lo_base, hi_base, lo, hi, lo_max, hi_min, n_kt = block_keys(
            seq, b1, b2, i0, wl, wr, has_mask
        )
        hk = uint32(b2 // (g2n // k.shape[1]))  # grouped-query attention
        utid = U(cuda.threadIdx.x)
        utx = utid % uTX
        uty = utid // uTX
        tx = int64(utx)
        ty = int64(uty)
        q_resident = d <= DC
        # Unsigned 32-bit shared-memory bases, computed once: the loops add
        # compile-time offsets to them.
        qbase = uty * QS
        kbase = OFF_K + utx * KS
        pbase = OFF_P + uty * PS
        vbase = OFF_V + utx * U(CV)
        # Staging coordinates (the fast plans): one column, a first row.
        sq_r, sq_p = U(utid // U(max(DC, 1))), U(utid % U(DC))
        sk_r, sk_p = sq_r, sq_p
        sv_r, sv_p = U(utid // U(DVC)), U(utid % U(DVC))

        for a in range(RQ):
            mrow[a] = NINF
            lrow[a] = ZERO
            for c in range(RC):
                acc[a, c] = ZERO

        # Staging loops: element idx = tid + NT*it of a row-major tile
        # (consecutive threads: consecutive columns, coalesced reads).
        if q_resident and n_kt > 0:
            if FQ:  # one column per thread, rows r0, r0 + RQP, ...
                r = sq_r
                p = sq_p
                while r < U(BQ):
                    val = ZERO
                    if r < q_len - i0 and p < d:
                        val = q[b1, b2, U(q_off + i0 + r), p]
                    sh[U(r * QS + p)] = val
                    r = U(r + U(RQP))
            else:
                idx = utid
                while idx < U(BQ * DC):
                    r = U(idx // U(DC))
                    p = U(idx % U(DC))
                    val = ZERO
                    if r < q_len - i0 and p < d:
                        val = q[b1, b2, U(q_off + i0 + r), p]
                    sh[U(r * QS + p)] = val
                    idx = U(idx + U(NT))

        # Prefetched loads are unconditional (rows and columns clamped into
        # the tile, then zeroed past it: a select, not a branch), so they
        # need d, dv >= 1.
        pref = PF and q_resident and d > 0 and dv > 0
        kc, kc_ok = U(min(sk_p, max(d - 1, 0))), sk_p < d
        vc, vc_ok = U(min(sv_p, max(dv - 1, 0))), sv_p < dv
        # Interior key tiles [ka, ka + n_in): every row of the block sees
        # all of their keys (j0 >= lo_max, j0 + BK <= hi_min; none without
        # a full block of real rows or with a mask) and there is no bias.
        # They run first, in the fast loop; the others (boundary tiles,
        # bias, d > DC, no prefetch) in the general loop after it, leading
        # tiles then trailing ones (the online softmax takes any order).
        ka = 0
        n_in = 0
        if pref and not has_bias and n_kt > 0:
            ka = min(n_kt, max(0, (lo_max - lo + BK - 1) // BK))
            n_in = max(0, min(n_kt, max(0, hi_min - lo) // BK) - ka)
        if pref and n_kt > 0:
            j0n = lo + (ka if n_in > 0 else 0) * BK
            nkn = U(hi - j0n - 1)  # the next tile's last row
            for i in range(TKT):
                rr = U(sk_r + U(RKP * i))
                val = k[b1, hk, U(k_off + j0n + min(rr, nkn)), kc]
                kreg[i] = val if rr <= nkn and kc_ok else ZERO
            for i in range(TVT):
                rr = U(sv_r + U(RVP * i))
                val = v[b1, hk, U(k_off + j0n + min(rr, nkn)), vc]
                vreg[i] = val if rr <= nkn and vc_ok else ZERO

        # 32-bit copies for the loops and the epilogue (token counts < 2**31):
        # fewer registers live across the fast loop.
        ulo, uhi, ukoff = U(lo), U(hi), U(k_off)
        una, unin, unkt = U(ka), U(n_in), U(n_kt)
        ui0, uqrows, uqoff = U(i0), U(q_rows), U(q_off)

        # The fast loop: interior tiles, prefetched (Q resident, d <= DC),
        # fixed trip counts (the zero-padded chunk), no visibility tests,
        # no bias, no NaN-safe P @ V. A non-finite value staged into V
        # (block-uniform, from the barrier that publishes the tile) leaves
        # it for the general loop, which redoes this tile (its K and V are
        # still in the registers) and the rest.
        kv = U(0)  # tiles visited
        while kv < unin:
            bad = int32(0)
            for i in range(TKT):
                sh[U(OFF_K + U(sk_r + U(RKP * i)) * KS + sk_p)] = kreg[i]
            for i in range(TVT):
                val = vreg[i]
                if not math.isfinite(val):
                    bad = int32(1)
                sh[U(OFF_V + U(sv_r + U(RVP * i)) * VS + sv_p)] = val
            if cuda.syncthreads_or(bad):
                break
            # S = Q K^T over the whole zero-padded chunk.
            for a in range(RQ):
                for b in range(RK):
                    s[a, b] = ZERO
            qk_chunk(sh, s, qf, kf, qbase, kbase)
            # Prefetch the next tile (after the product: fewer live registers).
            tn = U(kv + U(1))
            if tn < unkt:
                ktn = U(una + tn) if tn < unin else (U(tn - unin) if tn < U(unin + una) else tn)
                j0n = U(ulo + ktn * U(BK))
                nkn = U(uhi - j0n - U(1))  # the next tile's last row
                for i in range(TKT):
                    rr = U(sk_r + U(RKP * i))
                    val = k[b1, hk, U(ukoff + j0n + min(rr, nkn)), kc]
                    kreg[i] = val if rr <= nkn and kc_ok else ZERO
                for i in range(TVT):
                    rr = U(sv_r + U(RVP * i))
                    val = v[b1, hk, U(ukoff + j0n + min(rr, nkn)), vc]
                    vreg[i] = val if rr <= nkn and vc_ok else ZERO
            # Scale and partial row maxima (every key visible).
            for a in range(RQ):
                r = ty + TY * a
                mx = NINF
                for b in range(RK):
                    x = s[a, b] * scale
                    s[a, b] = x
                    mx = nanmax(mx, x)
                row_max(sh, alpha, a, r, mx, tx)
            # Row maxima, rescale factors, P = exp(S - m), as in the general loop.
            exponentials(sh, s, mrow, lrow, alpha, ty, tx, utx, pbase)
            cuda.syncthreads()
            rescale(sh, acc, lrow, alpha, ty, tx)
            pv_tile(sh, acc, pf, vf, pbase, vbase)  # O += P V (V finite here)
            cuda.syncthreads()
            kv = U(kv + U(1))

        # The general loop: the remaining tiles, any option, any d. Its block
        # constants are read again (not kept in registers across the fast loop).
        q_off, q_len, k_off, k_len, lo_base, hi_base, lo, hi, lo_max, hi_min, n_kt = block_keys(
            seq, b1, b2, i0, wl, wr, has_mask
        )
        while kv < unkt:
            kt = U(una + kv) if kv < unin else (U(kv - unin) if kv < U(unin + una) else kv)
            j0 = lo + int64(kt) * BK
            for a in range(RQ):
                for b in range(RK):
                    s[a, b] = ZERO
            # V tile (BK x DVC), zero-padded past hi; bad: a NaN or inf staged
            # (an int: syncthreads_or takes no bool on hardware).
            nk = hi - j0
            bad = int32(0)
            if pref:  # the prefetched K and V tiles, then the next ones
                for i in range(TKT):
                    sh[U(OFF_K + U(sk_r + U(RKP * i)) * KS + sk_p)] = kreg[i]
                for i in range(TVT):
                    val = vreg[i]
                    if not math.isfinite(val):
                        bad = int32(1)
                    sh[U(OFF_V + U(sv_r + U(RVP * i)) * VS + sv_p)] = val
                cuda.syncthreads()
                tn = U(kv + U(1))
                if tn < unkt:
                    ktn = U(una + tn) if tn < unin else (U(tn - unin) if tn < U(unin + una) else tn)
                    j0n = lo + int64(ktn) * BK
                    nkn = U(hi - j0n - 1)  # the next tile's last row
                    for i in range(TKT):
                        rr = U(sk_r + U(RKP * i))
                        val = k[b1, hk, U(k_off + j0n + min(rr, nkn)), kc]
                        kreg[i] = val if rr <= nkn and kc_ok else ZERO
                    for i in range(TVT):
                        rr = U(sv_r + U(RVP * i))
                        val = v[b1, hk, U(k_off + j0n + min(rr, nkn)), vc]
                        vreg[i] = val if rr <= nkn and vc_ok else ZERO
            elif FV:  # one column per thread, rows r0, r0 + RVP, ...
                r = sv_r
                p = sv_p
                while r < U(BK):
                    val = ZERO
                    if r < nk and p < dv:
                        val = v[b1, hk, U(k_off + j0 + r), p]
                        if not math.isfinite(val):
                            bad = int32(1)
                    sh[U(OFF_V + r * VS + p)] = val
                    r = U(r + U(RVP))
            else:
                idx = utid
                while idx < U(BK * DVC):
                    r = U(idx // U(DVC))
                    p = U(idx % U(DVC))
                    val = ZERO
                    if r < nk and p < dv:
                        val = v[b1, hk, U(k_off + j0 + r), p]
                        if not math.isfinite(val):
                            bad = int32(1)
                    sh[U(OFF_V + r * VS + p)] = val
                    idx = U(idx + U(NT))
            # S = Q K^T, d in chunks of DC (zero-padded to the chunk).
            for p0 in range(0, d, DC):
                if p0 > 0:
                    cuda.syncthreads()
                dp = d - p0
                if not q_resident:
                    if FQ:  # one column per thread, rows r0, r0 + RQP, ...
                        r = sq_r
                        p = sq_p
                        while r < U(BQ):
                            val = ZERO
                            if r < q_len - i0 and p < dp:
                                val = q[b1, b2, U(q_off + i0 + r), U(p0 + p)]
                            sh[U(r * QS + p)] = val
                            r = U(r + U(RQP))
                    else:
                        idx = utid
                        while idx < U(BQ * DC):
                            r = U(idx // U(DC))
                            p = U(idx % U(DC))
                            val = ZERO
                            if r < q_len - i0 and p < dp:
                                val = q[b1, b2, U(q_off + i0 + r), U(p0 + p)]
                            sh[U(r * QS + p)] = val
                            idx = U(idx + U(NT))
                if pref:
                    pass  # K staged (and synchronised) with V above
                elif FK:  # one column per thread, rows r0, r0 + RKP, ...
                    r = sk_r
                    p = sk_p
                    while r < U(BK):
                        val = ZERO
                        if r < nk and p < dp:
                            val = k[b1, hk, U(k_off + j0 + r), U(p0 + p)]
                        sh[U(OFF_K + r * KS + p)] = val
                        r = U(r + U(RKP))
                else:
                    idx = utid
                    while idx < U(BK * DC):
                        r = U(idx // U(DC))
                        p = U(idx % U(DC))
                        val = ZERO
                        if r < nk and p < dp:
                            val = k[b1, hk, U(k_off + j0 + r), U(p0 + p)]
                        sh[U(OFF_K + r * KS + p)] = val
                        idx = U(idx + U(NT))
                if not pref:
                    cuda.syncthreads()
                # Rows ty + TY*a and keys tx + TX*b, PV consecutive head
                # dimensions per (vector) read.
                npv = U((min(DC, d - p0) + PV - 1) // PV)
                for pi in range(npv):
                    qk_step(sh, s, qf, kf, qbase + pi * U(PV), kbase + pi * U(PV))
            # Scale, visibility / mask / bias, partial row maxima.
            check = j0 < lo_max or j0 + BK > hi_min
            # Key jj is visible to row i iff lo_base <= jj - i < hi_base,
            # jj < k_len and i < q_len; jj - i = diag + (TX*b - TY*a) with
            # one per-tile value and compile-time offsets. In 32 bits: the
            # window sides clamped to +-(2**31 - 1) (token counts < 2**31,
            # so |jj - i| is smaller), the window test is one unsigned
            # compare of (jj - i - lo) mod 2**32 against its width, and the
            # key and row counts are clamped to the tile.
            diag = j0 - i0 + tx - ty
            dl = diag - max(lo_base, -I31)
            wid = U(max(min(hi_base, I31) - max(lo_base, -I31), 0))
            kcnt = U(min(max(k_len - j0 - tx, 0), BK))  # visible keys: TX*b < kcnt
            rcnt = U(min(max(q_len - i0 - ty, 0), BQ))  # real rows: TY*a < rcnt
            mcol = k_off + j0 + tx  # mask / bias column of key b: mcol + TX*b
            for a in range(RQ):
                r = ty + TY * a
                mrow_ = U(q_off + i0 + r)
                mx = NINF
                for b in range(RK):
                    t = s[a, b] * scale
                    if check or has_bias:
                        vis = True
                        if check:
                            vis = (
                                U((dl + (TX * b - TY * a)) & M32) < wid
                                and U(TX * b) < kcnt
                                and U(TY * a) < rcnt
                            )
                            if vis and has_mask:
                                vis = mask[b1, b2, mrow_, U(mcol + TX * b)]
                        if not vis:
                            t = NINF
                        elif has_bias:
                            bv = bias[b1, b2, mrow_, U(mcol + TX * b)]
                            t = NINF if bv == NINF else t + bv  # -inf bias masks
                    s[a, b] = t
                    mx = nanmax(mx, t)
                row_max(sh, alpha, a, r, mx, tx)
            # Row maxima, rescale factors, P = exp(S - m) into shared memory.
            exponentials(sh, s, mrow, lrow, alpha, ty, tx, utx, pbase)
            vbad = cuda.syncthreads_or(bad)  # block-uniform: a non-finite V
            rescale(sh, acc, lrow, alpha, ty, tx)
            # O += P V: rows ty + TY*a, columns CV*tx + CV*TX*g + (0..CV-1);
            # JV keys per (vector) read of P, CV columns per read of V.
            # Masked keys are never read: when the tile holds a NaN or inf,
            # a second copy of the loop skips P = -0.0 (0 * NaN would poison
            # the row); the plain loop stays free of that test.
            if vbad:
                for ji in range(BK // JV):
                    pp_ = pbase + U(ji * JV)
                    pv_ = vbase + U(ji * JV) * VS
                    for a in range(RQ):
                        for e in range(JV):
                            pf[a, e] = sh[pp_ + U(a * TY * PSI + e)]
                    for e in range(JV):  # one key's V row at a time
                        for g in range(NG):
                            for w in range(CV):
                                vf[g * CV + w] = sh[pv_ + U(e * VSI + g * CV * TX + w)]
                        for a in range(RQ):
                            pa = pf[a, e]
                            if pa != ZERO or math.copysign(ONE, pa) > ZERO:
                                for c in range(RC):
                                    acc[a, c] += pa * vf[c]
            else:
                for ji in range(BK // JV):
                    pv_step(sh, acc, pf, vf, pbase + U(ji * JV), vbase + U(ji * JV) * VS)
            cuda.syncthreads()
            kv = U(kv + U(1))

        for a in range(RQ):
            i = U(ui0 + uty + U(TY * a))
            if i < uqrows:
                row = U(uqoff + i)
                m = mrow[a]
                if m == NINF:
                    for c in range(RC):
                        col = utx * U(CV) + U((c // CV) * CV * TX + c % CV)
                        if col < dv:
                            out[b1, b2, row, col] = ZERO
                    if write_lse and tx == 0:
                        lse[b1, b2, row] = NINF
                else:
                    inv = ONE / lrow[a]
                    for c in range(RC):
                        col = utx * U(CV) + U((c // CV) * CV * TX + c % CV)
                        if col < dv:
                            out[b1, b2, row, col] = acc[a, c] * inv
                    if write_lse and tx == 0:
                        lse[b1, b2, row] = m + math.log(lrow[a])

    attention_kernel.geometry = dict(
        threads=NT,
        query_tile=BQ,
        key_tile=BK,
        head_chunk=DC,
        value_chunk=DVC,
        shared_bytes=TOTAL * np.dtype(dtype).itemsize,
        path="hardware" if hw else "simulator",
    )
    return attention_kernel


def attention_shared_bytes(dtype, TY, TX, RQ, RK, DC, RC, hw=False):
    lay = attention_layout(dtype, TY, TX, RQ, RK, DC, RC, hw)
    return lay["TOTAL"] * np.dtype(dtype).itemsize


def scores_layout(dtype, T, DC):
    """Shared-memory layout of :func:`make_scores`: Q and K tiles (T rows of
    a DC-wide d-chunk each, row-major), element strides and offsets."""
    isz = np.dtype(dtype).itemsize
    # Row stride: an odd multiple of 16 bytes, so the 8 lanes of a 16-byte
    # read phase (8 consecutive keys, or rows) hit 8 distinct bank groups.
    st = DC
    while (st * isz) % 16 or (st * isz // 16) % 2 == 0:
        st += 1
    return dict(S=st, OFF_K=T * st, TOTAL=2 * T * st)


def make_scores(dtype, T, R, DC, hw=True):
    """Scores kernel for T x T output tiles, R x R outputs per thread, d in
    chunks of DC (see the module docstring).

    Signature: ``kernel(q, k, out, seq, bias, mask, scale, n_it, window_left,
    window_right, has_bias, has_mask)`` with the arrays of
    :func:`make_attention` and out (G1, Hq, Tq, Tk). Sequence (a, h) writes
    rows ``Q_OFF + i`` (i < Q_ROWS) of out, every column c (Tk of them), the
    column's local key being ``c - K_OFF``. Launch: grid =
    G1*Hq*n_it*ceil(Tk/T) with n_it = ceil(max_rows/T), block = (T/R)**2.

    ``hw``: aligned shared memory and launch bounds (the simulator takes
    neither); the same code otherwise.
    """
    nt, sc_t = _types(dtype)
    TX = T // R  # threads per row of the block (and rows of threads)
    NT = TX * TX
    lay = scores_layout(dtype, T, DC)
    S, OFF_K, TOTAL = U(lay["S"]), U(lay["OFF_K"]), lay["TOTAL"]
    SI = lay["S"]
    PV = max(1, 16 // np.dtype(dtype).itemsize)  # elements per 16-byte shared read
    PV = PV if DC % PV == 0 else _vec(DC)
    NPV = DC // PV  # fixed trip count per chunk (the chunk is zero-padded)
    # Staging plan of a T x DC chunk of Q (and of K): when the NT threads
    # split it evenly into runs of E consecutive dims of one row (CONTIG),
    # thread tid owns row tid // (DC/E) and dims E*(tid % (DC/E)) + e (one
    # row address, a 16-byte shared store per 4 floats); otherwise element
    # tid + NT*e of the row-major chunk (GUARD: past the tile on the last).
    E = (T * DC) // NT
    CONTIG = E >= 1 and E * NT == T * DC and DC % E == 0
    if not CONTIG:
        E = -(-(T * DC) // NT)
    GUARD = not CONTIG and E * NT != T * DC
    RUNS = DC // E if CONTIG else 1  # threads per row (CONTIG)
    ALIGN = 16 if hw and not _on_simulator() else None
    NINF = sc_t(-np.inf)
    ZERO = sc_t(0.0)
    uTX = U(TX)
    opts = {}
    if ALIGN and NT % 32 == 0:
        # Resident blocks for 16 warps per SM (at most 128 registers), shared
        # memory allowing.
        smem = TOTAL * np.dtype(dtype).itemsize
        opts["launch_bounds"] = (NT, limits.launch_blocks(-(-512 // NT), smem))

    step = _qk_step(R, R, PV, TX * SI, TX * SI)
    rng = block_ranges()
    sequence, window = rng.sequence, rng.window
    keys_seen, keys_seen_by_all = rng.keys_seen, rng.keys_seen_by_all

    chunk = _unrolled(
        "chunk",
        NPV,
        "sh, qb, kb, acc, qf, kf",
        "step(sh, acc, qf, kf, qb + U({i} * PV), kb + U({i} * PV))",
        dict(step=step, U=U, PV=PV),
    )

    @cuda.jit(device=True, inline="always")
    def where(utid, e):
        """(row, dim) of the thread's staged element e in the chunk."""
        if CONTIG:
            return U(utid // U(RUNS)), U((utid % U(RUNS)) * U(E) + U(e))
        x = U(utid + U(NT * e))
        return U(x // U(DC)), U(x % U(DC))

    @cuda.jit(device=True, inline="always")
    def load(q, k, qv, kv, b1, b2, hk, qr, kr, utid, p0, d, tail, pq, pk):
        # The thread's elements of the chunk at dims p0...: rows clamped to
        # real ones (qr, kr; CONTIG: the row views qv, kv); in the tail
        # chunk, dims past d read dim d - 1 and stage zeros, so the padded
        # products add nothing.
        for e in range(E):
            pd = U(p0 + where(utid, e)[1])
            pc = min(pd, U(d - 1)) if tail else pd
            if CONTIG:
                vq = qv[pc]
                vk = kv[pc]
            else:
                vq = q[b1, b2, qr[e], pc]
                vk = k[b1, hk, kr[e], pc]
            if tail and pd >= d:
                vq = ZERO
                vk = ZERO
            pq[e] = vq
            pk[e] = vk

    @cuda.jit(device=True, inline="always")
    def store(sh, utid, pq, pk):
        for e in range(E):
            r, p = where(utid, e)
            if not GUARD or r < U(T):
                sh[r * S + p] = pq[e]
                sh[OFF_K + r * S + p] = pk[e]

    @cuda.jit(**opts)
    def scores_kernel(q, k, out, seq, bias, mask, scale, n_it, wl, wr, has_bias, has_mask):
        sh = cuda.shared.array(TOTAL, nt, alignment=ALIGN)
        acc = cuda.local.array((R, R), nt)
        qf = cuda.local.array((R, PV), nt)
        kf = cuda.local.array((R, PV), nt)
        pq = cuda.local.array(E, nt)  # the next chunk's elements (prefetch)
        pk = cuda.local.array(E, nt)
        qr = cuda.local.array(E, uint32)  # their global rows
        kr = cuda.local.array(E, uint32)
        g2n = q.shape[1]
        d = q.shape[3]
        ncol = out.shape[3]
        n_jt = (ncol + T - 1) // T
        bid = cuda.blockIdx.x
        jt = bid % n_jt
        rest = bid // n_jt
        it = rest % n_it
        rest = rest // n_it
        b2 = U(rest % g2n)
        b1 = U(rest // g2n)
        i0 = it * T
        _, _, q_rows, _, _, _ = sequence(seq, b1, b2)
        if i0 >= q_rows:
            return  # whole block: past this sequence's rows
        q_off, q_len, _, k_off, k_len, offset = sequence(seq, b1, b2)
        hk = U(b2 // (g2n // k.shape[1]))  # grouped-query attention
        utid = U(cuda.threadIdx.x)
        utx = utid % uTX
        uty = utid // uTX
        c0 = jt * T  # the tile's first column (global key row c0 + r)
        j0 = c0 - k_off  # its local key
        # Keys any row of the tile sees: [lo, hi) within [0, k_len); skip
        # the products (and every load) if the tile's keys [j0, j0 + T) miss it.
        lo_base, hi_base = window(offset, wl, wr)
        lo, hi = keys_seen(i0, i0 + T, q_len, k_len, lo_base, hi_base)
        skip = j0 + T <= lo or j0 >= hi or hi <= lo
        for a in range(R):
            for b in range(R):
                acc[a, b] = ZERO
        if not skip:
            # Tile rows that are real queries [0, nq) and keys [klo, khi)
            # (both non-empty here). A staged row outside them is read from
            # the nearest real row, without a branch: it only feeds outputs
            # that are written -inf.
            nq = U(min(q_len - i0, T))
            klo = U(max(-j0, 0))
            khi = U(min(k_len - j0, T))
            for e in range(E):
                r = where(utid, e)[0]
                qr[e] = U(q_off + i0 + min(r, U(nq - U(1))))
                kr[e] = U(c0 + min(max(r, klo), U(khi - U(1))))
            qv = q[b1, b2, qr[0]]  # CONTIG: the thread's one row of each
            kv = k[b1, hk, kr[0]]
            du = U(d)
            qbase = uty * S
            kbase = OFF_K + utx * S
            # Whole chunks, the next one loaded into registers while this
            # one is multiplied; then the zero-padded tail chunk.
            nfull = d // DC
            if nfull > 0:
                load(q, k, qv, kv, b1, b2, hk, qr, kr, utid, U(0), du, False, pq, pk)
            for ci in range(nfull):
                store(sh, utid, pq, pk)
                cuda.syncthreads()
                if ci + 1 < nfull:
                    p0 = U((ci + 1) * DC)
                    load(q, k, qv, kv, b1, b2, hk, qr, kr, utid, p0, du, False, pq, pk)
                chunk(sh, qbase, kbase, acc, qf, kf)
                cuda.syncthreads()
            if d % DC:
                p0 = U(nfull * DC)
                load(q, k, qv, kv, b1, b2, hk, qr, kr, utid, p0, du, True, pq, pk)
                store(sh, utid, pq, pk)
                cuda.syncthreads()
                chunk(sh, qbase, kbase, acc, qf, kf)
        # Outputs: row i0 + ty + TX*a, column c0 + tx + TX*b. The sequence
        # is read again (the products' barriers order these loads after
        # them), so its int64 fields need no registers across the products.
        q_off, q_len, q_rows, k_off, k_len, offset = sequence(seq, b1, b2)
        lo_base, hi_base = window(offset, wl, wr)
        lo_max, hi_min = keys_seen_by_all(i0, i0 + T - 1, lo_base, hi_base)
        ty = int64(uty)
        tx = int64(utx)
        # A tile that every row sees whole (real rows and keys, inside the
        # window, no mask) writes without per-element tests (block-uniform).
        full = (
            not skip and not has_mask and i0 + T <= q_len and j0 >= 0
            and j0 + T <= k_len and c0 + T <= ncol
            and j0 >= lo_max and j0 + T <= hi_min
        )  # fmt: skip
        if full:
            orow0 = U(q_off + i0 + ty)
            col0 = U(c0 + tx)
            for a in range(R):
                orow = U(orow0 + U(TX * a))
                for b in range(R):
                    col = U(col0 + U(TX * b))
                    t = acc[a, b] * scale
                    if has_bias:
                        bv = bias[b1, b2, orow, col]
                        t = NINF if bv == NINF else t + bv  # -inf bias masks
                    out[b1, b2, orow, col] = t
            return
        for a in range(R):
            i = i0 + ty + TX * a
            if i < q_rows:
                orow = U(q_off + i)
                for b in range(R):
                    c = c0 + tx + TX * b
                    if c < ncol:
                        j = c - k_off
                        vis = (not skip) and i < q_len and j >= 0 and j < k_len
                        if vis:
                            vis = lo_base <= j - i < hi_base
                        if vis and has_mask:
                            vis = mask[b1, b2, orow, U(c)]
                        if vis:
                            t = acc[a, b] * scale
                            if has_bias:
                                bv = bias[b1, b2, orow, U(c)]
                                t = NINF if bv == NINF else t + bv  # -inf bias masks
                            out[b1, b2, orow, U(c)] = t
                        else:
                            out[b1, b2, orow, U(c)] = NINF

    scores_kernel.geometry = dict(
        threads=NT, tile=T, per_thread=R, head_chunk=DC,
        shared_bytes=TOTAL * np.dtype(dtype).itemsize,
    )  # fmt: skip
    return scores_kernel


def make_merge(dtype, NT):
    """``kernel(o1, l1, o2, l2, out, lse, write_lse)``: combine two partial results.

    o (G1, G2, Nq, dv), l (G1, G2, Nq); one thread per row, so ``out``/``lse``
    may be ``o1``/``l1`` (or ``o2``/``l2``) themselves: a thread reads each
    element before writing it. Launch: grid = ceil(G1*G2*Nq / NT), block = NT.
    """
    _, sc_t = _types(dtype)
    nanmax = _nanmax()
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
        m = nanmax(x1, x2)
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
    nanmax = _nanmax()
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
            mx = nanmax(mx, t)
        red[tid] = mx
        cuda.syncthreads()
        w = NT // 2
        while w > 0:
            if tid < w:
                red[tid] = nanmax(red[tid], red[tid + w])
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
