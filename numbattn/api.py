"""Public functions: validate, pick the backend, prepare buffers, launch.

Validation (numbattn._checks) runs completely before any output is touched,
and is the same code for host and GPU arrays, so both backends raise the same
errors. Kernels (numbattn.cpu, numbattn.cuda) validate nothing.
"""

from __future__ import annotations

from typing import Any

from . import _checks as chk
from ._layout import BatchPlan

__all__ = ["attention", "scores", "softmax"]

#: A numpy.ndarray, or a GPU array exposing ``__cuda_array_interface__``
#: (CuPy array, PyTorch CUDA tensor, Numba device array).
Array = Any


def _backend(on_device: bool):
    if on_device:
        from .cuda import backend

        backend.require_cuda()
        return backend
    from .cpu import backend

    return backend


def _prepare(named: dict[str, Any]):
    """Shadows for every non-None argument, and whether they are on the GPU."""
    shadows, where = {}, {}
    for name, obj in named.items():
        if obj is not None:
            shadows[name], where[name] = chk.shadow(name, obj)
    return shadows, chk.check_same_device(where)


def _launch(backend, kernel, leading, objs, shadows, stream, *extra):
    """Run ``kernel`` once per outer batch index on (G1, G2, ...) views."""
    arrays = [backend.as_kernel_array(o, stream) for o in objs]
    plan = BatchPlan(leading, shadows)
    for views in plan.views(arrays, shadows, backend.index, backend.restride):
        kernel(*views, *extra, stream=stream)


def _output(backend, name, obj, shadow, shape, dtype, like, stream):
    """The caller's buffer, or a new one in the caller's array library."""
    if obj is not None:
        return obj, shadow
    obj, _ = backend.empty(shape, dtype, like=like, stream=stream)
    return obj, chk.shadow(name, obj)[0]


def scores(
    q: Array,
    k: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    out: Array | None = None,
    stream: Any = None,
) -> Array:
    """Scaled pairwise scores ``S = scale * q @ k^T`` per batch element.

    Parameters
    ----------
    q : array, shape (..., Nq, d)
        Queries; float32 or float64, any strides, any number of leading
        batch dimensions (typically (B, H)).
    k : array, shape (..., Nk, d)
        Keys; same leading dimensions, d and dtype as ``q``.
    scale : float, optional
        Multiplier of the dot products; default ``1/sqrt(d)``.
    causal : bool, default False
        Set ``S[..., i, j] = -inf`` where ``j > i + (Nk - Nq)``
        (bottom-right alignment, as FlashAttention >= 2.1).
    out : array, shape (..., Nq, Nk), optional
        Buffer to write into (same dtype and device as the inputs, writeable,
        not overlapping them). Returned.
    stream : optional
        CUDA stream for GPU inputs (Numba stream, or a CuPy/PyTorch stream);
        default: the current stream of the inputs' library. Must be None for
        host arrays.

    Returns
    -------
    array, shape (..., Nq, Nk)
        ``out`` if given, else a new array of the inputs' kind (NumPy, CuPy,
        PyTorch, or a Numba device array).

    Raises
    ------
    TypeError
        Non-array arguments, dtypes other than float32/float64, mixed dtypes,
        host and GPU arrays mixed, non-real ``scale``, non-bool ``causal``.
    ValueError
        Wrong ndim, mismatched leading dimensions or d, ``out`` of the wrong
        shape, read-only or overlapping an input, non-finite ``scale``.
    """
    shadows, on_device = _prepare({"q": q, "k": k, "out": out})
    sq, sk = shadows["q"], shadows["k"]
    dtype = chk.check_dtype("q", sq)
    chk.check_dtype("k", sk, dtype)
    chk.check_ndim("q", sq, 2, "(..., Nq, d)")
    chk.check_ndim("k", sk, 2, "(..., Nk, d)")
    leading = sq.shape[:-2]
    chk.check_leading("k", sk, leading, "q", 2)
    chk.check_dim("k", sk.shape[-1], sq.shape[-1], "last dimension d =", "q")
    scale = chk.check_scale(scale, sq.shape[-1])
    causal = chk.check_flag("causal", causal)
    shape = leading + (sq.shape[-2], sk.shape[-2])
    if out is not None:
        chk.check_output("out", shadows["out"], shape, dtype, {"q": sq, "k": sk})
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (q, k))
    out, sout = _output(backend, "out", out, shadows.get("out"), shape, dtype, q, stream)
    if sout.size:
        _launch(
            backend, backend.scores, leading, (q, k, out), (sq, sk, sout), stream, scale, causal
        )
    return out


def softmax(x: Array, *, out: Array | None = None, stream: Any = None) -> Array:
    """Numerically stable softmax over the last axis.

    ``out[..., j] = exp(x[..., j] - m) / sum_j exp(x[..., j] - m)`` with
    ``m`` the row maximum. A row that is entirely -inf gives zeros (never
    NaN); a row containing NaN gives NaN, and no other row is affected.

    Parameters
    ----------
    x : array, shape (..., N)
        float32 or float64, at least one dimension, any strides.
    out : array, shape (..., N), optional
        Buffer to write into; may be ``x`` itself (in place), but must not
        partly overlap it. Returned.
    stream : optional
        CUDA stream for GPU input (see :func:`scores`).

    Returns
    -------
    array, shape (..., N)
        ``out`` if given, else a new array of the input's kind.

    Raises
    ------
    TypeError
        Non-array ``x`` or ``out``, unsupported or mismatched dtype, host
        and GPU arrays mixed.
    ValueError
        0-d ``x``; ``out`` of the wrong shape, read-only, or partly
        overlapping ``x``.
    """
    shadows, on_device = _prepare({"x": x, "out": out})
    sx = shadows["x"]
    dtype = chk.check_dtype("x", sx)
    chk.check_ndim("x", sx, 1, "(..., N)")
    if out is not None:
        chk.check_output("out", shadows["out"], sx.shape, dtype, {"x": sx}, in_place_ok="x")
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (x,))
    out, sout = _output(backend, "out", out, shadows.get("out"), sx.shape, dtype, x, stream)
    if sout.size:
        _launch(backend, backend.softmax, sx.shape[:-1], (x, out), (sx, sout), stream)
    return out


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    out: Array | None = None,
    lse: Array | None = None,
    stream: Any = None,
) -> Array:
    """Fused scaled-dot-product attention ``softmax(scale * q @ k^T) @ v``.

    Computed flash-attention style (online softmax over key tiles): no
    (Nq, Nk) array is ever allocated; extra memory is O(threads x tile).

    Parameters
    ----------
    q : array, shape (..., Nq, d)
    k : array, shape (..., Nk, d)
    v : array, shape (..., Nk, dv)
        float32 or float64 (all the same), same leading dimensions, any
        strides (e.g. a (B, N, H, d) array viewed as (B, H, N, d) with
        ``swapaxes(1, 2)``). ``dv`` may differ from ``d``.
    scale : float, optional
        Multiplier of the dot products; default ``1/sqrt(d)``.
    causal : bool, default False
        Query i sees key j only when ``j <= i + (Nk - Nq)`` (bottom-right).
    out : array, shape (..., Nq, dv), optional
        Buffer to write into; returned.
    lse : array, shape (..., Nq), optional
        Receives each row's natural-log log-sum-exp of its scaled, masked
        scores (what :func:`merge`-style combination of partial results and
        backward passes need).
    stream : optional
        CUDA stream for GPU inputs (see :func:`scores`).

    Returns
    -------
    array, shape (..., Nq, dv)
        ``out`` if given, else a new array of the inputs' kind. A row with
        no visible key (Nk = 0, or causal with Nq > Nk) is all zeros and its
        lse is -inf.

    Raises
    ------
    TypeError
        As :func:`scores`, for ``v`` and ``lse`` too.
    ValueError
        As :func:`scores`; also ``v`` with a different Nk, and ``out`` or
        ``lse`` overlapping an input or each other.
    """
    shadows, on_device = _prepare({"q": q, "k": k, "v": v, "out": out, "lse": lse})
    sq, sk, sv = shadows["q"], shadows["k"], shadows["v"]
    dtype = chk.check_dtype("q", sq)
    chk.check_dtype("k", sk, dtype)
    chk.check_dtype("v", sv, dtype)
    chk.check_ndim("q", sq, 2, "(..., Nq, d)")
    chk.check_ndim("k", sk, 2, "(..., Nk, d)")
    chk.check_ndim("v", sv, 2, "(..., Nk, dv)")
    leading = sq.shape[:-2]
    chk.check_leading("k", sk, leading, "q", 2)
    chk.check_leading("v", sv, leading, "q", 2)
    chk.check_dim("k", sk.shape[-1], sq.shape[-1], "last dimension d =", "q")
    chk.check_dim("v", sv.shape[-2], sk.shape[-2], "key count Nk =", "k")
    scale = chk.check_scale(scale, sq.shape[-1])
    causal = chk.check_flag("causal", causal)
    nq = sq.shape[-2]
    out_shape = leading + (nq, sv.shape[-1])
    inputs = {"q": sq, "k": sk, "v": sv}
    if out is not None:
        chk.check_output("out", shadows["out"], out_shape, dtype, inputs)
    if lse is not None:
        others = dict(inputs, **({"out": shadows["out"]} if out is not None else {}))
        chk.check_output("lse", shadows["lse"], leading + (nq,), dtype, others)
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (q, k, v))
    out, sout = _output(backend, "out", out, shadows.get("out"), out_shape, dtype, q, stream)
    if lse is None:
        lse_buf, slse = backend.empty(leading + (nq,), dtype, like=None, stream=stream)
        slse = chk.shadow("lse", lse_buf)[0]
    else:
        lse_buf, slse = lse, shadows["lse"]
    if sout.size or slse.size:
        _launch(
            backend,
            backend.attention,
            leading,
            (q, k, v, out, lse_buf),
            (sq, sk, sv, sout, slse),
            stream,
            scale,
            causal,
        )
    return out
