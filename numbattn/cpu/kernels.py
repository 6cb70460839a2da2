"""CPU kernels: tiled, packed, register-blocked Numba code.

Every kernel takes arrays with exactly two leading batch dimensions (G1, G2)
and arbitrary strides (including 0), writes every element of its outputs and
validates nothing.

Design
------
* **One specialisation per dtype.** The public names (``scores_kernel``,
  ``softmax_kernel``, ``attention_kernel``, ``merge_kernel``) are thin
  :class:`~numbattn.cpu.dispatch.OneLayoutKernel` wrappers around ordinary
  ``@njit(parallel=True, nogil=True, cache=True)`` dispatchers, each with
  its typed argument description (:mod:`numbattn.cpu.args`, which the
  backend builds by keyword). On the first call for a dtype the wrapper compiles (or loads
  from the on-disk cache) the signature in which every array is typed as
  Numba's generic ``'A'`` layout (inputs additionally ``readonly``), and from
  then on calls that compiled entry point directly. C-contiguous, strided,
  transposed, broadcast (stride-0) and read-only arrays therefore all run the
  same machine code, and patching the tile sizes never recompiles. Attribute
  access (``.signatures``, ``.py_func``, ``.inspect_asm`` ...) is forwarded to
  the dispatcher.
* **Packing.** Every kernel copies the tiles it needs from the (arbitrarily
  strided) inputs into small C-contiguous scratch buffers, so all hot loops
  see unit stride: Q tile (rows padded to a multiple of 4 with zeros), K
  tile transposed (d x kt), V tile (kt x dv). The scratch is allocated once
  per call, one slice per thread (``get_thread_id``, :func:`_slot`), and
  sized by the rows and keys a work item can have (min(tile, max_rows),
  min(kt, Nk)), not by full tiles: tiny work items allocate nothing, and a
  huge d with one row costs a few rows of d.
* **Scale** multiplies each dot product (``scale * (q . k)``, as the CUDA
  kernels and the reference do): inside the exponentials
  (:func:`_exp_scaled_inplace`; the row maximum is ``scale * max`` or
  ``scale * min``), or in the bias / mask pass when there is one, so it
  costs no extra pass. Pre-scaling the Q tile would overflow (q * scale =
  inf) where the scores themselves are finite.
* **Workers.** The ``prange`` loop of the scores, forward, decode and
  backward kernels only deals out work items: each calls a serial worker
  (``_scores_item``, ``_attention_item``, ``_decode_item``,
  ``_bwd_key_item``) with the call's arrays, the per-thread scratch and the
  thread id, grouped in tuples. The per-row steps (``_mask_row``,
  ``_online_softmax_step``) and the forward's per-block step
  (``_attention_block``) are inlined into their callers (``inline='always'``):
  as calls they cost the forward 6-12 %.
* **Serial twin.** ``kernel.serial`` is the same code compiled without
  ``parallel=True``, for a process forked after GNU OpenMP started
  (numbattn.cpu.backend). Caching goes through :mod:`numbattn._jit`, which
  also works on a read-only installation.
* **Micro-kernel** (:func:`_gemm`, :func:`_gemm_tn`; one implementation for
  the forward's S = Qs @ Kt, O += P @ V, the scores and the backward's five
  products): C[:M, :N] (+)= A[:M, :K] @ B[:K, :N] on packed scratch, M a
  multiple of 4, through an LLVM intrinsic (:func:`_make_block_kernel`)
  that keeps a block of 4 rows x 4 explicit 64-byte vectors of C in zmm
  registers for the whole k loop (one load / store of C per block, not per
  k-step), broadcasting 4 scalars of A and loading 4 vectors of B per step.
  The vector width and block follow the CPU Numba compiles for
  (:func:`_vector_shape`: 4 x 4 zmm on AVX-512, 4 x 2 ymm on AVX2, 4 x 4
  NEON q registers on AArch64). S is overwritten (no zeroing pass). With a
  right window bound (causal: 0) key tiles entirely beyond it are never
  visited, and inside the boundary tiles each 4-row block trims its column
  range (S) and key range (P @ V) to what those rows can see. Loops over a
  row's visible part run on a C-contiguous slice starting at 0: a loop
  from a runtime start index does not vectorise (Numba's negative-index
  wraparound), which cost 2x. Q, K (transposed, four keys per pass) and V
  tiles are packed through row views when the last axis has unit stride
  (:func:`_pack_rows`, :func:`_pack_transposed`), else by strided loops.
* **Sequence table** (numbattn._sequences): attention and scores take the
  (G1, G2, 6) table, ``max_rows``, bias / mask (with has_bias / has_mask
  flags; dummies when absent, so one specialisation serves every call) and
  the window (left, right; causal is right = 0). The work grid is
  G1 x G2 x ceil(max_rows / q_tile) query tiles; a tile past its sequence's
  Q_ROWS does nothing. The fused kernel deals them out in items of up to
  four tiles of one head (:func:`_tile_group`: while each thread keeps 8
  items and their Q / O scratch 256 KiB), which pack each K / V tile once
  for all their tiles (the union of their key ranges; a tile skips key
  tiles outside its own). Each query tile visits only the key range [lo, hi) its rows can
  see under the window (``_query_block``, which reads the table by its named
  columns through ``_sequence``); inside a tile each row works on its
  visible columns [clo, chi) (``_row_range``), and bias / mask are applied
  element-wise there only when given (``_mask_row``, the one mask step of
  the forward, backward, decode and scores; the forward and the decode share
  ``_online_softmax_step``); a -inf bias masks whatever the dot
  product (NaN, +inf). GQA: query head b reads key head
  b // (G2 // Hk). Work items are dealt to the threads in a snake order
  (``_work_item``) so unequal tiles (causal, windows, varlen) stay balanced.
* **Masked keys are never read.** A key whose score is -inf (causal,
  window, lengths, mask, -inf bias) must not reach the row even if its
  value is NaN or inf, but P @ V over a partly masked tile forms 0 * NaN.
  While packing a V tile its sum is taken (a vectorised pass); when that is
  not finite, the tile records which scores were > -inf before the
  exponentials and accumulates P @ V per visible key (:func:`_axpy`)
  instead of through the micro-kernel. Finite values (the normal case)
  keep the micro-kernel; a false alarm (a finite sum that overflows) only
  costs time.
* **Row views.** When an array's last axis has unit stride, rows are read
  and written through C-contiguous ``carray`` views built from the data
  pointer (``_row3``/``_row4``), so softmax and the scores output stream with
  vector loads/stores; otherwise a strided scalar loop is used.
* **Scores in place** (``_scores_impl``): when the output rows
  have unit stride (and a row stride of at least a row, no bias / mask),
  :func:`_gemm` writes S straight into them through a C-contiguous view
  whose row length is the output's row stride (:func:`_out_rows`): no
  scratch S and no copy. The scale is folded into the packed K tile when
  |scale| <= 1 (exact for a power of two such as 1/sqrt(64)); K is
  transposed in registers, L x L blocks of vector loads and shuffles
  (:func:`_transpose_block`). Its own tiles (``CPU_SCORES_*``: 256
  queries, so each K tile is packed once per 256 rows; 512 keys, so each
  tile writes runs of 512 elements of a row).
* **Vectorised exp** (:func:`_vexp`; softmax's :func:`_exp_shift` uses
  :func:`_vexp_sm`, minimax polynomials of degree 10 (float64) and 5
  (float32), a few ulp): exp(x) written as plain arithmetic (Cody-Waite range reduction, Cephes minimax
  polynomial for float32, degree-12 Taylor for float64, 2**n by building the exponent bits
  with an integer shift + bitcast) in a branch-free loop that LLVM vectorises.
  -inf and underflow give exactly 0, NaN gives NaN. The row sum is fused in.
  On AVX-512 targets the exp passes and the row max ask LLVM for 512-bit
  vectors (:func:`_wide_vectors`): for Intel's AVX-512 cores LLVM prefers
  256 bits in vectorised loops (ymm where Zen 4 gets zmm; ``cpu-report``).
* **Row max** uses ``llvm.maxnum`` (ignores NaN, vectorises as a reduction);
  NaN is propagated through the exp and the sums instead.
* **Streaming split-K kernel** (``decode_kernel``): few queries
  over many keys. K and V are a (blocks, block_size, Hk, d) cache with a
  block table (a dense (G1, Hk, Nk, d) array is viewed as one block per
  batch element). A work item is (sequence, key heads, query tile, split):
  the query heads of its key heads are its rows (GQA: each K / V row is
  read once per group). Rows of K and V are read in place with unit
  stride (other strides: packed per block), in blocks of ``k_tile`` keys
  that may span cache blocks; the helpers ``_scores_block`` (one key x two
  query rows per pass) and ``_pv_block`` (two value rows per pass over each
  output row; with ``CPU_STREAM_WIDE_ROWS`` or more rows per key head, a
  4 x 4 register block, ``_pv_gemm``) are called once per contiguous
  segment, never per key (Numba does not inline them). Segments are read
  as several address-ordered streams at once: four (else two) whole cache
  blocks of a paged cache, or a segment's two halves (``_scores_pair`` /
  ``_scores_quad``, ``_pv_pair`` / ``_pv_quad``). The hardware prefetcher
  ramps up again at every new stream; read one at a time, shuffled 64 KiB
  blocks came at 0.78x the rate of the same bytes in address order (plain
  NumPy-like reads, one thread, Zen 4), and a paged decode with blocks of 16
  took 1.4-1.6x the CPU time of the contiguous one; four at a time,
  about 1.0x (two: 1.1x). Two halves of a contiguous segment made the
  contiguous decode 1.1x faster (four quarters: slower). Few rows are bound by
  the read of K and V, and reading rows in address order (not four rows
  512 bytes apart interleaved) is what lets one core stream: on Zen 4 it
  took a 1-query decode on one thread from ~0.67x to ~0.8-0.9x of a plain
  streaming sum. Blocks where some row cannot see some key, or with bias /
  mask, accumulate P @ V key by key, skipping masked keys (never read).
  Key heads interleaved in a row (the paged layout, (B, N, H, d)) are taken
  several per item and read row by row (every head of a row, then the next
  row: address order). The visible key range of an item is cut into
  ``num_splits`` chunks; each writes a normalised
  partial and its lse to scratch, merged in a second parallel loop of the
  same call (merge_attention's math, split order: bitwise reproducible).
* **fastmath** is never the Numba ``True`` set: only
  ``{'contract', 'reassoc', 'nsz', 'arcp', 'afn'}`` (no nnan/ninf), applied to
  the helper loops; the kernels themselves are compiled without fastmath.
"""

import math

import numpy as np
from llvmlite import ir
from numba import carray, get_thread_id, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._jit import njit  # njit: cache=True also works read-only
from .._sequences import ALIGN, K_LEN, K_OFF, Q_LEN, Q_OFF, Q_ROWS
from .args import (
    AttentionArgs,
    AttentionBackwardArgs,
    DecodeArgs,
    MergeArgs,
    ScoresArgs,
    SoftmaxArgs,
)
from .dispatch import OneLayoutKernel

# Every jitted helper of the kernels lives in this file, on purpose. Numba's
# on-disk cache is stamped with a hash of the defining file only: a kernel
# cached here keeps running its old machine code after a helper it calls
# from another file changes (tried with Numba 0.68: edit the helper, run in a
# fresh process, the kernel loads from the cache and returns the old
# result), and the same holds for constants imported from another file, such
# as the table's column numbers from numbattn._sequences. Splitting blocks,
# mask and softmax helpers into modules would need a cache clear after every
# edit to them; here any edit recompiles what depends on it.
_FM = frozenset({"contract", "reassoc", "nsz", "arcp", "afn"})
_OPTS = dict(parallel=True, nogil=True, cache=True, fastmath=False)
_SERIAL_OPTS = dict(_OPTS, parallel=False)
_HOPTS = dict(nogil=True, cache=True, fastmath=set(_FM))

# Rows of the register block of the micro-kernel; scratch row counts are
# padded to a multiple of this.
_MR = 4


# ---------------------------------------------------------------------------
# LLVM intrinsics
# ---------------------------------------------------------------------------


@intrinsic
def _maxnum(typingctx, a, b):
    """llvm.maxnum: the larger of a and b, ignoring a NaN operand."""
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _minnum(typingctx, a, b):
    """llvm.minnum: the smaller of a and b, ignoring a NaN operand."""
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        t = args[0].type
        fn = builder.module.declare_intrinsic("llvm.minnum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _bits_to_float(typingctx, a):
    """Reinterpret an int32 as float32 or an int64 as float64."""
    out = types.float32 if a.bitwidth == 32 else types.float64
    sig = out(a)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(out))

    return sig, codegen


@intrinsic
def _wide_vectors(typingctx):
    """Lets LLVM's loop vectoriser use the full vector width in the calling
    function on AVX-512 targets (``"prefer-vector-width"="512"``). For
    Intel's AVX-512 cores (sapphirerapids, emeraldrapids ...) LLVM prefers
    256-bit vectors in vectorised loops, and the exp passes compiled to ymm
    where Zen 4 gets zmm; the micro-kernel, whose explicit vectors are zmm
    anyway, keeps the core at 512 bits, so this costs no clock. No effect
    on CPUs that already prefer 512 bits (Zen 4, Zen 5) or lack AVX-512."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        if _VBYTES == 64:
            # llvmlite's FunctionAttributes.add() accepts enum attributes only.
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------
# Vectorisable helpers
# ---------------------------------------------------------------------------


@njit(**_HOPTS)
def _rowmax(x, n):
    """max(x[:n]) ignoring NaN; -inf when n == 0 or all are -inf/NaN."""
    _wide_vectors()
    m = x.dtype.type(-np.inf)
    for j in range(n):
        m = _maxnum(m, x[j])
    return m


@njit(**_HOPTS)
def _rowmin(x, n):
    """min(x[:n]) ignoring NaN; +inf when n == 0 or all are +inf/NaN."""
    _wide_vectors()
    m = x.dtype.type(np.inf)
    for j in range(n):
        m = _minnum(m, x[j])
    return m


@njit(nogil=True, cache=True)
def _scaled_rowmax(x, n, s):
    """max_j(x[j] * s) over j < n ignoring NaN, without a pass scaling x:
    rounding is monotonic, so it is s * max(x) for s >= 0, s * min(x) else."""
    if s >= 0:
        return _rowmax(x, n) * s
    return _rowmin(x, n) * s


def _vexp(x):  # pragma: no cover - typing stub, see the overload below
    """exp(x) for x <= 0 (or NaN) as branch-free arithmetic."""
    raise NotImplementedError


def _vexp_f32(x):
    f = np.float32
    lo = f(-87.0)
    ok = x >= lo
    xc = x if ok else lo  # NaN and everything below lo -> lo (finite path)
    fn = np.floor(xc * f(1.44269504088896341) + f(0.5))
    r = xc - fn * f(0.693359375)
    r = r - fn * f(-2.12194440e-4)
    # Cephes expf minimax polynomial
    p = f(1.9875691500e-4)
    p = p * r + f(1.3981999507e-3)
    p = p * r + f(8.3334519073e-3)
    p = p * r + f(4.1665795894e-2)
    p = p * r + f(1.6666665459e-1)
    p = p * r + f(5.0000001201e-1)
    p = p * (r * r) + r + f(1.0)
    sc = _bits_to_float(np.int32((np.int32(fn) + 127) << 23))  # 2**fn
    under = x if x != x else f(0.0)  # NaN stays NaN, -inf/underflow -> 0
    return p * sc if ok else under


def _vexp_f64(x):
    lo = -708.0
    ok = x >= lo
    xc = x if ok else lo
    fn = np.floor(xc * 1.4426950408889634074 + 0.5)
    r = (xc - fn * 6.93147180369123816490e-01) - fn * 1.90821492927058770002e-10
    # Taylor series of e**r to degree 12, |r| <= 0.347: rel. err < 2e-16
    p = 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    sc = _bits_to_float((np.int64(fn) + 1023) << 52)
    under = x if x != x else 0.0
    return p * sc if ok else under


@overload(_vexp, jit_options=dict(fastmath=set(_FM)))
def _vexp_ov(x):
    if x == types.float32:
        return _vexp_f32
    return _vexp_f64


def _vexp_sm(x):  # pragma: no cover - typing stub, see the overload below
    """_vexp for softmax: cheaper polynomials (degree 10 for float64, 5 for
    float32), a few ulp instead of ~1."""
    raise NotImplementedError


def _vexp_sm_f64(x):
    lo = -708.0
    ok = x >= lo
    xc = x if ok else lo
    fn = np.floor(xc * 1.4426950408889634074 + 0.5)
    r = (xc - fn * 6.93147180369123816490e-01) - fn * 1.90821492927058770002e-10
    # Degree-10 minimax polynomial (Remez, relative error) of e**r on
    # |r| <= ln2 / 2: 2.9e-16, as the degree-12 Taylor series of _vexp_f64
    # (softmax's rows are compute-bound there) with 2 FMAs fewer.
    p = 2.7476800484095515e-07
    p = p * r + 2.7634990756978247e-06
    p = p * r + 2.480193170810392e-05
    p = p * r + 1.984118523626433e-04
    p = p * r + 1.3888888516236323e-03
    p = p * r + 8.333333370870067e-03
    p = p * r + 4.166666666813645e-02
    p = p * r + 1.6666666666611554e-01
    p = p * r + 4.9999999999998324e-01
    p = p * r + 1.0
    p = p * r + 1.0
    sc = _bits_to_float((np.int64(fn) + 1023) << 52)
    under = x if x != x else 0.0
    return p * sc if ok else under


def _vexp_sm_f32(x):
    f = np.float32
    lo = f(-87.0)
    ok = x >= lo
    xc = x if ok else lo
    fn = np.floor(xc * f(1.44269504088896341) + f(0.5))
    r = xc - fn * f(0.693359375)
    r = r - fn * f(-2.12194440e-4)
    # Degree-5 minimax polynomial (relative error, Lawson, constant term 1 so
    # that exp(0) = 1) of e**r on |r| <= ln2 / 2: 9.1e-8, 1.7e-7 (3 ulp)
    # evaluated in float32, against Cephes' ~1 ulp in _vexp_f32, for 3
    # operations fewer an element: 0.96-0.99x the time of long float32 rows
    # through a scratch row.
    p = f(8.290315e-3)
    p = p * r + f(4.189793e-2)
    p = p * r + f(1.6667636e-1)
    p = p * r + f(4.999915e-1)
    p = p * r + f(9.999997e-1)
    p = p * r + f(1.0)
    sc = _bits_to_float(np.int32((np.int32(fn) + 127) << 23))  # 2**fn
    under = x if x != x else f(0.0)
    return p * sc if ok else under


@overload(_vexp_sm, jit_options=dict(fastmath=set(_FM)))
def _vexp_sm_ov(x):
    if x == types.float32:
        return _vexp_sm_f32
    return _vexp_sm_f64


@njit(**_HOPTS)
def _sum(x, n):
    """sum(x[:n]), vectorised (reassociated); inf or NaN if any term is."""
    total = x.dtype.type(0.0)
    for j in range(n):
        total += x[j]
    return total


@njit(**_HOPTS)
def _axpy(y, x, a, n):
    """y[:n] += a * x[:n]."""
    for j in range(n):
        y[j] += a * x[j]


@njit(**_HOPTS)
def _exp_shift(src, dst, n, shift):
    """dst[j] = exp(src[j] - shift) for j < n; returns the sum (NaN-propagating).

    softmax's exp (:func:`_vexp_sm`); src and dst must not overlap (use
    _exp_shift_inplace)."""
    _wide_vectors()
    total = src.dtype.type(0.0)
    for j in range(n):
        e = _vexp_sm(src[j] - shift)
        dst[j] = e
        total += e
    return total


@njit(nogil=True, cache=True, fastmath=set(_FM - {"contract"}))
def _exp_scaled_inplace(x, n, s, shift):
    """x[j] = exp(x[j] * s - shift) for j < n; returns the sum (NaN-propagating).

    Not contracted: x[j] * s is rounded first, exactly as if x had been
    scaled in place (an FMA would also turn inf - inf = NaN into 0)."""
    _wide_vectors()
    total = x.dtype.type(0.0)
    for j in range(n):
        e = _vexp(x[j] * s - shift)
        x[j] = e
        total += e
    return total


@njit(**_HOPTS)
def _exp_shift_inplace(x, n, shift):
    """_exp_shift in place."""
    _wide_vectors()
    total = x.dtype.type(0.0)
    for j in range(n):
        e = _vexp_sm(x[j] - shift)
        x[j] = e
        total += e
    return total


@intrinsic
def _ptr_at(typingctx, arr, byte_offset):
    """Typed pointer to arr's data + byte_offset."""
    sig = types.CPointer(arr.dtype)(arr, byte_offset)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        raw = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        raw = builder.gep(raw, [args[1]])
        return builder.bitcast(raw, ary.data.type)

    return sig, codegen


@njit(nogil=True, cache=True)
def _row3(x, a, b):
    """x[a, b, :] of a 3-D array with unit inner stride, as a C-contiguous view."""
    return carray(_ptr_at(x, a * x.strides[0] + b * x.strides[1]), x.shape[2])


@njit(nogil=True, cache=True)
def _row4(x, a, b, i):
    """x[a, b, i, :] of a 4-D array with unit inner stride, as a C-contiguous view."""
    return carray(_ptr_at(x, a * x.strides[0] + b * x.strides[1] + i * x.strides[2]), x.shape[3])


@njit(**_HOPTS)
def _copy_scaled(src, dst, n, s):
    for j in range(n):
        dst[j] = src[j] * s


# ---------------------------------------------------------------------------
# Micro-kernel and packing (forward and backward)
# ---------------------------------------------------------------------------


def _vector_shape(features, machine):
    """(bytes per vector, vectors per row of a full register block) for the
    target Numba compiles for: LLVM target features as Numba passes them
    (``+avx512f,+avx2,...``) and the machine name. 4 rows x 4 vectors need
    4 x 4 accumulators + 4 B vectors + a broadcast: 32 vector registers
    (AVX-512, AArch64); with 16 (AVX2, SSE) 4 x 2 keeps them in registers.
    Explicit vectors wider than the target's are split by LLVM: correct
    anywhere, the choice only decides whether they spill."""
    feats = {f[1:] for f in features.split(",") if f.startswith("+")}
    if "avx512f" in feats:
        return 64, 4
    if "avx" in feats:
        return 32, 2
    if machine.lower() in ("aarch64", "arm64"):
        return 16, 4
    return 16, 2


def _host_vector_shape():
    """:func:`_vector_shape` of the CPU Numba compiles for (NUMBA_CPU_FEATURES
    when set, else the host's, as numba.core.codegen decides)."""
    import platform

    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    feats = config.CPU_FEATURES
    if feats is None:
        try:
            feats = get_host_cpu_features()
        except Exception:  # pragma: no cover - no LLVM host query
            feats = ""
    return _vector_shape(feats, platform.machine())


# Read at compile time by the intrinsics below and by _lanes / _block_row
# (compile-time constants). Numba's cache key includes the target CPU and
# its features, so a cache written on another CPU is not loaded.
_VBYTES, _NV = _host_vector_shape()


def _make_block_kernel(rows, vecs, overwrite=False):
    """The register-blocked micro-kernel, as an LLVM intrinsic
    ``block(A, B, C, i, j, p0, p1, sar, sap)``:

        C[i + r, j : j + W] += sum over p in [p0, p1) of A(r, p) * B[p, j : j + W]

    (``=`` instead of ``+=`` with ``overwrite``: C is not read) for r <
    ``rows``, W = ``vecs`` vectors of ``_VBYTES`` bytes (64 on AVX-512: 16
    float32 / 8 float64 lanes), A(r, p) = A.flat[(i + r) * sar + p * sap] (sar, sap: element
    strides, so A may be read transposed: P^T dO, dS^T Q), B and C 2-D with
    unit inner stride. The rows x vecs accumulators stay in registers for the
    whole p loop (one load and one store of C per call, not per k-step as
    LLVM's loop vectoriser compiles a plain loop nest):
    each step broadcasts ``rows`` scalars of A, loads ``vecs`` vectors of B and
    issues rows x vecs FMAs. Explicit ``<lanes x T>`` vectors sized by
    :func:`_vector_shape` (zmm on AVX-512, ymm on AVX2, xmm / NEON q
    registers elsewhere). Sums run in p order (one
    FMA chain per element): deterministic."""

    def block(typingctx, A, B, C, i, j, p0, p1, sar, sap):
        sig = types.none(A, B, C, i, j, p0, p1, sar, sap)

        def codegen(context, builder, signature, args):
            tys = signature.args
            i64 = ir.IntType(64)
            ints = [context.cast(builder, x, t, types.int64) for x, t in zip(args[3:], tys[3:])]
            vi, vj, vp0, vp1, vsar, vsap = ints
            arr = [context.make_array(t)(context, builder, x) for t, x in zip(tys[:3], args[:3])]
            ety = context.get_data_type(tys[0].dtype)
            isz = tys[0].dtype.bitwidth // 8
            lanes = _VBYTES // isz
            vty = ir.VectorType(ety, lanes)
            i8p = ir.IntType(8).as_pointer()

            def c(n):
                return ir.Constant(i64, n)

            def at(a, off):  # pointer to element off of a's data
                raw = builder.gep(builder.bitcast(a.data, i8p), [builder.mul(off, c(isz))])
                return builder.bitcast(raw, ety.as_pointer())

            def vec_at(ptr, v):
                return builder.bitcast(builder.gep(ptr, [c(v * lanes)]), vty.as_pointer())

            ldb = builder.sdiv(builder.extract_value(arr[1].strides, 0), c(isz))
            ldc = builder.sdiv(builder.extract_value(arr[2].strides, 0), c(isz))
            fname = f"llvm.fma.v{lanes}f{8 * isz}"
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty] * 3), fname
            )
            acc = [[cgutils.alloca_once(builder, vty) for _ in range(vecs)] for _ in range(rows)]
            cp = []
            for r in range(rows):
                row = at(arr[2], builder.add(builder.mul(builder.add(vi, c(r)), ldc), vj))
                cp.append([vec_at(row, v) for v in range(vecs)])
                for v in range(vecs):
                    init = (
                        ir.Constant(vty, None) if overwrite else builder.load(cp[r][v], align=isz)
                    )
                    builder.store(init, acc[r][v])
            undef = ir.Constant(vty, ir.Undefined)
            zmask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            with cgutils.for_range(builder, vp1, start=vp0, intp=i64) as loop:
                p = loop.index
                brow = at(arr[1], builder.add(builder.mul(p, ldb), vj))
                bv = [builder.load(vec_at(brow, v), align=isz) for v in range(vecs)]
                pa = builder.mul(p, vsap)
                for r in range(rows):
                    off = builder.add(builder.mul(builder.add(vi, c(r)), vsar), pa)
                    x = builder.load(at(arr[0], off), align=isz)
                    xv = builder.shuffle_vector(
                        builder.insert_element(undef, x, c(0)), undef, zmask
                    )
                    for v in range(vecs):
                        res = builder.call(fma, [xv, bv[v], builder.load(acc[r][v])])
                        builder.store(res, acc[r][v])
            for r in range(rows):
                for v in range(vecs):
                    builder.store(builder.load(acc[r][v]), cp[r][v], align=isz)
            return context.get_dummy_value()

        return sig, codegen

    block.__name__ = block.__qualname__ = f"_block_{rows}x{vecs}{'_set' if overwrite else ''}"
    return intrinsic(block)


# A full block is 4 rows x _NV vectors (4 x 4 on AVX-512: 16 accumulators,
# 4 B vectors and a broadcast of the 32 zmm registers); 4 x 3, 4 x 2, 4 x 1
# for the last whole vectors of a row (trimmed causal rows, d = 96 ...).
_block4n = _make_block_kernel(4, _NV)
_block43 = _make_block_kernel(4, 3)
_block42 = _make_block_kernel(4, 2)
_block41 = _make_block_kernel(4, 1)
_set4n = _make_block_kernel(4, _NV, True)
_set43 = _make_block_kernel(4, 3, True)
_set42 = _make_block_kernel(4, 2, True)
_set41 = _make_block_kernel(4, 1, True)


@njit(**_HOPTS)
def _lanes(A):
    """Elements per vector of A's dtype (``_VBYTES`` bytes)."""
    return _VBYTES // A.itemsize


@njit(**_HOPTS)
def _block_row(A, B, C, i, N, p0, p1, sar, sap, ow):
    """C[i:i+4, :N] += A(0..3, p0:p1) @ B[p0:p1, :N] (``=`` if ow; A(r, p)
    as in :func:`_make_block_kernel`): whole blocks of _NV vectors, then the
    1 to _NV - 1 whole vectors left in one block, then the last N % lanes
    columns by a plain loop."""
    lanes = _lanes(A)
    w = _NV * lanes
    n4 = N - N % w
    for j in range(0, n4, w):
        if ow:
            _set4n(A, B, C, i, j, p0, p1, sar, sap)
        else:
            _block4n(A, B, C, i, j, p0, p1, sar, sap)
    n1 = N - N % lanes
    nv = (n1 - n4) // lanes
    if nv == 3 and ow:
        _set43(A, B, C, i, n4, p0, p1, sar, sap)
    elif nv == 3:
        _block43(A, B, C, i, n4, p0, p1, sar, sap)
    elif nv == 2 and ow:
        _set42(A, B, C, i, n4, p0, p1, sar, sap)
    elif nv == 2:
        _block42(A, B, C, i, n4, p0, p1, sar, sap)
    elif nv == 1 and ow:
        _set41(A, B, C, i, n4, p0, p1, sar, sap)
    elif nv == 1:
        _block41(A, B, C, i, n4, p0, p1, sar, sap)
    if n1 < N:
        if ow:
            for r in range(4):
                _zero_row(C[i + r], n1, N)
        for p in range(p0, p1):
            if sap == 1:  # A(r, p) = A[r, p]
                a0, a1, a2, a3 = A[i, p], A[i + 1, p], A[i + 2, p], A[i + 3, p]
            else:  # A(r, p) = A[p, r]
                a0, a1, a2, a3 = A[p, i], A[p, i + 1], A[p, i + 2], A[p, i + 3]
            for j in range(n1, N):
                b = B[p, j]
                C[i, j] += a0 * b
                C[i + 1, j] += a1 * b
                C[i + 2, j] += a2 * b
                C[i + 3, j] += a3 * b


@njit(**_HOPTS)
def _gemm(A, B, C, M, NN, KK, ntri, ktri, ow):
    """C[:M, :N] += A[:M, :K] @ B[:K, :N] on the register-blocked
    micro-kernel, or ``=`` if ow; M must be a multiple of 4 and A, B, C
    have unit inner stride (packed scratch). Causal trimming: the row block
    starting at i only uses columns j < ntri + i + 4 (and only k-indices
    p < ktri + i + 4); pass ntri >= N, ktri >= K for a full product.

    The trimmed column count is rounded up to whole vectors (within NN); C's
    columns past it are left as they were: S / dP columns past a row's
    visible range are overwritten afterwards (forward and backward), and a
    vector costs what one of its columns would."""
    lanes = _lanes(A)
    for i in range(0, M, 4):
        N = max(0, ntri + i + 4)
        N = min(NN, N + (lanes - N % lanes) % lanes)
        K = min(KK, max(0, ktri + i + 4))
        _block_row(A, B, C, i, N, 0, K, A.shape[1], 1, ow)


@njit(**_HOPTS)
def _gemm_tn(A, B, C, M, N, K, tri):
    """C[:M, :N] += A[:K, :M]^T @ B[:K, :N]; M must be a multiple of 4.

    A is read transposed in place (P^T dO, dS^T Q need no transposed copy).
    Causal trimming: the row block starting at i only uses k-indices
    p >= i - tri (A[p, i] is 0 for p < i - tri: a key is seen by the query
    rows at or below the diagonal); pass tri >= M for a full product."""
    for i in range(0, M, 4):
        p0 = max(0, i - tri)
        p0 -= p0 % 4
        _block_row(A, B, C, i, N, min(p0, K), K, 1, A.shape[1], False)


@njit(**_HOPTS)
def _copy(src, dst, n):
    for j in range(n):
        dst[j] = src[j]


@njit(nogil=True, cache=True)
def _unit_rows(x):
    """Whether x's rows (last axis) can be read as C-contiguous views."""
    return x.shape[3] <= 1 or x.strides[3] == x.itemsize


@njit(nogil=True, cache=True)
def _pack_rows(src, a, b, row0, n, dst):
    """:func:`_pack_rows_strided` through row views (vectorised copies) when src's
    last axis has unit stride: the strided scalar loop costs 7x at 64 x 64."""
    if not _unit_rows(src):
        _pack_rows_strided(src, a, b, row0, n, dst)
        return
    for r in range(n):
        _copy(_row4(src, a, b, row0 + r), dst[r], src.shape[3])


@njit(nogil=True, cache=True)
def _pack_transposed(src, a, b, row0, n, dst):
    """:func:`_pack_transposed_strided`, reading through row views when src's last
    axis has unit stride, four keys per pass (four adjacent stores per
    destination row: 2-3.5x faster than one key per pass at 128 x 64)."""
    if not _unit_rows(src):
        _pack_transposed_strided(src, a, b, row0, n, dst)
        return
    d = src.shape[3]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        r0 = _row4(src, a, b, row0 + j)
        r1 = _row4(src, a, b, row0 + j + 1)
        r2 = _row4(src, a, b, row0 + j + 2)
        r3 = _row4(src, a, b, row0 + j + 3)
        for p in range(d):
            dst[p, j] = r0[p]
            dst[p, j + 1] = r1[p]
            dst[p, j + 2] = r2[p]
            dst[p, j + 3] = r3[p]
    for j in range(n4, n):
        row = _row4(src, a, b, row0 + j)
        for p in range(d):
            dst[p, j] = row[p]


@njit(**_HOPTS)
def _scale_row(x, n, s):
    for j in range(n):
        x[j] *= s


@njit(**_HOPTS)
def _zero_row(x, n0, n1):
    """x[n0:n1] = 0, on a slice starting at 0: a loop from a runtime start
    does not vectorise (30x slower on the diagonal tiles' row tails)."""
    if n1 > n0:
        _fill(x[n0:], n1 - n0, x.dtype.type(0))


@njit(**_HOPTS)
def _fill(x, n, value):
    for j in range(n):
        x[j] = value


@njit(nogil=True, cache=True)
def _slot(scratch, t):
    """scratch[t]: thread t's part of a per-thread scratch buffer (a fresh
    buffer if t is past it, as when a direct call passes fewer n_threads
    than Numba runs)."""
    if t < scratch.shape[0]:
        return scratch[t]
    return np.empty_like(scratch[0])


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _work_item(p, chunk, nthr):
    """Position p of the parallel range -> work item.

    Numba splits ``prange(nthr * chunk)`` into nthr static chunks of
    ``chunk`` positions; thread c then runs items c, 2*nthr - 1 - c,
    2*nthr + c, ... (a "snake" over the item grid), so every thread gets a
    uniform sample of query tiles: costs that grow along a head (causal,
    windows at the edges) and sequences of different lengths (varlen, key
    lengths) stay balanced."""
    c = p // chunk
    r = p % chunk
    if r % 2 == 0:
        return r * nthr + c
    return r * nthr + (nthr - 1 - c)


@njit(nogil=True, cache=True)
def _pack_rows_strided(src, a, b, row0, n, dst):
    """dst[r, :] = src[a, b, row0 + r, :] for r < n (a Q tile)."""
    for r in range(n):
        for p in range(src.shape[3]):
            dst[r, p] = src[a, b, row0 + r, p]


@njit(nogil=True, cache=True)
def _pack_transposed_strided(src, a, b, row0, n, dst):
    """dst[:, j] = src[a, b, row0 + j, :] for j < n (a K tile, transposed)."""
    for j in range(n):
        for p in range(src.shape[3]):
            dst[p, j] = src[a, b, row0 + j, p]


@njit(nogil=True, cache=True)
def _grid(g1, g2, max_rows, q_tile, n_threads):
    """Work grid of the tiled kernels: (query tile, tiles per head, items,
    threads, positions per thread); one item per (a, b, query tile)."""
    qt = max(q_tile, 1)
    n_qt = (max_rows + qt - 1) // qt
    n_items = g1 * g2 * n_qt
    nthr = max(1, n_threads)
    chunk = (n_items + nthr - 1) // nthr
    return qt, n_qt, n_items, nthr, chunk


@njit(nogil=True, cache=True)
def _sequence(seq, a, b):
    """Row (a, b) of the sequence table, by its named columns
    (numbattn._sequences): (q_off, q_len, q_rows, k_off, k_len, off), off
    the diagonal (ALIGN). The kernels read the table through this only."""
    return (
        seq[a, b, Q_OFF],
        seq[a, b, Q_LEN],
        seq[a, b, Q_ROWS],
        seq[a, b, K_OFF],
        seq[a, b, K_LEN],
        seq[a, b, ALIGN],
    )


@njit(nogil=True, cache=True)
def _tile_origin(w, g2, n_qt, qt):
    """Work item w of a (G1, G2, query tile) grid -> (a, b, first row i0)."""
    return w // (g2 * n_qt), (w // n_qt) % g2, (w % n_qt) * qt


@njit(nogil=True, cache=True)
def _query_block(seq, a, b, i0, qt, left, right):
    """Query rows [i0, i0 + qt) of sequence (a, b) under the window ->
    (q_off, k_off, off, i1, m, lo, hi, in_lo, in_hi): the rows to write are
    [i0, i1) (none when i1 <= i0), the first m of them real queries; keys
    [lo, hi) are visible to some real row, keys [in_lo, in_hi) to every one
    (lo <= in_lo <= in_hi <= hi; all 0 when m == 0)."""
    q_off, q_len, q_rows, k_off, k_len, off = _sequence(seq, a, b)
    i1 = min(i0 + qt, q_rows)
    m = max(0, min(i1, q_len) - i0)
    if m == 0:
        return q_off, k_off, off, i1, 0, 0, 0, 0, 0
    ilast = i0 + m - 1
    lo = 0
    hi = k_len
    if left >= 0:
        lo = min(k_len, max(0, i0 + off - left))
    if right >= 0:
        hi = max(lo, min(k_len, ilast + off + right + 1))
    in_lo = lo
    in_hi = hi
    if left >= 0:
        in_lo = max(lo, min(hi, ilast + off - left))
    if right >= 0:
        in_hi = min(hi, max(in_lo, i0 + off + right + 1))
    return q_off, k_off, off, i1, m, lo, hi, in_lo, in_hi


@njit(nogil=True, cache=True)
def _key_block(seq, a, b, j0, kn, left, right):
    """Keys [j0, j0 + kn) of sequence (a, b) under the window -> (q_off,
    q_len, off, ilo, ihi): the real query rows [ilo, ihi) that see some of
    them (the backward's query range of a key tile)."""
    q_off, q_len, _, _, _, off = _sequence(seq, a, b)
    ilo = 0
    ihi = q_len
    if right >= 0:
        ilo = min(q_len, max(0, j0 - off - right))
    if left >= 0:
        ihi = max(ilo, min(q_len, j0 + kn - 1 - off + left + 1))
    return q_off, q_len, off, ilo, ihi


@njit(nogil=True, cache=True)
def _row_range(i, j0, kn, off, left, right):
    """Columns [clo, chi) of the key tile starting at j0 (kn keys) that the
    window lets query row i see."""
    clo = 0
    chi = kn
    if left >= 0:
        clo = min(kn, max(0, i + off - left - j0))
    if right >= 0:
        chi = min(kn, max(0, i + off + right + 1 - j0))
    return clo, chi


@njit(nogil=True, cache=True, inline="always")
def _mask_row(srow, clo, chi, sc, bias, mask, a, b, qi, kj, has_bias, has_mask):
    """The mask step of a score row: srow[j] = sc * srow[j] + bias, or -inf
    where the mask is False, for columns clo <= j < chi of query row qi
    (absolute, in bias / mask[a, b]) whose column 0 is key kj. A -inf bias
    masks whatever the product is (NaN, +inf). The window and the lengths
    are the caller's [clo, chi)."""
    ninf = srow.dtype.type(-np.inf)
    for jj in range(clo, chi):
        x = srow[jj] * sc
        if has_bias:
            bb = bias[a, b, qi, kj + jj]
            x = ninf if bb == ninf else x + bb
        if has_mask and not mask[a, b, qi, kj + jj]:
            x = ninf
        srow[jj] = x


@njit(nogil=True, cache=True, inline="always")
def _online_softmax_step(vis, n, mul, mrow, lrow, r, orow):
    """One key block of row r's online softmax: vis[:n], the row's visible
    scores still to be multiplied by ``mul`` (the scale, or 1 after
    :func:`_mask_row`), becomes exp(mul * vis - max); the running max
    mrow[r] and sum lrow[r] take the block in, and orow, the row's P @ V so
    far, is rescaled to the new max."""
    dt = vis.dtype.type
    ninf = dt(-np.inf)
    zero = dt(0.0)
    mx = _scaled_rowmax(vis, n, mul)  # mul == 1: exactly _rowmax
    m_old = mrow[r]
    m_new = _maxnum(m_old, mx)
    shift = m_new if m_new > ninf else zero
    alpha = dt(math.exp(m_old - m_new)) if m_old > ninf else zero
    lrow[r] = lrow[r] * alpha + _exp_scaled_inplace(vis, n, mul, shift)
    mrow[r] = m_new
    if alpha != dt(1.0):
        _scale_row(orow, orow.shape[0], alpha)


@njit(nogil=True, cache=True)
def _out_rows(x, a, b, i, j, n, ld):
    """Rows i .. i + n - 1 of x[a, b] from column j on, as a C-contiguous
    (n, ld) view (ld: x's row stride in elements, >= the row length): row r
    of the view starts at x[a, b, i + r, j]; only its first ncol - j
    elements are x's. Lets :func:`_gemm` write S straight into the output."""
    byte = a * x.strides[0] + b * x.strides[1] + i * x.strides[2] + j * x.itemsize
    return carray(_ptr_at(x, byte), (n, ld))


@intrinsic
def _transpose_block(typingctx, src, lds, dst, j, p0, s):
    """dst[p0 + c, j + r] = src[r * lds + c] * s for r, c < L, L the lanes
    of a ``_VBYTES`` vector (16 float32 on AVX-512): L rows of K (src: a
    typed pointer to K[row, p0], lds its row stride in elements) loaded as
    vectors, transposed in registers and stored as L rows of the packed
    K^T tile (dst: 2-D, unit inner stride). The transpose swaps the
    off-diagonal h x h blocks of every 2h x 2h block for h = L/2, ..., 1
    (two-source shuffles, log2(L) per row): about 8x fewer instructions
    than a scalar store per element."""
    sig = types.none(src, lds, dst, j, p0, s)

    def codegen(context, builder, signature, args):
        dty = signature.args[2]
        ety = context.get_data_type(dty.dtype)
        isz = dty.dtype.bitwidth // 8
        lanes = _VBYTES // isz
        vty = ir.VectorType(ety, lanes)
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        vlds, vj, vp0 = (
            context.cast(builder, args[k], signature.args[k], types.int64) for k in (1, 3, 4)
        )
        rows = []
        for r in range(lanes):
            ptr = builder.gep(args[0], [builder.mul(ir.Constant(i64, r), vlds)])
            rows.append(builder.load(builder.bitcast(ptr, vty.as_pointer()), align=isz))
        h = lanes // 2
        while h >= 1:
            new = list(rows)
            for r in range(lanes):
                if r & h:
                    continue
                lo = [c if c & h == 0 else lanes + c - h for c in range(lanes)]
                hi = [c + h if c & h == 0 else lanes + c for c in range(lanes)]
                mty = ir.VectorType(i32, lanes)
                new[r] = builder.shuffle_vector(rows[r], rows[r + h], ir.Constant(mty, lo))
                new[r + h] = builder.shuffle_vector(rows[r], rows[r + h], ir.Constant(mty, hi))
            rows = new
            h //= 2
        x = context.cast(builder, args[5], signature.args[5], dty.dtype)
        undef = ir.Constant(vty, ir.Undefined)
        zmask = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
        sv = builder.shuffle_vector(
            builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, zmask
        )
        darr = context.make_array(dty)(context, builder, args[2])
        ldd = builder.sdiv(builder.extract_value(darr.strides, 0), ir.Constant(i64, isz))
        for c in range(lanes):
            off = builder.add(builder.mul(builder.add(vp0, ir.Constant(i64, c)), ldd), vj)
            ptr = builder.bitcast(builder.gep(darr.data, [off]), vty.as_pointer())
            builder.store(builder.fmul(rows[c], sv), ptr, align=isz)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _pack_transposed_scaled(src, a, b, row0, n, dst, s):
    """dst[:, j] = src[a, b, row0 + j, :] * s for j < n (a K tile,
    transposed, with the scores' scale; s = 1 copies exactly). Rows of unit
    stride go by :func:`_transpose_block` in L x L blocks (L keys x L
    dimensions), the last d % L dimensions and n % L keys by scalar loops;
    other strides by a strided loop."""
    isz = src.itemsize
    d = src.shape[3]
    if not _unit_rows(src) or src.strides[2] % isz != 0:
        for j in range(n):
            for p in range(d):
                dst[p, j] = src[a, b, row0 + j, p] * s
        return
    lanes = _lanes(dst)
    lds = src.strides[2] // isz
    n_l = n - n % lanes
    d_l = d - d % lanes
    for j in range(0, n_l, lanes):
        base = a * src.strides[0] + b * src.strides[1] + (row0 + j) * src.strides[2]
        for p0 in range(0, d_l, lanes):
            _transpose_block(_ptr_at(src, base + p0 * isz), lds, dst, j, p0, s)
        if d_l < d:
            for r in range(lanes):
                row = _row4(src, a, b, row0 + j + r)
                for p in range(d_l, d):
                    dst[p, j + r] = row[p] * s
    for j in range(n_l, n):
        row = _row4(src, a, b, row0 + j)
        for p in range(d):
            dst[p, j] = row[p] * s


@njit(nogil=True, cache=True)
def _scores_item(w, data, flags, geometry, scratch, t):
    """Work item w of :func:`_scores_impl` on thread t: one query tile, its
    Q rows packed once, then every key tile it sees."""
    q, k, out, bias, mask, seq = data
    has_bias, has_mask, sc, pre, direct, left, right = flags
    g2, group, qt, kt, n_qt = geometry
    qs_t, kp_t, s_t = scratch
    d = q.shape[3]
    ncol = out.shape[3]
    dt = q.dtype.type
    ninf = dt(-np.inf)
    isz = out.itemsize
    o_unit = ncol <= 1 or out.strides[3] == isz
    ld = out.strides[2] // isz
    a, b, i0 = _tile_origin(w, g2, n_qt, qt)
    q_off, k_off, off, i1, m, lo, hi, _, _ = _query_block(seq, a, b, i0, qt, left, right)
    if i1 <= i0:
        return
    # The sequence owns columns k_off .. ncol - 1 of its rows.
    for r in range(i1 - i0):
        i = q_off + i0 + r
        c_lo = k_off + lo if r < m else ncol
        c_hi = k_off + hi if r < m else ncol
        if o_unit:
            orow = _row4(out, a, b, i)
            _fill(orow[k_off:c_lo], c_lo - k_off, ninf)
            _fill(orow[c_hi:], ncol - c_hi, ninf)
        else:
            for j in range(k_off, c_lo):
                out[a, b, i, j] = ninf
            for j in range(c_hi, ncol):
                out[a, b, i, j] = ninf
    if m == 0 or hi <= lo:
        return
    kb = b // group
    mp = (m + _MR - 1) // _MR * _MR
    # Rows [0, m4) are written in place on the direct path, the rest
    # through S.
    m4 = m - m % _MR if direct else 0
    qs, kp, s = _slot(qs_t, t), _slot(kp_t, t), _slot(s_t, t)
    for r in range(m, mp):
        _fill(qs[r], d, dt(0.0))
    _pack_rows(q, a, b, q_off + i0, m, qs)
    # The scale multiplies the products: folded into K, or in the bias /
    # mask pass when there is one, else while copying out.
    mul = dt(1.0) if has_bias or has_mask or pre else sc
    for j0 in range(lo, hi, kt):
        kn = min(kt, hi - j0)
        _pack_transposed_scaled(k, a, kb, k_off + j0, kn, kp, sc if pre else dt(1.0))
        # S is overwritten (no zeroing pass); only the columns each row
        # can see are read below.
        tri = i0 + off + right - j0 if right >= 0 else kn
        if m4 > 0:
            c = _out_rows(out, a, b, q_off + i0, k_off + j0, m4, ld)
            _gemm(qs, kp, c, m4, kn, d, tri, d, True)
            for r in range(m4):
                clo, chi = _row_range(i0 + r, j0, kn, off, left, right)
                crow = c[r]
                _fill(crow, clo, ninf)
                if not pre:
                    _scale_row(crow[clo:chi], chi - clo, sc)
                _fill(crow[chi:], kn - chi, ninf)
        if m4 < m:
            _gemm(qs[m4:], kp, s, mp - m4, kn, d, tri + m4, d, True)
        for r in range(m4, m):
            i = i0 + r
            srow = s[r - m4]
            clo, chi = _row_range(i, j0, kn, off, left, right)
            if has_bias or has_mask:
                qi = q_off + i
                _mask_row(srow, clo, chi, sc, bias, mask, a, b, qi, k_off + j0, has_bias, has_mask)
            if o_unit:
                orow = _row4(out, a, b, q_off + i)
                dst = orow[k_off + j0 : k_off + j0 + kn]
                _fill(dst, clo, ninf)
                _copy_scaled(srow[clo:chi], dst[clo:chi], chi - clo, mul)
                _fill(dst[chi:], kn - chi, ninf)
            else:
                for jj in range(kn):
                    x = srow[jj] * mul if clo <= jj < chi else ninf
                    out[a, b, q_off + i, k_off + j0 + jj] = x


@njit(**_OPTS)
def _scores_impl(
    q,
    k,
    out,
    bias,
    mask,
    seq,
    max_rows,
    has_bias,
    has_mask,
    scale,
    left,
    right,
    q_tile,
    k_tile,
    n_threads,
):
    """S = scale * Q K^T (+ bias, mask), -inf where the window / lengths
    hide a key. A work item is a query tile (:func:`_scores_item`): its Q
    rows are packed once, then each visible key tile is packed
    (transposed) and multiplied.

    * **Direct** (output rows with unit stride, no bias / mask, a row
      stride of at least a row): :func:`_gemm` writes the whole 4-row
      blocks straight into the output rows (:func:`_out_rows`); only the
      last m % 4 rows of a tile go through the scratch S. With
      |scale| <= 1 the scale is folded into the packed K tile (no extra
      pass; k * scale cannot overflow; a power of two, as 1/sqrt(d) for
      d = 4, 16, 64, 256, is exact but for subnormals, any other scale adds
      one rounding per element of K), else the written rows are scaled in
      place while they are in cache.
    * **Scratch** (otherwise): S tile in scratch, then copied out with the
      scale, bias and mask applied element-wise.
    """
    g1, g2, _, d = q.shape
    hk = k.shape[1]
    group = g2 // hk if hk > 0 else 1
    ncol = out.shape[3]
    qt, n_qt, n_items, nthr, chunk = _grid(g1, g2, max_rows, q_tile, n_threads)
    kt = max(k_tile, 1)
    dt = q.dtype.type
    sc = dt(scale)
    isz = out.itemsize
    o_unit = ncol <= 1 or out.strides[3] == isz
    ld = out.strides[2] // isz
    direct = (
        o_unit
        and not has_bias
        and not has_mask
        and out.strides[2] % isz == 0
        and ld >= max(ncol, 1)
    )
    pre = direct and abs(scale) <= 1.0
    # Scratch per thread (see _attention_impl); the direct path keeps S for
    # the last partial row block only.
    rows = (max(1, min(qt, max_rows)) + _MR - 1) // _MR * _MR
    ktn = max(1, min(kt, k.shape[2]))
    qs_t = np.empty((nthr, rows, d), dtype=dt)
    kp_t = np.empty((nthr, d, ktn), dtype=dt)
    s_t = np.empty((nthr, _MR if direct else rows, ktn), dtype=dt)
    for pos in prange(nthr * chunk):
        w = _work_item(pos, chunk, nthr)
        if w < n_items:
            _scores_item(
                w,
                (q, k, out, bias, mask, seq),
                (has_bias, has_mask, sc, pre, direct, left, right),
                (g2, group, qt, kt, n_qt),
                (qs_t, kp_t, s_t),
                get_thread_id(),
            )


@njit(**_OPTS)
def _softmax_impl(x, out):
    g1, g2, n = x.shape
    dt = x.dtype.type
    rows = g1 * g2
    isz = x.itemsize
    x_unit = n <= 1 or x.strides[2] == isz
    o_unit = n <= 1 or out.strides[2] == isz
    # Direct (exp straight into a unit-stride output row, then scaled in
    # place while still in L1/L2; no scratch row): 0.75-0.9x the time of a
    # scratch row at (4, 8, 512, 512) and (1, 8, 2048, 2048) float64. At
    # (1, 8, 2048, 2048) float32 (2 threads, Zen 4, alternated rounds) the
    # direct path with _vexp_sm's degree-5 exp took 0.86-1.07x (median
    # 0.93) the scratch path's time with the Cephes exp: faster while the
    # host's memory was busy, where the target fraction is missed, slower
    # while quiet, where the kernel reads at ~95 % of the stream anyway.
    # A strided output goes through buf.
    direct = o_unit
    # out is x itself (the API allows exact aliasing only): exp in place.
    same = x.ctypes.data == out.ctypes.data
    # A few rows per work item to amortise the scratch allocation.
    per = 8
    n_items = (rows + per - 1) // per
    for w in prange(n_items):
        buf = np.empty(0 if direct else n, dtype=dt)
        for row in range(w * per, min(rows, (w + 1) * per)):
            a = row // g2
            b = row % g2
            dst = _row3(out, a, b) if direct else buf
            if x_unit and not (same and direct):
                src = _row3(x, a, b)
                m = _rowmax(src, n)
                shift = m if m > dt(-np.inf) else dt(0.0)
                total = _exp_shift(src, dst, n, shift)
            else:
                if not (same and direct):  # strided x: gathered into dst
                    for j in range(n):
                        dst[j] = x[a, b, j]
                m = _rowmax(dst, n)
                shift = m if m > dt(-np.inf) else dt(0.0)
                total = _exp_shift_inplace(dst, n, shift)
            if total > dt(0.0):
                inv = dt(1.0) / total
                if direct:
                    _scale_row(dst, n, inv)
                elif o_unit:
                    _copy_scaled(buf, _row3(out, a, b), n, inv)
                else:
                    for j in range(n):
                        out[a, b, j] = buf[j] * inv
            elif total != total:
                for j in range(n):
                    out[a, b, j] = dt(np.nan)
            else:
                for j in range(n):
                    out[a, b, j] = dt(0.0)


# Query tiles per work item of the fused kernel (see _tile_group): at most
# _GROUP_MAX tiles of one head share each packed K / V tile, as long as their
# Q / O scratch stays within _GROUP_BYTES (L2) and every thread keeps at
# least _GROUP_ITEMS work items for the snake balancing.
_GROUP_MAX = 4
_GROUP_BYTES = 256 << 10
_GROUP_ITEMS = 8


@njit(nogil=True, cache=True)
def _tile_group(n_qt, heads, rows, width, itemsize, nthr):
    """Query tiles per work item of the fused kernel: the most (up to
    _GROUP_MAX) whose packed Q and O rows (``rows`` x ``width`` elements per
    tile) fit _GROUP_BYTES, leaving every one of ``nthr`` threads at least
    _GROUP_ITEMS items of the ``heads`` x ceil(n_qt / g) grid; 1 when the
    grid is too small to share."""
    g = max(1, min(_GROUP_MAX, n_qt, _GROUP_BYTES // max(1, rows * width * itemsize)))
    while g > 1 and heads * ((n_qt + g - 1) // g) < _GROUP_ITEMS * nthr:
        g -= 1
    return g


@njit(nogil=True, cache=True)
def _attention_start(q, outputs, seq, flags, a, b, tile0, nu, qt, state, info):
    """Sets up the nu query tiles from tile0 of head (a, b) of a forward
    work item: writes their padding rows, records each tile's first row,
    real rows and visible keys [lo, hi) in info, packs their Q rows and
    clears their O, m and l. Returns the union of their key ranges."""
    out, lse = outputs
    has_lse, _, _, _, left, right = flags
    qsg, og, mg, lg = state
    d = q.shape[3]
    dv = out.shape[3]
    dt = q.dtype.type
    ninf = dt(-np.inf)
    zero = dt(0.0)
    _, _, _, _, k_len, _ = _sequence(seq, a, b)
    lo = k_len
    hi = 0
    for u in range(nu):
        i0 = (tile0 + u) * qt
        q_off, _, _, i1, m, ulo, uhi, _, _ = _query_block(seq, a, b, i0, qt, left, right)
        info[u, 0] = i0
        info[u, 1] = 0
        info[u, 2] = 0
        info[u, 3] = 0
        if i1 <= i0:
            continue
        for i in range(q_off + i0 + m, q_off + i1):  # padding rows
            for c in range(dv):
                out[a, b, i, c] = zero
            if has_lse:
                lse[a, b, i] = ninf
        if m == 0:
            continue
        info[u, 1] = m
        info[u, 2] = ulo
        info[u, 3] = uhi
        mp = (m + _MR - 1) // _MR * _MR
        qs, o = qsg[u], og[u]
        for r in range(m, mp):
            _fill(qs[r], d, zero)
        for r in range(mp):
            _fill(o[r], dv, zero)
        _fill(mg[u], mp, ninf)
        _fill(lg[u], mp, zero)
        if uhi > ulo:
            _pack_rows(q, a, b, q_off + i0, m, qs)
            lo = min(lo, ulo)
            hi = max(hi, uhi)
    return lo, hi


@njit(nogil=True, cache=True, inline="always")
def _attention_block(data, flags, seq_row, tile, packed, state):
    """One query tile x one packed key tile of the forward: S = Q K^T, the
    mask step and the online-softmax step on each row's visible columns,
    then O += P V."""
    bias, mask = data
    _, has_bias, has_mask, sc, left, right = flags
    a, b, q_off, k_off, off = seq_row
    i0, m, j0, kn, vbad = tile
    qs, kp, vp, s, keep = packed
    o, mrow, lrow = state
    d = qs.shape[1]
    dv = vp.shape[1]
    dt = qs.dtype.type
    ninf = dt(-np.inf)
    mp = (m + _MR - 1) // _MR * _MR
    # The scale is applied in the exponentials, or by the mask step.
    mul = dt(1.0) if has_bias or has_mask else sc
    # Window / causal trimming of the products: row block r only needs
    # columns (and P @ V keys) < tri + r + 4. S is overwritten (no zeroing
    # pass): the row pass below zeroes every column of a real row outside
    # its visible range; padding rows (Q = 0) only reach padding rows of o,
    # never written out.
    tri = i0 + off + right - j0 if right >= 0 else kn
    _gemm(qs, kp, s, mp, kn, d, tri, d, True)
    for r in range(m):
        i = i0 + r
        srow = s[r]
        clo, chi = _row_range(i, j0, kn, off, left, right)
        if chi <= clo:
            _zero_row(srow, 0, kn)
            if vbad:
                _fill(keep[r], kn, False)
            continue
        if has_bias or has_mask:
            _mask_row(
                srow, clo, chi, sc, bias, mask, a, b, q_off + i, k_off + j0, has_bias, has_mask
            )
        if vbad:
            for jj in range(kn):
                keep[r, jj] = clo <= jj < chi and srow[jj] * mul != ninf
        # Through a C-contiguous slice: loops from 0 vectorise, loops from
        # a runtime start do not (negative-index wraparound).
        _online_softmax_step(srow[clo:chi], chi - clo, mul, mrow, lrow, r, o[r])
        _zero_row(srow, 0, clo)
        _zero_row(srow, chi, kn)
    if vbad:  # a NaN or inf value: P @ V key by key, skipping masked keys
        for r in range(m):
            for jj in range(kn):
                if keep[r, jj]:
                    _axpy(o[r], vp[jj], s[r, jj], dv)
    else:
        _gemm(s, vp, o, mp, dv, kn, dv, tri, False)


@njit(nogil=True, cache=True)
def _attention_finish(out, lse, has_lse, a, b, q_off, nu, info, state):
    """Writes the real rows of a forward work item's nu tiles: O / l, and
    lse = m + log(l) when asked."""
    og, mg, lg = state
    dv = out.shape[3]
    dt = out.dtype.type
    ninf = dt(-np.inf)
    zero = dt(0.0)
    for u in range(nu):
        i0, m = info[u, 0], info[u, 1]
        o, mrow, lrow = og[u], mg[u], lg[u]
        for r in range(m):
            i = q_off + i0 + r
            lsum = lrow[r]
            if lsum > zero:
                inv = dt(1.0) / lsum
                for c in range(dv):
                    out[a, b, i, c] = o[r, c] * inv
                if has_lse:
                    lse[a, b, i] = mrow[r] + dt(math.log(lsum))
            elif lsum != lsum:
                for c in range(dv):
                    out[a, b, i, c] = dt(np.nan)
                if has_lse:
                    lse[a, b, i] = dt(np.nan)
            else:
                for c in range(dv):
                    out[a, b, i, c] = zero
                if has_lse:
                    lse[a, b, i] = ninf


@njit(nogil=True, cache=True)
def _attention_item(w, data, outputs, flags, geometry, scratch, t):
    """Work item w of :func:`_attention_impl` on thread t: ng query tiles of
    one head (fewer at the end of a head), which share each packed K / V
    tile (the union of their key ranges; a tile skips key tiles outside its
    own)."""
    q, k, v, bias, mask, seq = data
    out, lse = outputs
    g2, group, qt, kt, n_qt, ng = geometry
    qs_t, kp_t, vp_t, s_t, o_t, m_t, l_t, keep_t, info_t = scratch
    dv = v.shape[3]
    n_gt = (n_qt + ng - 1) // ng
    hb = w // n_gt  # a * g2 + b
    tile0 = (w % n_gt) * ng
    nu = min(ng, n_qt - tile0)
    qsg, kp, vp, s = _slot(qs_t, t), _slot(kp_t, t), _slot(vp_t, t), _slot(s_t, t)
    og, mg, lg = _slot(o_t, t), _slot(m_t, t), _slot(l_t, t)
    keep, info = _slot(keep_t, t), _slot(info_t, t)
    vflat = vp.reshape(vp.size)
    a = hb // g2
    b = hb % g2
    kb = b // group
    q_off, _, _, k_off, _, off = _sequence(seq, a, b)
    lo, hi = _attention_start(q, outputs, seq, flags, a, b, tile0, nu, qt, (qsg, og, mg, lg), info)
    for j0 in range(lo, hi, kt):
        kn = min(kt, hi - j0)
        _pack_transposed(k, a, kb, k_off + j0, kn, kp)
        _pack_rows(v, a, kb, k_off + j0, kn, vp)
        # A NaN or inf value: P @ V key by key, skipping masked keys.
        vbad = not math.isfinite(_sum(vflat, kn * dv))
        for u in range(nu):
            i0, m = info[u, 0], info[u, 1]
            # Tiles of the item whose rows see none of these keys skip them
            # (their own key range starts later or ended earlier).
            if m == 0 or j0 >= info[u, 3] or j0 + kn <= info[u, 2]:
                continue
            _attention_block(
                (bias, mask),
                flags,
                (a, b, q_off, k_off, off),
                (i0, m, j0, kn, vbad),
                (qsg[u], kp, vp, s, keep),
                (og[u], mg[u], lg[u]),
            )
    _attention_finish(out, lse, flags[0], a, b, q_off, nu, info, (og, mg, lg))


@njit(**_OPTS)
def _attention_impl(
    q,
    k,
    v,
    out,
    lse,
    bias,
    mask,
    seq,
    max_rows,
    has_lse,
    has_bias,
    has_mask,
    scale,
    left,
    right,
    q_tile,
    k_tile,
    n_threads,
):
    """The fused forward: out (and lse) of softmax(scale * Q K^T (+ bias,
    mask)) V, one :func:`_attention_item` per work item."""
    g1, g2, _, d = q.shape
    hk = k.shape[1]
    group = g2 // hk if hk > 0 else 1
    dv = v.shape[3]
    qt, n_qt, _, nthr, _ = _grid(g1, g2, max_rows, q_tile, n_threads)
    kt = max(k_tile, 1)
    dt = q.dtype.type
    # Scratch per thread, allocated once per call and sized by the rows and
    # keys a work item can have (not a full tile): tiny items allocate nothing.
    rows = (max(1, min(qt, max_rows)) + _MR - 1) // _MR * _MR
    ktn = max(1, min(kt, k.shape[2]))
    # A work item is ng query tiles of one head (_tile_group): each K / V
    # tile is packed once for all of them (packing was ~10% of the time with
    # one tile per item). Q, O, m and l are per tile; S and keep are reused.
    ng = _tile_group(n_qt, g1 * g2, rows, d + dv, q.itemsize, nthr)
    n_gt = (n_qt + ng - 1) // ng
    n_items = g1 * g2 * n_gt
    chunk = (n_items + nthr - 1) // nthr
    qs_t = np.empty((nthr, ng, rows, d), dtype=dt)
    kp_t = np.empty((nthr, d, ktn), dtype=dt)
    vp_t = np.empty((nthr, ktn, dv), dtype=dt)
    s_t = np.empty((nthr, rows, ktn), dtype=dt)
    o_t = np.empty((nthr, ng, rows, dv), dtype=dt)
    m_t = np.empty((nthr, ng, rows), dtype=dt)
    l_t = np.empty((nthr, ng, rows), dtype=dt)
    keep_t = np.empty((nthr, rows, ktn), dtype=np.bool_)
    # Per tile of the item: first row i0, real rows m, visible keys [lo, hi).
    info_t = np.empty((nthr, ng, 4), dtype=np.int64)
    for pos in prange(nthr * chunk):
        w = _work_item(pos, chunk, nthr)
        if w < n_items:
            _attention_item(
                w,
                (q, k, v, bias, mask, seq),
                (out, lse),
                (has_lse, has_bias, has_mask, dt(scale), left, right),
                (g2, group, qt, kt, n_qt, ng),
                (qs_t, kp_t, vp_t, s_t, o_t, m_t, l_t, keep_t, info_t),
                get_thread_id(),
            )


@njit(**_OPTS)
def _merge_impl(o1, l1, o2, l2, out, lse):
    """out, lse = merge of (o1, l1) and (o2, l2); out/lse may be o1/l1."""
    g1, g2, nq, dv = out.shape
    dt = out.dtype.type
    ninf = dt(-np.inf)
    rows = g1 * g2 * nq
    per = 64
    for w in prange((rows + per - 1) // per):
        for row in range(w * per, min(rows, (w + 1) * per)):
            a = row // (g2 * nq)
            b = (row // nq) % g2
            i = row % nq
            x1 = l1[a, b, i]
            x2 = l2[a, b, i]
            if x1 != x1 or x2 != x2:
                for c in range(dv):
                    out[a, b, i, c] = dt(np.nan)
                lse[a, b, i] = dt(np.nan)
                continue
            mx = x1 if x1 > x2 else x2
            if mx == ninf:
                for c in range(dv):
                    out[a, b, i, c] = dt(0.0)
                lse[a, b, i] = ninf
                continue
            w1 = math.exp(float(x1) - float(mx))
            w2 = math.exp(float(x2) - float(mx))
            tot = w1 + w2
            c1 = dt(w1 / tot)
            c2 = dt(w2 / tot)
            for c in range(dv):
                out[a, b, i, c] = c1 * o1[a, b, i, c] + c2 * o2[a, b, i, c]
            lse[a, b, i] = dt(float(mx) + math.log(tot))


# ---------------------------------------------------------------------------
# Streaming split-K kernel (few queries over many keys; paged KV caches)
# ---------------------------------------------------------------------------


@njit(**_HOPTS)
def _scores_block(qs, r_lo, gm, nh, x, base, rs, hs, kn, sr, c0, d):
    """sr[i, c0 + j] = qs[i] . row (j, h) for i = r_lo + h * gm + r, h < nh, r < gm,
    j < kn, where row (j, h) is the d values at byte offset base + j * rs +
    h * hs of x (unit stride): nh key heads of gm query rows each. One call
    per block of keys (calls are not inlined: a call per key would cost more
    than its dot product). One key per pass (all heads of a row, then the
    next row), two query rows at a time: K is read in address order, whole
    rows of a (.., N, H, d) layout, which keeps the hardware prefetchers
    streaming; four keys per pass (rows 512 bytes apart, interleaved) read
    memory at ~0.7x the rate on Zen 4, and were no faster with 16 rows."""
    z = sr.dtype.type(0.0)
    pair = gm // 2 * 2
    for jj in range(kn):
        for h in range(nh):
            k0 = carray(_ptr_at(x, base + jj * rs + h * hs), d)
            r0 = r_lo + h * gm
            for r in range(r0, r0 + pair, 2):
                qa = qs[r]
                qb = qs[r + 1]
                a0 = b0 = z
                for p in range(d):
                    x0 = k0[p]
                    a0 += qa[p] * x0
                    b0 += qb[p] * x0
                sr[r, c0 + jj] = a0
                sr[r + 1, c0 + jj] = b0
            if pair < gm:
                r = r0 + gm - 1
                qr = qs[r]
                s0 = z
                for p in range(d):
                    s0 += qr[p] * k0[p]
                sr[r, c0 + jj] = s0


@njit(**_HOPTS)
def _pv_gemm(o, r_lo, r_hi, vb, kn, sr, c0, dv):
    """o[r_lo:r_hi] += sr[r_lo:r_hi, c0:c0 + kn] @ vb[:kn] for a C-contiguous
    (kn, dv) block vb of value rows and r_hi - r_lo a multiple of 4: the
    register block of :func:`_gemm_acc` (four output rows x four value rows,
    16 FMAs per 8 vector loads / stores), for many rows per key head."""
    kmain = kn - kn % 4
    for i in range(r_lo, r_hi, 4):
        for p in range(0, kmain, 4):
            a00 = sr[i, c0 + p]
            a01 = sr[i, c0 + p + 1]
            a02 = sr[i, c0 + p + 2]
            a03 = sr[i, c0 + p + 3]
            a10 = sr[i + 1, c0 + p]
            a11 = sr[i + 1, c0 + p + 1]
            a12 = sr[i + 1, c0 + p + 2]
            a13 = sr[i + 1, c0 + p + 3]
            a20 = sr[i + 2, c0 + p]
            a21 = sr[i + 2, c0 + p + 1]
            a22 = sr[i + 2, c0 + p + 2]
            a23 = sr[i + 2, c0 + p + 3]
            a30 = sr[i + 3, c0 + p]
            a31 = sr[i + 3, c0 + p + 1]
            a32 = sr[i + 3, c0 + p + 2]
            a33 = sr[i + 3, c0 + p + 3]
            for j in range(dv):
                b0 = vb[p, j]
                b1 = vb[p + 1, j]
                b2 = vb[p + 2, j]
                b3 = vb[p + 3, j]
                o[i, j] += a00 * b0 + a01 * b1 + a02 * b2 + a03 * b3
                o[i + 1, j] += a10 * b0 + a11 * b1 + a12 * b2 + a13 * b3
                o[i + 2, j] += a20 * b0 + a21 * b1 + a22 * b2 + a23 * b3
                o[i + 3, j] += a30 * b0 + a31 * b1 + a32 * b2 + a33 * b3
        for p in range(kmain, kn):
            a0 = sr[i, c0 + p]
            a1 = sr[i + 1, c0 + p]
            a2 = sr[i + 2, c0 + p]
            a3 = sr[i + 3, c0 + p]
            for j in range(dv):
                b = vb[p, j]
                o[i, j] += a0 * b
                o[i + 1, j] += a1 * b
                o[i + 2, j] += a2 * b
                o[i + 3, j] += a3 * b


@njit(**_HOPTS)
def _pv_block(o, r_lo, gm, nh, x, base, rs, hs, kn, sr, c0, dv, wide):
    """o[i] += sum_j sr[i, c0 + j] * row (j, h) for i = r_lo + h * gm + r, h < nh,
    r < gm, j < kn (rows as in :func:`_scores_block`). Not ``wide`` (few
    rows, bound by reading V): two value rows per pass, all heads, near
    address order (see :func:`_scores_block`). ``wide`` (many rows, bound by
    arithmetic): the 4 x 4 register block of :func:`_pv_gemm` for one head of
    contiguous value rows and gm a multiple of 4, else four value rows per
    pass. One output row per loop otherwise: with more, LLVM gives up its
    runtime alias checks and the loop is not vectorised."""
    if wide and nh == 1 and gm % 4 == 0 and (rs == dv * x.itemsize or kn <= 1):
        _pv_gemm(o, r_lo, r_lo + gm, carray(_ptr_at(x, base), (kn, dv)), kn, sr, c0, dv)
        return
    jj = 0
    if not wide:
        while jj + 2 <= kn:
            for h in range(nh):
                b = base + jj * rs + h * hs
                v0 = carray(_ptr_at(x, b), dv)
                v1 = carray(_ptr_at(x, b + rs), dv)
                for r in range(r_lo + h * gm, r_lo + (h + 1) * gm):
                    orow = o[r]
                    a0 = sr[r, c0 + jj]
                    a1 = sr[r, c0 + jj + 1]
                    for c in range(dv):
                        orow[c] += a0 * v0[c] + a1 * v1[c]
            jj += 2
    while jj + 4 <= kn:
        for h in range(nh):
            b = base + jj * rs + h * hs
            v0 = carray(_ptr_at(x, b), dv)
            v1 = carray(_ptr_at(x, b + rs), dv)
            v2 = carray(_ptr_at(x, b + 2 * rs), dv)
            v3 = carray(_ptr_at(x, b + 3 * rs), dv)
            for r in range(r_lo + h * gm, r_lo + (h + 1) * gm):
                orow = o[r]
                a0 = sr[r, c0 + jj]
                a1 = sr[r, c0 + jj + 1]
                a2 = sr[r, c0 + jj + 2]
                a3 = sr[r, c0 + jj + 3]
                for c in range(dv):
                    orow[c] += a0 * v0[c] + a1 * v1[c] + a2 * v2[c] + a3 * v3[c]
        jj += 4
    while jj < kn:
        for h in range(nh):
            v0 = carray(_ptr_at(x, base + jj * rs + h * hs), dv)
            for r in range(r_lo + h * gm, r_lo + (h + 1) * gm):
                orow = o[r]
                a0 = sr[r, c0 + jj]
                for c in range(dv):
                    orow[c] += a0 * v0[c]
        jj += 1


#: Rows from which one segment of the streaming kernel is read as two
#: streams (its halves).
_PAIR_MIN = 8


@njit(**_HOPTS)
def _scores_pair(qs, gm, nh, x, base0, base1, rs, hs, kn, sr, c0, c1, d):
    """:func:`_scores_block` (r_lo = 0) for two segments of kn keys at once,
    rows at base0 (columns c0 + j) and base1 (c1 + j): row j of each in turn,
    every K element read once, two address-ordered streams. A paged cache's
    blocks lie at unrelated addresses and the hardware prefetcher ramps up
    again at each; two blocks read together keep more lines in flight
    (plain reads of shuffled 64 KiB blocks, 1 thread, Zen 4: 1.29x the time
    of the same blocks in address order, 1.13x two at a time)."""
    z = sr.dtype.type(0.0)
    pair = gm // 2 * 2
    for jj in range(kn):
        for h in range(nh):
            k0 = carray(_ptr_at(x, base0 + jj * rs + h * hs), d)
            k1 = carray(_ptr_at(x, base1 + jj * rs + h * hs), d)
            r0 = h * gm
            for r in range(r0, r0 + pair, 2):
                qa = qs[r]
                qb = qs[r + 1]
                a0 = b0 = a1 = b1 = z
                for p in range(d):
                    x0 = k0[p]
                    x1 = k1[p]
                    a0 += qa[p] * x0
                    b0 += qb[p] * x0
                    a1 += qa[p] * x1
                    b1 += qb[p] * x1
                sr[r, c0 + jj] = a0
                sr[r + 1, c0 + jj] = b0
                sr[r, c1 + jj] = a1
                sr[r + 1, c1 + jj] = b1
            if pair < gm:
                r = r0 + gm - 1
                qr = qs[r]
                s0 = s1 = z
                for p in range(d):
                    s0 += qr[p] * k0[p]
                    s1 += qr[p] * k1[p]
                sr[r, c0 + jj] = s0
                sr[r, c1 + jj] = s1


@njit(**_HOPTS)
def _scores_quad(qs, gm, nh, x, b0, b1, b2, b3, rs, hs, kn, sr, c0, c1, c2, c3, d):
    """:func:`_scores_pair` for four segments."""
    z = sr.dtype.type(0.0)
    for jj in range(kn):
        for h in range(nh):
            k0 = carray(_ptr_at(x, b0 + jj * rs + h * hs), d)
            k1 = carray(_ptr_at(x, b1 + jj * rs + h * hs), d)
            k2 = carray(_ptr_at(x, b2 + jj * rs + h * hs), d)
            k3 = carray(_ptr_at(x, b3 + jj * rs + h * hs), d)
            for r in range(h * gm, (h + 1) * gm):
                qr = qs[r]
                s0 = s1 = s2 = s3 = z
                for p in range(d):
                    qp = qr[p]
                    s0 += qp * k0[p]
                    s1 += qp * k1[p]
                    s2 += qp * k2[p]
                    s3 += qp * k3[p]
                sr[r, c0 + jj] = s0
                sr[r, c1 + jj] = s1
                sr[r, c2 + jj] = s2
                sr[r, c3 + jj] = s3


@njit(**_HOPTS)
def _pv_quad(o, gm, nh, x, b0, b1, b2, b3, rs, hs, kn, sr, c0, c1, c2, c3, dv):
    """:func:`_pv_pair` for four segments."""
    for jj in range(kn):
        for h in range(nh):
            v0 = carray(_ptr_at(x, b0 + jj * rs + h * hs), dv)
            v1 = carray(_ptr_at(x, b1 + jj * rs + h * hs), dv)
            v2 = carray(_ptr_at(x, b2 + jj * rs + h * hs), dv)
            v3 = carray(_ptr_at(x, b3 + jj * rs + h * hs), dv)
            for r in range(h * gm, (h + 1) * gm):
                orow = o[r]
                a0 = sr[r, c0 + jj]
                a1 = sr[r, c1 + jj]
                a2 = sr[r, c2 + jj]
                a3 = sr[r, c3 + jj]
                for c in range(dv):
                    orow[c] += a0 * v0[c] + a1 * v1[c] + a2 * v2[c] + a3 * v3[c]


@njit(**_HOPTS)
def _pv_pair(o, gm, nh, x, base0, base1, rs, hs, kn, sr, c0, c1, dv):
    """The not ``wide`` :func:`_pv_block` (r_lo = 0) for two segments of kn
    value rows at once (as :func:`_scores_pair`): row j of each segment per
    pass over every output row."""
    for jj in range(kn):
        for h in range(nh):
            v0 = carray(_ptr_at(x, base0 + jj * rs + h * hs), dv)
            v1 = carray(_ptr_at(x, base1 + jj * rs + h * hs), dv)
            for r in range(h * gm, (h + 1) * gm):
                orow = o[r]
                a0 = sr[r, c0 + jj]
                a1 = sr[r, c1 + jj]
                for c in range(dv):
                    orow[c] += a0 * v0[c] + a1 * v1[c]


@njit(nogil=True, cache=True)
def _split_range(lo, hi, n_splits, s):
    """Keys [c0, c1) of split s when [lo, hi) is cut into n_splits chunks of
    ceil((hi - lo) / n_splits) keys (the last ones may be short or empty)."""
    c = (hi - lo + n_splits - 1) // n_splits
    c0 = min(hi, lo + s * c)
    return c0, min(hi, c0 + c)


#: Partial elements (rows x splits x dv) up to which the streaming kernel
#: merges its splits serially.
_SERIAL_MERGE = 1 << 16


@njit(nogil=True, cache=True)
def _merge_split_rows(po, pl, out, lse, seq, has_lse, wm, per):
    """Rows wm * per .. (wm + 1) * per of the (G1, G2, rows) grid: the splits'
    partials merged into out / lse (merge_attention's math, split order)."""
    ns, g1, g2, max_rows, dv = po.shape
    dt = out.dtype.type
    zero = dt(0.0)
    ninf = dt(-np.inf)
    n_rows = g1 * g2 * max_rows
    for row in range(wm * per, min(n_rows, (wm + 1) * per)):
        a = row // (g2 * max_rows)
        hh = (row // max_rows) % g2
        il = row % max_rows
        q_off, q_len, _, _, _, _ = _sequence(seq, a, hh)
        if il >= q_len:
            continue
        i = q_off + il
        mx = -np.inf
        nan = False
        for sp in range(ns):
            x = float(pl[sp, a, hh, il])
            if x != x:
                nan = True
            elif x > mx:
                mx = x
        if nan:
            for c in range(dv):
                out[a, hh, i, c] = dt(np.nan)
            if has_lse:
                lse[a, hh, i] = dt(np.nan)
            continue
        if mx == -np.inf:
            for c in range(dv):
                out[a, hh, i, c] = zero
            if has_lse:
                lse[a, hh, i] = ninf
            continue
        tot = 0.0
        for sp in range(ns):
            tot += math.exp(float(pl[sp, a, hh, il]) - mx)
        for c in range(dv):
            out[a, hh, i, c] = zero
        for sp in range(ns):
            x = float(pl[sp, a, hh, il])
            if x == -np.inf:
                continue
            wgt = dt(math.exp(x - mx) / tot)
            for c in range(dv):
                out[a, hh, i, c] += wgt * po[sp, a, hh, il, c]
        if has_lse:
            lse[a, hh, i] = dt(mx + math.log(tot))


@njit(nogil=True, cache=True)
def _decode_scores(k, table, a, kh0, kh1, gm, k_start, kn, qs, sr, kbuf):
    """Scores of one block of the streaming kernel: sr[:, :kn] for keys
    k_start .. k_start + kn - 1 of key heads kh0 .. kh1 - 1 (gm query rows
    per head), read per contiguous segment of the cache, each K row once
    for all rows."""
    d = k.shape[3]
    bs = max(1, k.shape[1])
    k_unit = d <= 1 or k.strides[3] == k.itemsize
    nh = kh1 - kh0
    jj = 0
    while jj < kn:
        p0 = k_start + jj
        blk = table[a, p0 // bs]
        r0 = p0 % bs
        seg = min(kn - jj, bs - r0)
        if k_unit:  # all heads, row by row
            kbase = blk * k.strides[0] + r0 * k.strides[1] + kh0 * k.strides[2]
            ks1, ks2 = k.strides[1], k.strides[2]
            if seg == bs and kn - jj >= 4 * bs:  # four blocks (paged)
                e1 = table[a, (p0 + bs) // bs] * k.strides[0] + kh0 * k.strides[2]
                e2 = table[a, (p0 + 2 * bs) // bs] * k.strides[0] + kh0 * k.strides[2]
                e3 = table[a, (p0 + 3 * bs) // bs] * k.strides[0] + kh0 * k.strides[2]
                _scores_quad(
                    qs, gm, nh, k, kbase, e1, e2, e3, ks1, ks2, seg, sr,
                    jj, jj + seg, jj + 2 * seg, jj + 3 * seg, d,
                )  # fmt: skip
                seg *= 4
            elif min(kn - jj - seg, bs) == seg:  # the next block too (paged)
                b2 = table[a, (p0 + seg) // bs] * k.strides[0] + kh0 * k.strides[2]
                _scores_pair(qs, gm, nh, k, kbase, b2, ks1, ks2, seg, sr, jj, jj + seg, d)
                seg *= 2
            elif seg >= 2 * _PAIR_MIN:  # its two halves
                hf = seg // 2
                b2 = kbase + hf * ks1
                _scores_pair(qs, gm, nh, k, kbase, b2, ks1, ks2, hf, sr, jj, jj + hf, d)
                if seg > 2 * hf:
                    b3 = kbase + 2 * hf * ks1
                    _scores_block(qs, 0, gm, nh, k, b3, ks1, ks2, 1, sr, jj + 2 * hf, d)
            else:
                _scores_block(qs, 0, gm, nh, k, kbase, ks1, ks2, seg, sr, jj, d)
        else:
            for kh in range(kh0, kh1):
                for jc in range(seg):
                    for p in range(d):
                        kbuf[jc, p] = k[blk, r0 + jc, kh, p]
                rl = (kh - kh0) * gm
                kr = kbuf.strides[0]
                _scores_block(qs, rl, gm, 1, kbuf, 0, kr, 0, seg, sr, jj, d)
        jj += seg


@njit(nogil=True, cache=True)
def _decode_pv(v, table, a, kh0, kh1, gm, k_start, kn, wide, o, sr, vbuf):
    """P @ V of one block of the streaming kernel where every row sees
    every key: o[r] += sr[r, :kn] @ V rows k_start .. k_start + kn - 1, per
    contiguous segment, each V row read once for all rows."""
    dv = v.shape[3]
    bs = max(1, v.shape[1])
    v_unit = dv <= 1 or v.strides[3] == v.itemsize
    nh = kh1 - kh0
    jj = 0
    while jj < kn:
        p0 = k_start + jj
        blk = table[a, p0 // bs]
        r0 = p0 % bs
        seg = min(kn - jj, bs - r0)
        if v_unit:
            vbase = blk * v.strides[0] + r0 * v.strides[1] + kh0 * v.strides[2]
            vs1, vs2 = v.strides[1], v.strides[2]
            if not wide and seg == bs and kn - jj >= 4 * bs:  # four blocks (paged)
                e1 = table[a, (p0 + bs) // bs] * v.strides[0] + kh0 * v.strides[2]
                e2 = table[a, (p0 + 2 * bs) // bs] * v.strides[0] + kh0 * v.strides[2]
                e3 = table[a, (p0 + 3 * bs) // bs] * v.strides[0] + kh0 * v.strides[2]
                _pv_quad(
                    o, gm, nh, v, vbase, e1, e2, e3, vs1, vs2, seg, sr,
                    jj, jj + seg, jj + 2 * seg, jj + 3 * seg, dv,
                )  # fmt: skip
                seg *= 4
            elif not wide and min(kn - jj - seg, bs) == seg:  # paged: two blocks
                b2 = table[a, (p0 + seg) // bs] * v.strides[0] + kh0 * v.strides[2]
                _pv_pair(o, gm, nh, v, vbase, b2, vs1, vs2, seg, sr, jj, jj + seg, dv)
                seg *= 2
            elif not wide and seg >= 2 * _PAIR_MIN:  # its two halves
                hf = seg // 2
                b2 = vbase + hf * vs1
                _pv_pair(o, gm, nh, v, vbase, b2, vs1, vs2, hf, sr, jj, jj + hf, dv)
                if seg > 2 * hf:
                    b3 = vbase + 2 * hf * vs1
                    _pv_block(o, 0, gm, nh, v, b3, vs1, vs2, 1, sr, jj + 2 * hf, dv, wide)
            else:
                _pv_block(o, 0, gm, nh, v, vbase, vs1, vs2, seg, sr, jj, dv, wide)
        else:
            for kh in range(kh0, kh1):
                for jc in range(seg):
                    for c in range(dv):
                        vbuf[jc, c] = v[blk, r0 + jc, kh, c]
                rl = (kh - kh0) * gm
                vr = vbuf.strides[0]
                _pv_block(o, rl, gm, 1, vbuf, 0, vr, 0, seg, sr, jj, dv, wide)
        jj += seg


@njit(nogil=True, cache=True)
def _decode_pv_masked(v, table, a, kh0, kh1, gm, k_start, kn, masked, o, sr, vbuf, rng, keep):
    """P @ V of one block of the streaming kernel key by key: row r takes
    key jj only inside its columns [rng[0, r], rng[1, r]) and, when
    ``masked``, where keep[r, jj]; a key no row sees is never read."""
    dv = v.shape[3]
    bs = max(1, v.shape[1])
    v_unit = dv <= 1 or v.strides[3] == v.itemsize
    for jj in range(kn):
        p0 = k_start + jj
        blk = table[a, p0 // bs]
        r0 = p0 % bs
        for kh in range(kh0, kh1):
            rl = (kh - kh0) * gm
            if v_unit:
                vo = blk * v.strides[0] + r0 * v.strides[1] + kh * v.strides[2]
                v0 = carray(_ptr_at(v, vo), dv)
            else:
                for c in range(dv):
                    vbuf[0, c] = v[blk, r0, kh, c]
                v0 = vbuf[0]
            for r in range(rl, rl + gm):
                if rng[0, r] <= jj < rng[1, r]:
                    if masked and not keep[r, jj]:
                        continue
                    _axpy(o[r], v0, sr[r, jj], dv)


@njit(nogil=True, cache=True)
def _decode_softmax(data, flags, seq_row, block, sr, keep, rng, state):
    """The online softmax of one block of the streaming kernel: per row r
    its visible columns [clo, chi) into rng, the mask step (keep[r]: the
    columns it leaves finite), then the online-softmax step."""
    bias, mask = data
    has_bias, has_mask, sc, left, right = flags
    a, h0, q_off, k_off, off = seq_row
    i0, m, nr, j0, kn = block
    o, mrow, lrow = state
    ninf = sr.dtype.type(-np.inf)
    masked = has_bias or has_mask
    mul = sr.dtype.type(1.0) if masked else sc
    for r in range(nr):
        i = i0 + r % m
        clo, chi = _row_range(i, j0, kn, off, left, right)
        if chi < clo:
            chi = clo
        rng[0, r] = clo
        rng[1, r] = chi
        if chi == clo:
            continue
        srow = sr[r]
        if masked:
            hh = h0 + r // m
            _mask_row(
                srow, clo, chi, sc, bias, mask, a, hh, q_off + i, k_off + j0, has_bias, has_mask
            )
            for jc in range(clo, chi):
                keep[r, jc] = srow[jc] != ninf
        _online_softmax_step(srow[clo:chi], chi - clo, mul, mrow, lrow, r, o[r])


@njit(nogil=True, cache=True)
def _decode_finish(outputs, has_lse, ns, s, a, h0, q_off, i0, m, nr, state):
    """Writes one split's rows of the streaming kernel: O / l and its lse,
    final (one split) or split s's partial."""
    out, lse, po, pl = outputs
    o, mrow, lrow = state
    dv = out.shape[3]
    dt = out.dtype.type
    zero = dt(0.0)
    for r in range(nr):
        hh = h0 + r // m
        il = i0 + r % m
        lsum = lrow[r]
        if lsum > zero:
            inv = dt(1.0) / lsum
            lval = mrow[r] + dt(math.log(lsum))
        elif lsum != lsum:
            inv = dt(np.nan)
            lval = dt(np.nan)
        else:
            inv = zero
            lval = dt(-np.inf)
        orow = o[r]
        if ns == 1:
            for c in range(dv):
                out[a, hh, q_off + il, c] = orow[c] * inv
            if has_lse:
                lse[a, hh, q_off + il] = lval
        else:
            for c in range(dv):
                po[s, a, hh, il, c] = orow[c] * inv
            pl[s, a, hh, il] = lval


@njit(nogil=True, cache=True)
def _decode_item(w, data, outputs, flags, geometry, scratch, t):
    """Work item w of :func:`_decode_impl` on thread t: split s of the
    visible keys of query tile qti of key heads kh0 .. kh1 - 1 of sequence
    a, every query head of those key heads being its rows."""
    q, k, v, table, bias, mask, seq = data
    out, lse, _, _ = outputs
    has_lse, has_bias, has_mask, sc, left, right = flags
    group, qt, kt, n_qt, ns, hpi, wide_rows = geometry
    qs_t, s_t, keep_t, o_t, m_t, l_t, lo_t, kb_t, vb_t = scratch
    d = q.shape[3]
    dv = v.shape[3]
    hk = k.shape[2]
    dt = q.dtype.type
    zero = dt(0.0)
    s = w % ns
    qti = (w // ns) % n_qt
    n_hg = (hk + hpi - 1) // hpi
    kh0 = ((w // (ns * n_qt)) % n_hg) * hpi
    kh1 = min(hk, kh0 + hpi)
    a = w // (ns * n_qt * n_hg)
    h0 = kh0 * group
    i0 = qti * qt
    # The table is constant over heads (the API builds it so).
    q_off, k_off, off, i1, m, lo, hi, in_lo, in_hi = _query_block(seq, a, h0, i0, qt, left, right)
    if i1 <= i0:
        return
    if s == 0:  # padding rows, written once
        for hh in range(h0, kh1 * group):
            for i in range(q_off + i0 + m, q_off + i1):
                for c in range(dv):
                    out[a, hh, i, c] = zero
                if has_lse:
                    lse[a, hh, i] = dt(-np.inf)
    if m == 0:
        return
    gm = group * m  # rows per key head
    wide = gm >= wide_rows  # register blocking for many rows per key head
    nr = (kh1 - kh0) * gm
    qs, sr, keep, o = _slot(qs_t, t), _slot(s_t, t), _slot(keep_t, t), _slot(o_t, t)
    mrow, lrow, rng = _slot(m_t, t), _slot(l_t, t), _slot(lo_t, t)
    kbuf, vbuf = _slot(kb_t, t), _slot(vb_t, t)
    j_lo, j_hi = _split_range(lo, hi, ns, s)
    for r in range(nr):
        _fill(o[r], dv, zero)
    _fill(mrow, nr, dt(-np.inf))
    _fill(lrow, nr, zero)
    if j_hi > j_lo:
        for r in range(nr):
            hh = h0 + r // m
            i = q_off + i0 + r % m
            for p in range(d):
                qs[r, p] = q[a, hh, i, p]
    masked = has_bias or has_mask
    j0 = j_lo
    while j0 < j_hi:
        # A block of kn keys, possibly spanning several cache blocks
        # (pages): scores and P @ V run per contiguous segment.
        kn = min(kt, j_hi - j0)
        _decode_scores(k, table, a, kh0, kh1, gm, k_off + j0, kn, qs, sr, kbuf)
        _decode_softmax(
            (bias, mask),
            (has_bias, has_mask, sc, left, right),
            (a, h0, q_off, k_off, off),
            (i0, m, nr, j0, kn),
            sr,
            keep,
            rng,
            (o, mrow, lrow),
        )
        if not masked and in_lo <= j0 and j0 + kn <= in_hi:  # every row sees every key
            _decode_pv(v, table, a, kh0, kh1, gm, k_off + j0, kn, wide, o, sr, vbuf)
        else:  # key by key, never touching a key a row cannot see
            _decode_pv_masked(
                v, table, a, kh0, kh1, gm, k_off + j0, kn, masked, o, sr, vbuf, rng, keep
            )
        j0 += kn
    _decode_finish(outputs, has_lse, ns, s, a, h0, q_off, i0, m, nr, (o, mrow, lrow))


@njit(**_OPTS)
def _decode_impl(
    q,
    k,
    v,
    table,
    out,
    lse,
    bias,
    mask,
    seq,
    max_rows,
    has_lse,
    has_bias,
    has_mask,
    scale,
    left,
    right,
    num_splits,
    heads_per_item,
    q_tile,
    k_tile,
    wide_rows,
    n_threads,
):
    """Streaming attention: K and V rows read in place, keys split into
    ``num_splits`` chunks merged in the same call (see the module docstring,
    "Streaming split-K kernel"). k / v are (blocks, block_size, Hk, d / dv):
    a paged cache with its ``table``, or a dense (G1, Hk, Nk, d) array viewed
    as (G1, Nk, Hk, d) with table[a, 0] = a. One :func:`_decode_item` per
    work item."""
    g1, g2, _, d = q.shape
    hk = k.shape[2]
    group = g2 // hk if hk > 0 else 1
    dv = v.shape[3]
    dt = q.dtype.type
    ns = max(1, num_splits)
    qt = max(1, min(q_tile, max_rows))
    n_qt = (max_rows + qt - 1) // qt
    kt = max(1, k_tile)
    hpi = max(1, min(heads_per_item, hk))
    n_hg = (hk + hpi - 1) // hpi
    n_items = g1 * n_hg * n_qt * ns
    nthr = max(1, n_threads)
    chunk = (n_items + nthr - 1) // nthr
    rmax = hpi * group * qt
    qs_t = np.empty((nthr, rmax, d), dtype=dt)
    s_t = np.empty((nthr, rmax, kt), dtype=dt)
    keep_t = np.empty((nthr, rmax, kt), dtype=np.bool_)
    o_t = np.empty((nthr, rmax, dv), dtype=dt)
    m_t = np.empty((nthr, rmax), dtype=dt)
    l_t = np.empty((nthr, rmax), dtype=dt)
    lo_t = np.empty((nthr, 2, rmax), dtype=np.int64)
    # Unit-stride rows are read in place; others are packed per block.
    k_unit = d <= 1 or k.strides[3] == k.itemsize
    v_unit = dv <= 1 or v.strides[3] == v.itemsize
    kb_t = np.empty((nthr, kt if not k_unit else 1, d), dtype=dt)
    vb_t = np.empty((nthr, kt if not v_unit else 1, dv), dtype=dt)
    # Partials of the splits: (split, G1, G2, rows, dv) and their lse.
    pn = ns if ns > 1 else 0
    po = np.empty((pn, g1, g2, max_rows, dv), dtype=dt)
    pl = np.empty((pn, g1, g2, max_rows), dtype=dt)
    for pos in prange(nthr * chunk):
        w = _work_item(pos, chunk, nthr)
        if w < n_items:
            _decode_item(
                w,
                (q, k, v, table, bias, mask, seq),
                (out, lse, po, pl),
                (has_lse, has_bias, has_mask, dt(scale), left, right),
                (group, qt, kt, n_qt, ns, hpi, wide_rows),
                (qs_t, s_t, keep_t, o_t, m_t, l_t, lo_t, kb_t, vb_t),
                get_thread_id(),
            )
    if ns == 1:
        return
    # Merge the splits of every real row (merge_attention's math, fixed order).
    # A few partials (decoding: heads x queries rows) are merged on this
    # thread: a second parallel loop would cost a second fork / join, which
    # on a shared host waits whenever either thread is descheduled.
    n_rows = g1 * g2 * max_rows
    per = 16
    n_w = (n_rows + per - 1) // per
    if n_rows * ns * dv <= _SERIAL_MERGE:
        for wm in range(n_w):
            _merge_split_rows(po, pl, out, lse, seq, has_lse, wm, per)
    else:
        for wm in prange(n_w):
            _merge_split_rows(po, pl, out, lse, seq, has_lse, wm, per)


#: The kernels; their arguments are described (and built) by numbattn.cpu.args.
scores_kernel = OneLayoutKernel(_scores_impl, ScoresArgs, _SERIAL_OPTS)
softmax_kernel = OneLayoutKernel(_softmax_impl, SoftmaxArgs, _SERIAL_OPTS)
attention_kernel = OneLayoutKernel(_attention_impl, AttentionArgs, _SERIAL_OPTS)
merge_kernel = OneLayoutKernel(_merge_impl, MergeArgs, _SERIAL_OPTS)
decode_kernel = OneLayoutKernel(_decode_impl, DecodeArgs, _SERIAL_OPTS)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
#
# FlashAttention-2's backward, deterministic and without atomics, in three
# parallel loops of one kernel:
#
# 1. over (a, h, query tile): D = rowsum(dout * out) of every real row into
#    ``delta``, and zeroing of the dQ accumulators;
# 2. over (a, key head, slice): each work item owns a fixed set of key tiles
#    (dealt to the ``splits`` slices in snake order, for balance under
#    causal / windows) and, per key tile, streams every query tile of every
#    query head of the group that sees it: S = Q K^T, P = exp(scale*S (+
#    bias) - lse) (0 where masked), dP = dO V^T, dS = P * (dP - D),
#    dV += P^T dO, dK += dS^T Q (kept in scratch for the key tile: no race
#    across the group) and dQ_slice += dS K into the slice's own accumulator;
# 3. over (a, h, query tile): dq = scale * sum over slices (fixed order).
#
# With one slice per key head (enough key heads for the threads), 1 and 3
# run inside loop 2's work items, on the query heads of the item's key head
# (before and after its key tiles): one parallel loop per call, the same
# arithmetic in the same order.
#
# Five products per (query tile, key tile), all on packed tiles through the
# register-blocked micro-kernel shared with the forward (_make_block_kernel:
# explicit LLVM vectors, 4 rows x 4 vectors of C held in registers over the
# whole k loop; 2x the former _gemm_acc on P^T dO and dS^T Q, 1.3x on dS K,
# at the BLAS's single-core rate on Zen 4), P^T dO and dS^T Q reading P and dS
# transposed in place (no transposed copies); dS K reads K's rows in place
# when they have unit stride, K^T and V^T are packed by register transposes
# (:func:`_pack_transposed_scaled`, s = 1). On tiles cut by the diagonal the
# row pass stays on whole vectors: exp up to the vector holding a row's last
# visible key (zeroed past it afterwards), dS only as far as the trimmed
# products read it (the diagonal tile costs ~0.6 of a full one; the five
# products alone ~0.55). The
# accumulators hold splits x (real rows, d) per head: splits is 1 when there
# are enough key heads for the threads, so memory stays O(N). Results are
# bitwise reproducible for a given thread count (splits depends on it).
#
# Masked pairs never leak: P is exactly 0 there, dS is forced to 0 where P
# is 0 (dP may be NaN for a masked key's NaN value), rows with no visible
# key (lse -inf) and padding rows are packed as zeros, and a key tile with
# a non-finite key accumulates dS K key by key over P > 0 (as the forward
# does for values).


@njit(**_HOPTS)
def _ds_row(p, dp, n, dd):
    """dp[j] = p[j] * (dp[j] - dd) for j < n, exactly 0 where p[j] == 0 (a
    masked key's dP may be NaN: its value must not reach the gradients)."""
    zero = p.dtype.type(0.0)
    for j in range(n):
        x = p[j] * (dp[j] - dd)
        dp[j] = x if p[j] != zero else zero


@njit(**_HOPTS)
def _dot(x, y, n):
    total = x.dtype.type(0.0)
    for j in range(n):
        total += x[j] * y[j]
    return total


@njit(nogil=True, cache=True)
def _bwd_slice_owner(t, splits):
    """The slice that owns key tile t (snake order over the slices)."""
    r = t // splits
    c = t % splits
    return c if r % 2 == 0 else splits - 1 - c


@njit(nogil=True, cache=True)
def _bwd_prepare(dout, out, delta, acc, a, b, i, m, r0, r1):
    """Loop 1's work for rows i .. i + m of q[a, b] (absolute row indices):
    D = rowsum(dout * out) into ``delta``, and zeroed dQ accumulator rows
    r0 .. r1 of every slice."""
    dvn = out.shape[3]
    zero = acc.dtype.type(0.0)
    d_unit = dvn <= 1 or (dout.strides[3] == dout.itemsize and out.strides[3] == out.itemsize)
    for r in range(i, i + m):
        if d_unit:
            delta[a, b, r] = _dot(_row4(dout, a, b, r), _row4(out, a, b, r), dvn)
        else:
            tot = zero
            for c in range(dvn):
                tot += dout[a, b, r, c] * out[a, b, r, c]
            delta[a, b, r] = tot
    for s_ in range(acc.shape[0]):
        for r in range(r0, r1):
            _fill(acc[s_, r], acc.shape[2], zero)


@njit(nogil=True, cache=True)
def _bwd_finish(acc, dq, a, b, i, n, m, row, sc):
    """Loop 3's work for rows i .. i + n of dq[a, b] (absolute row indices):
    scale * (the sum of the slices' accumulator rows row, row + 1 ...; fixed
    order) for the first m, zeros for the rest."""
    d = dq.shape[3]
    zero = dq.dtype.type(0.0)
    ns = acc.shape[0]
    dq_unit = _unit_rows(dq)
    for r in range(n):
        if r >= m:
            for c in range(d):
                dq[a, b, i + r, c] = zero
            continue
        if ns > 1:
            first = acc[0, row + r]
            for s_ in range(1, ns):
                _axpy(first, acc[s_, row + r], dq.dtype.type(1.0), d)
        if dq_unit:
            _copy_scaled(acc[0, row + r], _row4(dq, a, b, i + r), d, sc)
        else:
            for c in range(d):
                dq[a, b, i + r, c] = acc[0, row + r, c] * sc


@njit(nogil=True, cache=True)
def _bwd_rows(x, a, b, i, n):
    """Rows i .. i + n - 1 of x[a, b] in place, as a C-contiguous (n, ld)
    view, ld x's row stride in elements (>= the row length, unit inner
    stride): only the first x.shape[3] columns of a row are x's."""
    ld = x.strides[2] // x.itemsize
    byte = a * x.strides[0] + b * x.strides[1] + i * x.strides[2]
    return carray(_ptr_at(x, byte), (n, ld))


@njit(nogil=True, cache=True)
def _bwd_query_tile(data, flags, seq_row, tile, packed, dqs):
    """One query tile x one key tile of the backward: S = Q K^T and dP = dO
    V^T, then per row P = exp(scale * S (+ bias) - lse) (0 where masked) and
    dS = P * (dP - D); dQ_slice (dqs) += dS K, dV += P^T dO, dK += dS^T Q."""
    q, lse, dout, delta, bias, mask = data
    has_bias, has_mask, sc, left, right, kbad = flags
    a, b, q_off, k_off, off = seq_row
    i0, m, j0, kn = tile
    qs, dos, s, dp, ktr, kr, vt, dka, dva = packed
    d = q.shape[3]
    dvn = dout.shape[3]
    dt = q.dtype.type
    ninf = dt(-np.inf)
    zero = dt(0.0)
    knp = (kn + _MR - 1) // _MR * _MR
    mp = (m + _MR - 1) // _MR * _MR
    _pack_rows(q, a, b, q_off + i0, m, qs)
    _pack_rows(dout, a, b, q_off + i0, m, dos)
    for r in range(mp):  # padding rows, rows with no visible key
        if r >= m or lse[a, b, q_off + i0 + r] == ninf:
            _fill(qs[r], d, zero)
            _fill(dos[r], dvn, zero)
    # S and dP are overwritten, no zeroing pass: columns past a row block's
    # trimmed range keep stale values, which the row pass below zeroes (S)
    # or never uses (dP where P is 0); columns kn .. knp only reach padding
    # rows of the dK / dV scratch, which are never written out.
    tri = i0 + off + right - j0 if right >= 0 else kn
    _gemm(qs, ktr, s, mp, kn, d, tri, d, True)
    _gemm(dos, vt, dp, mp, kn, dvn, tri, dvn, True)
    lanes = _lanes(s)
    for r in range(mp):
        srow = s[r]
        i = i0 + r
        lv = lse[a, b, q_off + i] if r < m else ninf
        clo, chi = _row_range(i, j0, kn, off, left, right)
        if chi <= clo or lv == ninf:
            _zero_row(srow, 0, kn)
            _zero_row(dp[r], 0, kn)
            continue
        mul = sc
        if has_bias or has_mask:
            _mask_row(
                srow, clo, chi, sc, bias, mask, a, b, q_off + i, k_off + j0, has_bias, has_mask
            )
            mul = dt(1.0)
        # Whole vectors (a scalar tail costs more than the extra lanes),
        # zeroed past chi below.
        ce = min(kn, (chi + lanes - 1) // lanes * lanes)
        _exp_scaled_inplace(srow[clo:ce], ce - clo, mul, lv)
        _zero_row(srow, 0, clo)
        _zero_row(srow, chi, kn)
        # dS only up to where the trimmed products read it: dS K takes
        # columns < chi + 3 of this row, P^T dO and dS^T Q (4-key blocks
        # from a 4-row floor) < chi + 6.
        ce = min(kn, (chi + 6 + lanes) // lanes * lanes)
        _ds_row(srow, dp[r], ce, delta[a, b, q_off + i])
    if kbad:  # a NaN or inf key: dS K key by key over P > 0 only
        for r in range(m):
            for jj in range(kn):
                if s[r, jj] != zero:
                    _axpy(dqs[r], kr[jj], dp[r, jj], d)
    else:
        _gemm(dp, kr, dqs, mp, d, kn, d, tri, False)
    _gemm_tn(s, dos, dva, knp, dvn, mp, tri)
    _gemm_tn(dp, qs, dka, knp, d, mp, tri)


@njit(nogil=True, cache=True)
def _bwd_store_keys(dk, dv, a, kb, k_start, kw, kn, sc, dka, dva):
    """Rows k_start .. k_start + kw - 1 of dk / dv[a, kb]: scale * dK and dV
    for the first kn (the real keys), zeros for the rest."""
    d = dk.shape[3]
    dvn = dv.shape[3]
    zero = dk.dtype.type(0.0)
    dk_unit = _unit_rows(dk)
    dv_unit = _unit_rows(dv)
    for jj in range(kw):
        j = k_start + jj
        if jj < kn and dk_unit:
            _copy_scaled(dka[jj], _row4(dk, a, kb, j), d, sc)
        elif jj < kn:
            for c in range(d):
                dk[a, kb, j, c] = dka[jj, c] * sc
        if jj < kn and dv_unit:
            _copy(dva[jj], _row4(dv, a, kb, j), dvn)
        elif jj < kn:
            for c in range(dvn):
                dv[a, kb, j, c] = dva[jj, c]
        if jj >= kn:
            for c in range(d):
                dk[a, kb, j, c] = zero
            for c in range(dvn):
                dv[a, kb, j, c] = zero


@njit(nogil=True, cache=True)
def _bwd_key_tile(data, grads, flags, a, kb, sl, j0, geometry, packed):
    """Key tile j0 of key head (a, kb), owned by slice sl: dK and dV over
    every query tile of every query head of the group that sees it, dQ into
    the slice's accumulator."""
    q, k, v, _, lse, dout, delta, bias, mask, seq = data
    _, dk, dv, acc, base = grads
    has_bias, has_mask, sc, left, right, _ = flags
    group, qtt, kt, key_rows, k_rows = geometry
    qs, dos, s, dp, ktr, kr, vt, dka, dva = packed
    d = q.shape[3]
    dvn = v.shape[3]
    dt = q.dtype.type
    zero = dt(0.0)
    b0 = kb * group
    _, _, _, k_off, k_len, _ = _sequence(seq, a, b0)
    kw = min(kt, max(k_len, key_rows) - j0)  # rows of dk / dv this tile writes
    kn = max(0, min(kw, k_len - j0))  # real keys among them
    knp = (kn + _MR - 1) // _MR * _MR
    for jj in range(knp):
        _fill(dka[jj], d, zero)
        _fill(dva[jj], dvn, zero)
    kbad = False
    if kn > 0:
        # K^T and V^T by register transposes (exact with s = 1): 1.3-2.5x
        # faster than _pack_transposed on cold rows.
        _pack_transposed_scaled(k, a, kb, k_off + j0, kn, ktr, dt(1.0))
        _pack_transposed_scaled(v, a, kb, k_off + j0, kn, vt, dt(1.0))
        # dS K reads K's rows in place when they are unit-stride (no second
        # pass over the tile), else a packed copy.
        if k_rows:
            kr = _bwd_rows(k, a, kb, k_off + j0, kn)
        else:
            _pack_rows(k, a, kb, k_off + j0, kn, kr)
        # A NaN or inf key: dQ += dS K key by key over P > 0 only.
        ksum = zero
        for c in range(d):
            ksum += _sum(ktr[c], kn)
        kbad = not math.isfinite(ksum)
    for g in range(group if kn > 0 else 0):
        b = b0 + g
        q_off, _, off, ilo, ihi = _key_block(seq, a, b, j0, kn, left, right)
        ilo -= ilo % _MR
        ab = base[a, b]
        for i0 in range(ilo, ihi, qtt):
            m = min(qtt, ihi - i0)
            mp = (m + _MR - 1) // _MR * _MR
            _bwd_query_tile(
                (q, lse, dout, delta, bias, mask),
                (has_bias, has_mask, sc, left, right, kbad),
                (a, b, q_off, k_off, off),
                (i0, m, j0, kn),
                (qs, dos, s, dp, ktr, kr, vt, dka, dva),
                acc[sl, ab + i0 : ab + i0 + mp],
            )
    _bwd_store_keys(dk, dv, a, kb, k_off + j0, kw, kn, sc, dka, dva)


@njit(nogil=True, cache=True)
def _bwd_key_item(w, data, grads, flags, geometry, scratch, t):
    """Work item w of the backward's loop 2 on thread t: slice sl of key
    head (a, kb), its key tiles (snake order over the slices) and, fused,
    loops 1 and 3 for the group's query heads."""
    _, k, _, out, _, dout, delta, _, _, seq = data
    dq, _, _, acc, base = grads
    sc, fused = flags[2], flags[5]
    group, _, kt, key_rows, k_rows = geometry
    qs_t, do_t, s_t, dp_t, kt_t, kr_t, vt_t, dka_t, dva_t = scratch
    hk = k.shape[1]
    ns = acc.shape[0]
    a = w // (hk * ns)
    kb = (w // ns) % hk
    sl = w % ns
    b0 = kb * group
    _, _, _, _, k_len, _ = _sequence(seq, a, b0)
    krows = max(k_len, key_rows)
    qs, dos, s, dp = _slot(qs_t, t), _slot(do_t, t), _slot(s_t, t), _slot(dp_t, t)
    ktr = _slot(kt_t, t)
    kr = _bwd_rows(k, a, kb, 0, 0) if k_rows else _slot(kr_t, t)
    vt, dka, dva = _slot(vt_t, t), _slot(dka_t, t), _slot(dva_t, t)
    if fused:  # loop 1 for the group's query heads
        for g in range(group):
            b = b0 + g
            q_off, q_len, _, _, _, _ = _sequence(seq, a, b)
            r1 = base[a, b] + (q_len + _MR - 1) // _MR * _MR
            _bwd_prepare(dout, out, delta, acc, a, b, q_off, q_len, base[a, b], r1)
    for ti in range((krows + kt - 1) // kt):
        if _bwd_slice_owner(ti, ns) == sl:
            _bwd_key_tile(
                data,
                grads,
                flags,
                a,
                kb,
                sl,
                ti * kt,
                geometry,
                (qs, dos, s, dp, ktr, kr, vt, dka, dva),
            )
    if fused:  # loop 3 for the group's query heads: every key tile is done
        for g in range(group):
            b = b0 + g
            q_off, q_len, q_rows, _, _, _ = _sequence(seq, a, b)
            _bwd_finish(acc, dq, a, b, q_off, q_rows, q_len, base[a, b], sc)


@njit(**_OPTS)
def _attention_backward_impl(
    q,
    k,
    v,
    out,
    lse,
    dout,
    delta,
    dq,
    dk,
    dv,
    bias,
    mask,
    seq,
    max_rows,
    key_rows,
    max_keys,
    has_bias,
    has_mask,
    scale,
    left,
    right,
    q_tile,
    k_tile,
    splits,
    n_threads,
):
    """The backward (see the notes above): loops 1 and 3 per query tile,
    loop 2 one :func:`_bwd_key_item` per work item."""
    g1, g2, _, d = q.shape
    hk = k.shape[1]
    group = g2 // hk if hk > 0 else 1
    dvn = v.shape[3]
    dt = q.dtype.type
    sc = dt(scale)
    ns = max(1, splits)
    # Query tiles start at multiples of 4 so that the padding rows of a
    # tile's dQ product never land on another tile's rows.
    qtt = (max(q_tile, 1) + _MR - 1) // _MR * _MR
    kt = max(k_tile, 1)
    qt_, n_qt, n_items, nthr, chunk = _grid(g1, g2, max_rows, qtt, n_threads)
    # dQ accumulators: per slice, the real rows of every (a, h), each block
    # padded to a multiple of 4 rows.
    base = np.empty((g1, g2), dtype=np.int64)
    total = 0
    for a in range(g1):
        for b in range(g2):
            base[a, b] = total
            total += (_sequence(seq, a, b)[1] + _MR - 1) // _MR * _MR
    acc = np.empty((ns, total, d), dtype=dt)

    # One slice per key head (enough key heads for the threads): loops 1 and
    # 3 run inside loop 2's work items, each on the query heads of its key
    # head, so a call is one parallel loop (one fork / join, not three: on a
    # shared 2-core host a join waits whenever either thread is descheduled,
    # which cost the short causal calls more than the long ones).
    fused = ns == 1 and hk > 0 and hk * group == g2

    # 1. D = rowsum(dout * out); zero the accumulators.
    if not fused:
        for pos in prange(nthr * chunk):
            w = _work_item(pos, chunk, nthr)
            if w >= n_items:
                continue
            a, b, i0 = _tile_origin(w, g2, n_qt, qt_)
            q_off, q_len, _, _, _, _ = _sequence(seq, a, b)
            m = max(0, min(i0 + qt_, q_len) - i0)
            if m == 0:
                continue
            r0 = base[a, b] + i0
            r1 = min(base[a, b] + (q_len + _MR - 1) // _MR * _MR, r0 + qtt)
            _bwd_prepare(dout, out, delta, acc, a, b, q_off + i0, m, r0, r1)

    # 2. dK, dV per key tile; dQ per slice.
    krows_max = max(max_keys, 0)
    n_kitems = g1 * hk * ns
    kchunk = (n_kitems + nthr - 1) // nthr
    rows = (max(1, min(qtt, max_rows)) + _MR - 1) // _MR * _MR
    ktn = max(1, min(kt, krows_max))
    ktp = (ktn + _MR - 1) // _MR * _MR
    qs_t = np.empty((nthr, rows, d), dtype=dt)
    do_t = np.empty((nthr, rows, dvn), dtype=dt)
    s_t = np.empty((nthr, rows, ktp), dtype=dt)
    dp_t = np.empty((nthr, rows, ktp), dtype=dt)
    kt_t = np.empty((nthr, d, ktn), dtype=dt)
    k_rows = _unit_rows(k) and k.strides[2] % k.itemsize == 0 and k.strides[2] >= d * k.itemsize
    kr_t = np.empty((nthr if not k_rows else 0, ktn, d), dtype=dt)
    vt_t = np.empty((nthr, dvn, ktn), dtype=dt)
    dka_t = np.empty((nthr, ktp, d), dtype=dt)
    dva_t = np.empty((nthr, ktp, dvn), dtype=dt)
    for pos in prange(nthr * kchunk):
        w = _work_item(pos, kchunk, nthr)
        if w < n_kitems:
            _bwd_key_item(
                w,
                (q, k, v, out, lse, dout, delta, bias, mask, seq),
                (dq, dk, dv, acc, base),
                (has_bias, has_mask, sc, left, right, fused),
                (group, qtt, kt, key_rows, k_rows),
                (qs_t, do_t, s_t, dp_t, kt_t, kr_t, vt_t, dka_t, dva_t),
                get_thread_id(),
            )

    # 3. dq = scale * (sum of the slices' accumulators), zeros past Q_LEN.
    if not fused:
        for pos in prange(nthr * chunk):
            w = _work_item(pos, chunk, nthr)
            if w >= n_items:
                continue
            a, b, i0 = _tile_origin(w, g2, n_qt, qt_)
            q_off, q_len, q_rows, _, _, _ = _sequence(seq, a, b)
            if i0 >= q_rows:
                continue
            i1 = min(i0 + qt_, q_rows)
            m = max(0, min(i1, q_len) - i0)
            _bwd_finish(acc, dq, a, b, q_off + i0, i1 - i0, m, base[a, b] + i0, sc)


attention_backward_kernel = OneLayoutKernel(
    _attention_backward_impl, AttentionBackwardArgs, _SERIAL_OPTS
)
