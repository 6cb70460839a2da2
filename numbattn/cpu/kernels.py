"""CPU kernels: tiled, packed, register-blocked Numba code.

Every kernel takes arrays with exactly two leading batch dimensions (G1, G2)
and arbitrary strides (including 0), writes every element of its outputs and
validates nothing.

Design
------
* **One specialisation per dtype.** The public names (``scores_kernel``,
  ``softmax_kernel``, ``attention_kernel``) are thin :class:`_OneLayoutKernel`
  wrappers around ordinary ``@njit(parallel=True, nogil=True, cache=True)``
  dispatchers. On the first call for a dtype the wrapper compiles (or loads
  from the on-disk cache) the signature in which every array is typed as
  Numba's generic ``'A'`` layout (inputs additionally ``readonly``), and from
  then on calls that compiled entry point directly. C-contiguous, strided,
  transposed, broadcast (stride-0) and read-only arrays therefore all run the
  same machine code, and patching the tile sizes never recompiles. Attribute
  access (``.signatures``, ``.py_func``, ``.inspect_asm`` ...) is forwarded to
  the dispatcher.
* **Packing.** Every kernel copies the tiles it needs from the (arbitrarily
  strided) inputs into small C-contiguous scratch buffers allocated inside the
  parallel work item, so all hot loops see unit stride: Q tile (pre-scaled by
  ``scale``, rows padded to a multiple of 4 with zeros), K tile transposed
  (d x kt), V tile (kt x dv).
* **Micro-kernel** (:func:`_gemm_acc`): C[:M, :N] += A[:M, :K] @ B[:K, :N]
  for C-contiguous A, B, C with M a multiple of 4. Four rows of C and four
  K-steps at a time: the 16 A scalars are hoisted into broadcast registers and
  the unit-stride loop over N (vectorised by LLVM to zmm FMAs) loads 4 B
  vectors and updates 4 C rows with 16 FMAs. Used for S = Qs @ Kt and
  O += P @ V. Under causal masking key tiles entirely above the diagonal are
  never visited, and inside the diagonal tiles each 4-row block trims its
  column range (S) and key range (P @ V) to what those rows can see.
* **Row views.** When an array's last axis has unit stride, rows are read
  and written through C-contiguous ``carray`` views built from the data
  pointer (``_row3``/``_row4``), so softmax and the scores output stream with
  vector loads/stores; otherwise a strided scalar loop is used.
* **Vectorised exp** (:func:`_exp_shift`): exp(x - shift) written as plain
  arithmetic (Cody-Waite range reduction, Cephes minimax polynomial for
  float32, degree-12 Taylor for float64, 2**n by building the exponent bits
  with an integer shift + bitcast) in a branch-free loop that LLVM vectorises.
  -inf and underflow give exactly 0, NaN gives NaN. The row sum is fused in.
* **Row max** uses ``llvm.maxnum`` (ignores NaN, vectorises as a reduction);
  NaN is propagated through the exp and the sums instead.
* **fastmath** is never the Numba ``True`` set: only
  ``{'contract', 'reassoc', 'nsz', 'arcp', 'afn'}`` (no nnan/ninf), applied to
  the helper loops; the kernels themselves are compiled without fastmath.
"""

import functools
import math

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

_FM = frozenset({"contract", "reassoc", "nsz", "arcp", "afn"})
_OPTS = dict(parallel=True, nogil=True, cache=True, fastmath=False)
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
def _bits_to_float(typingctx, a):
    """Reinterpret an int32 as float32 or an int64 as float64."""
    out = types.float32 if a.bitwidth == 32 else types.float64
    sig = out(a)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(out))

    return sig, codegen


# ---------------------------------------------------------------------------
# Vectorisable helpers
# ---------------------------------------------------------------------------


@njit(**_HOPTS)
def _rowmax(x, n):
    """max(x[:n]) ignoring NaN; -inf when n == 0 or all are -inf/NaN."""
    m = x.dtype.type(-np.inf)
    for j in range(n):
        m = _maxnum(m, x[j])
    return m


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


@njit(**_HOPTS)
def _exp_shift(src, dst, n, shift):
    """dst[j] = exp(src[j] - shift) for j < n; returns the sum (NaN-propagating).

    src and dst must not overlap (use _exp_shift_inplace)."""
    total = src.dtype.type(0.0)
    for j in range(n):
        e = _vexp(src[j] - shift)
        dst[j] = e
        total += e
    return total


@njit(**_HOPTS)
def _exp_shift_inplace(x, n, shift):
    """x[j] = exp(x[j] - shift) for j < n; returns the sum (NaN-propagating)."""
    total = x.dtype.type(0.0)
    for j in range(n):
        e = _vexp(x[j] - shift)
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
def _copy_masked(src, dst, lim, n):
    """dst[:lim] = src[:lim]; dst[lim:n] = -inf."""
    for j in range(lim):
        dst[j] = src[j]
    for j in range(lim, n):
        dst[j] = -np.inf


@njit(**_HOPTS)
def _copy_scaled(src, dst, n, s):
    for j in range(n):
        dst[j] = src[j] * s


@njit(**_HOPTS)
def _gemm_acc(A, B, C, M, NN, KK, ntri, ktri):
    """C[:M, :N] += A[:M, :K] @ B[:K, :N]; M must be a multiple of 4.

    A, B, C are C-contiguous 2-D scratch arrays. Causal trimming: the row
    block starting at i only uses columns j < ntri + i + 4 (and only
    k-indices p < ktri + i + 4); pass ntri >= N, ktri >= K for a full product.
    """
    for i in range(0, M, 4):
        N = min(NN, max(0, ntri + i + 4))
        K = min(KK, max(0, ktri + i + 4))
        kmain = K - K % 4
        for p in range(0, kmain, 4):
            a00 = A[i, p]
            a01 = A[i, p + 1]
            a02 = A[i, p + 2]
            a03 = A[i, p + 3]
            a10 = A[i + 1, p]
            a11 = A[i + 1, p + 1]
            a12 = A[i + 1, p + 2]
            a13 = A[i + 1, p + 3]
            a20 = A[i + 2, p]
            a21 = A[i + 2, p + 1]
            a22 = A[i + 2, p + 2]
            a23 = A[i + 2, p + 3]
            a30 = A[i + 3, p]
            a31 = A[i + 3, p + 1]
            a32 = A[i + 3, p + 2]
            a33 = A[i + 3, p + 3]
            for j in range(N):
                b0 = B[p, j]
                b1 = B[p + 1, j]
                b2 = B[p + 2, j]
                b3 = B[p + 3, j]
                C[i, j] += a00 * b0 + a01 * b1 + a02 * b2 + a03 * b3
                C[i + 1, j] += a10 * b0 + a11 * b1 + a12 * b2 + a13 * b3
                C[i + 2, j] += a20 * b0 + a21 * b1 + a22 * b2 + a23 * b3
                C[i + 3, j] += a30 * b0 + a31 * b1 + a32 * b2 + a33 * b3
        for p in range(kmain, K):
            a0 = A[i, p]
            a1 = A[i + 1, p]
            a2 = A[i + 2, p]
            a3 = A[i + 3, p]
            for j in range(N):
                b = B[p, j]
                C[i, j] += a0 * b
                C[i + 1, j] += a1 * b
                C[i + 2, j] += a2 * b
                C[i + 3, j] += a3 * b


@njit(**_HOPTS)
def _scale_row(x, n, s):
    for j in range(n):
        x[j] *= s


@njit(**_HOPTS)
def _zero_row(x, n0, n1):
    for j in range(n0, n1):
        x[j] = 0


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _tile_of(w, g2, n_qt, causal):
    """Work item -> (a, b, query tile index). Under causal masking the tiles
    of one head are interleaved cheap/expensive so that a static split of the
    work range stays balanced."""
    a = w // (g2 * n_qt)
    b = (w // n_qt) % g2
    t = w % n_qt
    if causal:
        t = t // 2 if t % 2 == 0 else n_qt - 1 - t // 2
    return a, b, t


@njit(**_OPTS)
def _scores_impl(q, k, out, scale, causal, q_tile, k_tile):
    g1, g2, nq, d = q.shape
    nk = k.shape[2]
    offset = nk - nq
    qt = max(q_tile, 1)
    kt = max(k_tile, 1)
    n_qt = (nq + qt - 1) // qt
    dt = q.dtype.type
    sc = dt(scale)
    ninf = dt(-np.inf)
    qt_pad = (qt + _MR - 1) // _MR * _MR
    o_unit = nk <= 1 or out.strides[3] == out.itemsize
    for w in prange(g1 * g2 * n_qt):
        a, b, t = _tile_of(w, g2, n_qt, causal)
        i0 = t * qt
        i1 = min(i0 + qt, nq)
        m = i1 - i0
        mp = (m + _MR - 1) // _MR * _MR
        qs = np.zeros((qt_pad, d), dtype=dt)
        kp = np.empty((d, kt), dtype=dt)
        s = np.empty((qt_pad, kt), dtype=dt)
        for r in range(m):
            for p in range(d):
                qs[r, p] = q[a, b, i0 + r, p] * sc
        kmax = nk
        if causal:
            kmax = max(0, min(nk, i1 + offset))
        for j0 in range(0, kmax, kt):
            kn = min(kt, nk - j0)
            for jj in range(kn):
                for p in range(d):
                    kp[p, jj] = k[a, b, j0 + jj, p]
            for r in range(mp):
                _zero_row(s[r], 0, kn)
            _gemm_acc(qs, kp, s, mp, kn, d, kn, d)
            for r in range(m):
                i = i0 + r
                if causal:
                    lim = min(kn, max(0, i + offset - j0 + 1))
                else:
                    lim = kn
                if o_unit:
                    orow = _row4(out, a, b, i)
                    _copy_masked(s[r], orow[j0:], lim, kn)
                else:
                    for jj in range(lim):
                        out[a, b, i, j0 + jj] = s[r, jj]
                    for jj in range(lim, kn):
                        out[a, b, i, j0 + jj] = ninf
        jstart = (kmax + kt - 1) // kt * kt
        for r in range(m):
            for j in range(jstart, nk):
                out[a, b, i0 + r, j] = ninf


@njit(**_OPTS)
def _softmax_impl(x, out):
    g1, g2, n = x.shape
    dt = x.dtype.type
    rows = g1 * g2
    isz = x.itemsize
    x_unit = n <= 1 or x.strides[2] == isz
    o_unit = n <= 1 or out.strides[2] == isz
    # A few rows per work item to amortise the scratch allocation.
    per = 8
    n_items = (rows + per - 1) // per
    for w in prange(n_items):
        buf = np.empty(n, dtype=dt)
        for row in range(w * per, min(rows, (w + 1) * per)):
            a = row // g2
            b = row % g2
            m = dt(-np.inf)
            if x_unit:
                src = _row3(x, a, b)
                m = _rowmax(src, n)
                shift = m if m > dt(-np.inf) else dt(0.0)
                total = _exp_shift(src, buf, n, shift)
            else:
                for j in range(n):
                    buf[j] = x[a, b, j]
                m = _rowmax(buf, n)
                shift = m if m > dt(-np.inf) else dt(0.0)
                total = _exp_shift_inplace(buf, n, shift)
            if total > dt(0.0):
                inv = dt(1.0) / total
                if o_unit:
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


@njit(**_OPTS)
def _attention_impl(q, k, v, out, lse, scale, causal, q_tile, k_tile):
    g1, g2, nq, d = q.shape
    nk = k.shape[2]
    dv = v.shape[3]
    offset = nk - nq
    qt = max(q_tile, 1)
    kt = max(k_tile, 1)
    n_qt = (nq + qt - 1) // qt
    dt = q.dtype.type
    sc = dt(scale)
    ninf = dt(-np.inf)
    zero = dt(0.0)
    qt_pad = (qt + _MR - 1) // _MR * _MR
    for w in prange(g1 * g2 * n_qt):
        a, b, t = _tile_of(w, g2, n_qt, causal)
        i0 = t * qt
        i1 = min(i0 + qt, nq)
        m = i1 - i0
        mp = (m + _MR - 1) // _MR * _MR
        qs = np.zeros((qt_pad, d), dtype=dt)
        kp = np.empty((d, kt), dtype=dt)
        vp = np.empty((kt, dv), dtype=dt)
        s = np.zeros((qt_pad, kt), dtype=dt)
        o = np.zeros((qt_pad, dv), dtype=dt)
        mrow = np.full(qt_pad, ninf, dtype=dt)
        lrow = np.zeros(qt_pad, dtype=dt)
        for r in range(m):
            for p in range(d):
                qs[r, p] = q[a, b, i0 + r, p] * sc
        kmax = nk
        if causal:
            kmax = max(0, min(nk, i1 + offset))
        for j0 in range(0, kmax, kt):
            kn = min(kt, kmax - j0)
            for jj in range(kn):
                for p in range(d):
                    kp[p, jj] = k[a, b, j0 + jj, p]
            for jj in range(kn):
                for c in range(dv):
                    vp[jj, c] = v[a, b, j0 + jj, c]
            for r in range(mp):
                _zero_row(s[r], 0, kn)
            tri = i0 + offset - j0 if causal else kn
            _gemm_acc(qs, kp, s, mp, kn, d, tri, d)
            for r in range(m):
                srow = s[r]
                if causal:
                    lim = min(kn, max(0, i0 + r + offset - j0 + 1))
                else:
                    lim = kn
                if lim == 0:
                    _zero_row(srow, 0, kn)
                    continue
                m_old = mrow[r]
                m_new = _maxnum(m_old, _rowmax(srow, lim))
                shift = m_new if m_new > ninf else zero
                if m_old > ninf:
                    alpha = dt(math.exp(m_old - m_new))
                else:
                    alpha = zero
                tot = _exp_shift_inplace(srow, lim, shift)
                _zero_row(srow, lim, kn)
                lrow[r] = lrow[r] * alpha + tot
                mrow[r] = m_new
                if alpha != dt(1.0):
                    _scale_row(o[r], dv, alpha)
            _gemm_acc(s, vp, o, mp, dv, kn, dv, tri)
        for r in range(m):
            i = i0 + r
            l = lrow[r]
            if l > zero:
                inv = dt(1.0) / l
                for c in range(dv):
                    out[a, b, i, c] = o[r, c] * inv
                lse[a, b, i] = mrow[r] + dt(math.log(l))
            elif l != l:
                for c in range(dv):
                    out[a, b, i, c] = dt(np.nan)
                lse[a, b, i] = dt(np.nan)
            else:
                for c in range(dv):
                    out[a, b, i, c] = zero
                lse[a, b, i] = ninf


# ---------------------------------------------------------------------------
# One 'A'-layout specialisation per dtype
# ---------------------------------------------------------------------------


class _OneLayoutKernel:
    """Callable wrapper that runs one 'A'-layout specialisation per dtype.

    ``arg_kinds`` describes the positional arguments: ``'in'`` (read-only
    array), ``'out'`` (writable array) or a Numba scalar type. Calls whose
    arrays do not all share one float dtype fall back to the dispatcher.
    """

    def __init__(self, dispatcher, arg_kinds):
        self._dispatcher = dispatcher
        self._kinds = arg_kinds
        self._entry = {}
        functools.update_wrapper(self, dispatcher.py_func)

    def signature_for(self, dtype):
        """The Numba signature compiled for ``dtype``."""
        nbt = types.float32 if np.dtype(dtype) == np.float32 else types.float64
        sig = []
        for kind in self._kinds:
            if isinstance(kind, tuple):
                role, ndim = kind
                sig.append(types.Array(nbt, ndim, "A", readonly=(role == "in")))
            else:
                sig.append(kind)
        return tuple(sig)

    def _compile(self, dtype):
        sig = self.signature_for(dtype)
        self._dispatcher.compile(sig)
        fn = self._dispatcher.overloads[sig].entry_point
        self._entry[dtype] = fn
        return fn

    def __call__(self, *args):
        dtype = args[0].dtype
        fn = self._entry.get(dtype)
        if fn is None:
            if dtype != np.float32 and dtype != np.float64:
                return self._dispatcher(*args)
            fn = self._compile(dtype)
        for arg, kind in zip(args, self._kinds):
            if isinstance(kind, tuple) and arg.dtype != dtype:
                return self._dispatcher(*args)
        return fn(*args)

    def __getattr__(self, name):
        return getattr(self._dispatcher, name)

    def __repr__(self):
        return f"<numbattn CPU kernel {self.__name__}>"


_I4, _O4, _I3, _O3 = ("in", 4), ("out", 4), ("in", 3), ("out", 3)

scores_kernel = _OneLayoutKernel(
    _scores_impl, (_I4, _I4, _O4, types.float64, types.boolean, types.int64, types.int64)
)
softmax_kernel = _OneLayoutKernel(_softmax_impl, (_I3, _O3))
attention_kernel = _OneLayoutKernel(
    _attention_impl,
    (_I4, _I4, _I4, _O4, _O3, types.float64, types.boolean, types.int64, types.int64),
)
