"""Public functions: validate, pick the backend, prepare buffers, launch.

Validation (numbattn._checks) runs completely before any output is touched,
and is the same code for host and GPU arrays, so both backends raise the same
errors. Kernels (numbattn.cpu, numbattn.cuda) validate nothing; they receive
(G1, G2, ...) views, the sequence table of numbattn._sequences, and the
window with causal folded in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _checks as chk
from . import _plans
from . import _sequences as seqs
from ._backend import Backend
from ._interop import device_interface, looks_like_device_array
from ._layout import BatchPlan, host_index, host_restride

__all__ = [
    "attention",
    "attention_backward",
    "merge_attention",
    "paged_attention",
    "scores",
    "softmax",
    "varlen_attention",
    "varlen_attention_backward",
]

#: A numpy.ndarray, or a GPU array exposing ``__cuda_array_interface__``
#: (CuPy array, PyTorch CUDA tensor, Numba device array).
Array = Any


def _backend(on_device: bool) -> Backend:
    if on_device:
        from .cuda import backend as cuda_backend

        cuda_backend.require_cuda()
        return cuda_backend
    from .cpu import backend as cpu_backend

    return cpu_backend


def _adopt(obj: Any) -> Any:
    """``obj``, after giving a CUDA-simulator array its ``__cuda_array_interface__``
    (the simulator's arrays lack one until the CUDA layer installs it)."""
    if (
        not isinstance(obj, np.ndarray)
        and type(obj).__module__.startswith("numba.cuda.simulator")
        and device_interface(obj) is None
    ):
        from .cuda import _sim

        _sim.install()
    return obj


def _host_values(obj: Any) -> Any:
    """Integer lengths on the host: GPU arrays are copied back by the CUDA backend."""
    if isinstance(obj, (np.ndarray, list, tuple)) or not looks_like_device_array(obj):
        return obj
    from .cuda import backend

    backend.require_cuda()
    return backend.to_host(obj)  # synchronises


def _planned(
    name: str,
    call: Callable[..., Any],
    arrays: tuple[Any, ...],
    options: tuple[Any, ...],
    out_index: int,
    lse_index: int,
) -> Any:
    """``call(*arrays, *options)`` through the call's plan (numbattn._plans):
    replayed when one exists for its signature, else run in full and, for
    host arrays called with that signature before, recorded as its plan."""
    key = _plans.signature(name, arrays, options, (out_index, lse_index))
    if key is None:
        return call(*arrays, *options)
    plan = _plans.lookup(key)
    if plan is not None:
        result = plan.replay(arrays)
        if result is not None:
            return result
    elif not _plans.second_call(key):
        return call(*arrays, *options)
    with _plans.record() as launches:
        result = call(*arrays, *options)
    if type(result) is np.ndarray:
        from .cpu import backend as cpu_backend

        done = list(arrays)
        done[out_index] = result
        outputs = tuple(i for i in (out_index, lse_index) if arrays[i] is not None)
        _plans.store(
            key, launches, done, out_index, arrays[out_index] is None, outputs,
            cpu_backend.argument_kinds, cpu_backend.launcher,
        )  # fmt: skip
    return result


def _prepare(named: dict[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
    """Shadows for every non-None argument, and whether they are on the GPU."""
    shadows, where = {}, {}
    for name, obj in named.items():
        if obj is not None:
            shadows[name], where[name] = chk.shadow(name, _adopt(obj))
    return shadows, chk.check_same_device(where)


def _output(
    backend: Backend,
    name: str,
    obj: Any,
    shadow: Any,
    shape: tuple[int, ...],
    dtype: np.dtype,
    like: Any,
    stream: Any,
) -> tuple[Any, np.ndarray]:
    """The caller's buffer, or a new one in the caller's array library."""
    if obj is not None:
        return obj, shadow
    obj, _ = backend.empty(shape, dtype, like=like, stream=stream)
    return obj, chk.shadow(name, obj)[0]


def _broadcast(backend: Backend, obj: Any, view: np.ndarray) -> Any:
    """A backend array of ``obj`` viewed with the shape/strides of ``view``
    (a broadcast of its shadow): nothing is materialised."""
    return backend.restride(backend.as_kernel_array(obj), view.shape, view.strides)


def _launch(
    backend: Backend,
    kernel: Callable[..., None],
    leading: tuple[int, ...],
    device_arrays: list[tuple[Any, Any]],
    host_arrays: list[np.ndarray],
    stream: Any,
    keep_last: bool = False,
) -> None:
    """Run ``kernel`` once per outer batch index on (G1, G2, ...) views.

    ``device_arrays``: (obj, shadow) pairs on the call's device ((None, None)
    for an absent option); ``host_arrays``: NumPy arrays that stay on the
    host (the sequence table). Kernel arguments follow in that order.
    """
    objs = [None if o is None else backend.as_kernel_array(o, stream) for o, _ in device_arrays]
    shadows = [s for _, s in device_arrays] + list(host_arrays)
    objs += list(host_arrays)
    n_dev, n_host = len(device_arrays), len(host_arrays)
    index = [backend.index] * n_dev + [host_index] * n_host
    restride = [backend.restride] * n_dev + [host_restride] * n_host
    plan = BatchPlan(leading, shadows, keep_last=keep_last)
    for views in plan.views(objs, shadows, index, restride):
        kernel(*views, stream=stream)


def _window(window: Any, causal: bool, limit: int) -> tuple[int, int]:
    """Validated (left, right) with causal folded in (causal is right = 0).

    A side >= ``limit`` (Nq + Nk plus the largest |diagonal|, or Tq + Tk
    packed: more than any sequence's q_len + k_len + |off|) excludes no key,
    so it becomes -1 (unbounded): kernels only ever see small values, and
    their index arithmetic cannot overflow whatever the caller passes
    (sys.maxsize, 2**64, ...).
    """
    left, right = (-1 if w >= limit else w for w in chk.check_window(window))
    return left, (0 if causal else right)


def _diagonal(diagonal: Any, leading: tuple[int, ...]) -> tuple[np.ndarray | None, int]:
    """Validated ``diagonal``: None, or int64 of shape () or (B,); and its largest |value|."""
    if diagonal is None:
        return None, 0
    batch = leading[0] if leading else None
    arr = chk.check_diagonal(_host_values(diagonal), batch)
    return arr, int(np.abs(arr).max()) if arr.size else 0


def _dense_table(
    leading: tuple[int, ...],
    nq: int,
    nk: int,
    key_lengths: Any,
    query_lengths: Any,
    diagonal: np.ndarray | None = None,
) -> np.ndarray:
    """Sequence table for dense attention, as leading + (6,) (a view).

    ``diagonal``: None (bottom-right: K_LEN - Q_LEN per batch element), or
    the validated int64 offsets, shape () or (B,)."""
    per_batch = diagonal is not None and diagonal.ndim == 1
    if key_lengths is None and query_lengths is None and not per_batch:
        return seqs.broadcast(
            seqs.dense_table(nq, nk, None if diagonal is None else int(diagonal)),
            leading,
            axis0=False,
        )
    if not leading:
        raise ValueError(
            "key_lengths and query_lengths need a batch dimension: q must be (B, ..., Nq, d), "
            f"got {nq} rows with no leading dimension"
        )
    b = leading[0]
    table = np.zeros((b, seqs.COLUMNS), dtype=np.int64)
    table[:, seqs.Q_ROWS] = nq
    table[:, seqs.Q_LEN] = (
        nq
        if query_lengths is None
        else chk.check_lengths("query_lengths", _host_values(query_lengths), b, nq)
    )
    table[:, seqs.K_LEN] = (
        nk
        if key_lengths is None
        else chk.check_lengths("key_lengths", _host_values(key_lengths), b, nk)
    )
    table[:, seqs.ALIGN] = (
        table[:, seqs.K_LEN] - table[:, seqs.Q_LEN] if diagonal is None else diagonal
    )
    return seqs.broadcast(table, leading, axis0=True)


def _max_rows(table: np.ndarray) -> int:
    return int(table[..., seqs.Q_ROWS].max()) if table.size else 0


def _check_qkv(shadows: dict[str, np.ndarray]) -> np.dtype:
    """dtype, ndim, d and Nk checks shared by every attention-like call."""
    sq, sk = shadows["q"], shadows["k"]
    dtype = chk.check_dtype("q", sq)
    chk.check_dtype("k", sk, dtype)
    chk.check_ndim("q", sq, 2, "(..., Nq, d)")
    chk.check_ndim("k", sk, 2, "(..., Nk, d)")
    if "v" in shadows:
        chk.check_dtype("v", shadows["v"], dtype)
        chk.check_ndim("v", shadows["v"], 2, "(..., Nk, dv)")
    return dtype


def _check_options(
    shadows: dict[str, np.ndarray],
    dtype: np.dtype,
    full_shape: tuple[int, ...],
    inputs: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """bias/mask dtype and broadcast; returns their broadcast shadows."""
    views = {}
    for name, kind in (("bias", "float"), ("mask", "bool")):
        if name in shadows:
            views[name] = chk.check_broadcast(name, shadows[name], full_shape, kind, dtype)
            inputs[name] = shadows[name]
    return views


def scores(
    q: Array,
    k: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: Array | None = None,
    query_lengths: Array | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    window: tuple[int, int] | None = None,
    diagonal: Any = None,
    out: Array | None = None,
    stream: Any = None,
) -> Array:
    """Scaled pairwise scores ``S = scale * q @ k^T (+ bias)`` per batch element.

    Parameters
    ----------
    q : array, shape (..., Nq, d)
        Queries; float32 or float64, any strides, any number of leading
        batch dimensions (typically (B, H)).
    k : array, shape (..., Nk, d)
        Keys; same leading dimensions, d and dtype as ``q`` (the heads axis,
        the last leading one, may divide q's: grouped-query attention).
    scale : float, optional
        Multiplier of the dot products; default ``1/sqrt(d)``.
    causal : bool, default False
        Mask key j for query i where ``j > i + (Nk - Nq)`` (bottom-right
        alignment, as FlashAttention >= 2.1).
    key_lengths, query_lengths : integer array, shape (B,), optional
        Batch element b (first leading axis) has keys ``[0, key_lengths[b])``
        and queries ``[0, query_lengths[b])``; causal and window alignment
        use these lengths. Host arrays, also for GPU inputs.
    bias : array, broadcastable to (..., Nq, Nk), optional
        Added to the scaled scores (input dtype).
    mask : bool array, broadcastable to (..., Nq, Nk), optional
        True = attend.
    window : (int, int), optional
        ``(left, right)``: key j visible to query i when
        ``i + Nk - Nq - left <= j <= i + Nk - Nq + right``; -1 = unbounded.
        Values of any size are accepted; a side >= Nq + Nk (plus ``abs(diagonal)``)
        is unbounded.
    diagonal : int or integer array, shape (B,), optional
        The alignment of causal and window: query i is aligned with key
        ``i + diagonal`` (in the formulas above ``Nk - Nq`` becomes
        ``diagonal``). Default ``Nk - Nq`` per batch element, with lengths
        ``key_lengths[b] - query_lengths[b]`` (bottom-right); 0 is top-left
        (torch's ``is_causal``). A block ``q[..., r0:r1, :]``,
        ``k[..., c0:c1, :]`` of a larger problem computes its part of the
        whole with ``diagonal = Nk - Nq + r0 - c0`` (numbattn.dask does).
        Within +-2**60.
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
        PyTorch, or a Numba device array). Masked entries are -inf.

    Raises
    ------
    TypeError
        Non-array arguments, dtypes other than float32/float64, mixed dtypes,
        host and GPU arrays mixed, non-real ``scale``, non-bool ``causal``,
        non-integer lengths or diagonal, a non-bool mask, a malformed window.
    ValueError
        Wrong ndim, mismatched leading dimensions or d, ``out`` of the wrong
        shape, read-only or overlapping an input, non-finite ``scale``,
        lengths out of range, bias or mask not broadcasting, window < -1,
        diagonal not of shape (B,) or beyond +-2**60.
    """
    shadows, on_device = _prepare({"q": q, "k": k, "bias": bias, "mask": mask, "out": out})
    sq, sk = shadows["q"], shadows["k"]
    dtype = _check_qkv(shadows)
    leading = sq.shape[:-2]
    group = chk.check_heads(sq, sk, sk)
    chk.check_dim("k", sk.shape[-1], sq.shape[-1], "last dimension d =", "q")
    scale = chk.check_scale(scale, sq.shape[-1])
    causal = chk.check_flag("causal", causal)
    nq, nk = sq.shape[-2], sk.shape[-2]
    diag, reach = _diagonal(diagonal, leading)
    left, right = _window(window, causal, nq + nk + reach)
    shape = leading + (nq, nk)
    inputs = {"q": sq, "k": sk}
    views = _check_options(shadows, dtype, shape, inputs)
    table = _dense_table(leading, nq, nk, key_lengths, query_lengths, diag)
    if out is not None:
        chk.check_output("out", shadows["out"], shape, dtype, inputs)
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (q, k))
    out, sout = _output(backend, "out", out, shadows.get("out"), shape, dtype, q, stream)
    if sout.size:
        bias_arr, mask_arr = _options(backend, shadows, views, bias, mask)
        max_rows = _max_rows(table)

        def run(
            q_: Any, k_: Any, out_: Any, bias_: Any, mask_: Any, seq_: np.ndarray, stream: Any
        ) -> None:
            backend.scores(
                q_, k_, out_, seq_, max_rows, bias_, mask_, scale, left, right, stream=stream
            )

        _launch(
            backend,
            run,
            leading,
            [(q, sq), (k, sk), (out, sout), bias_arr, mask_arr],
            [table],
            stream,
            keep_last=group != 1,
        )
    return out


def _options(
    backend: Backend,
    shadows: dict[str, np.ndarray],
    views: dict[str, np.ndarray],
    bias: Any,
    mask: Any,
) -> list[tuple[Any, Any]]:
    """(array, broadcast shadow) pairs for bias and mask, (None, None) if absent."""
    result: list[tuple[Any, Any]] = []
    for name, obj in (("bias", bias), ("mask", mask)):
        if name in views:
            result.append((_broadcast(backend, obj, views[name]), views[name]))
        else:
            result.append((None, None))
    return result


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
        _launch(backend, backend.softmax, sx.shape[:-1], [(x, sx), (out, sout)], [], stream)
    return out


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: Array | None = None,
    query_lengths: Array | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    window: tuple[int, int] | None = None,
    diagonal: Any = None,
    num_splits: int | None = None,
    out: Array | None = None,
    lse: Array | None = None,
    stream: Any = None,
) -> Array:
    """Fused scaled-dot-product attention ``softmax(scale * q @ k^T + bias) @ v``.

    Computed flash-attention style (online softmax over key tiles): no
    (Nq, Nk) array is ever allocated; extra memory is O(threads x tile).
    Key tiles that are entirely masked (causal, window, lengths) are skipped.

    Parameters
    ----------
    q : array, shape (..., Nq, d)
    k : array, shape (..., Nk, d)
    v : array, shape (..., Nk, dv)
        float32 or float64 (all the same), same leading dimensions, any
        strides (e.g. a (B, N, H, d) array viewed as (B, H, N, d) with
        ``swapaxes(1, 2)``). ``dv`` may differ from ``d``. Grouped-query /
        multi-query attention: k and v may have fewer heads (last leading
        axis) than q, a divisor of q's; query head h uses key head
        ``h // (Hq // Hk)``. Nothing is copied.
    scale : float, optional
        Multiplier of the dot products; default ``1/sqrt(d)``.
    causal : bool, default False
        Query i sees key j only when ``j <= i + (Nk - Nq)`` (bottom-right).
    key_lengths, query_lengths : integer array, shape (B,), optional
        Batch element b (first leading axis) uses keys ``[0, key_lengths[b])``
        and queries ``[0, query_lengths[b])``; rows at or past its query
        length are written as zeros (lse -inf). Causal and window alignment
        use these lengths. Host arrays, also for GPU inputs (GPU integer
        arrays are copied to the host to be checked, which synchronises).
    bias : array, broadcastable to (..., Nq, Nk), optional
        Added to the scaled scores (input dtype); -inf entries mask.
    mask : bool array, broadcastable to (..., Nq, Nk), optional
        True = attend. Neither bias nor mask is ever materialised.
    window : (int, int), optional
        ``(left, right)`` sliding window, FlashAttention's ``window_size``:
        key j visible to query i when
        ``i + Nk - Nq - left <= j <= i + Nk - Nq + right``; -1 = unbounded.
        Values of any size are accepted; a side >= Nq + Nk (plus ``abs(diagonal)``)
        is unbounded.
    diagonal : int or integer array, shape (B,), optional
        The alignment of causal and window: query i is aligned with key
        ``i + diagonal`` (in the formulas above ``Nk - Nq`` becomes
        ``diagonal``). Default ``Nk - Nq`` per batch element, with lengths
        ``key_lengths[b] - query_lengths[b]`` (bottom-right); 0 is top-left
        (torch's ``is_causal``). A block ``q[..., r0:r1, :]``,
        ``k[..., c0:c1, :]`` of a larger problem computes its part of the
        whole with ``diagonal = Nk - Nq + r0 - c0`` (numbattn.dask does).
        Within +-2**60.
    num_splits : int, optional
        Split each sequence's keys into this many chunks, processed in
        parallel and merged exactly (the :func:`merge_attention` math)
        inside the call; scratch O(num_splits x Nq x dv). None (default):
        the backend's heuristic, which splits only when the work grid
        (batch x key heads x query tiles) is too small for the hardware
        (see the guide, "Decoding and paged KV caches"); 1 disables splitting. Values above the
        longest key length act as that length. Results are bitwise
        reproducible for a given split count; different counts differ by
        rounding only.
    out : array, shape (..., Nq, dv), optional
        Buffer to write into; returned.
    lse : array, shape (..., Nq), optional
        Receives each row's natural-log log-sum-exp of its scaled, biased,
        masked scores, ``log(sum_j exp(scale * q_i.k_j + bias_ij))`` over the
        visible keys j (-inf for a row with none), in the input dtype: what
        :func:`merge_attention` and :func:`attention_backward` (which
        recomputes ``P = exp(s - lse)``) need.
    stream : optional
        CUDA stream for GPU inputs (see :func:`scores`).

    Returns
    -------
    array, shape (..., Nq, dv)
        ``out`` if given, else a new array of the inputs' kind. A row with
        no visible key (Nk = 0, causal with Nq > Nk, lengths, masks) is all
        zeros and its lse is -inf; never NaN.

    Raises
    ------
    TypeError
        As :func:`scores`, for ``v`` and ``lse`` too; ``num_splits`` not an
        integer or None.
    ValueError
        As :func:`scores`; also ``v`` with a different Nk, head counts that
        do not divide, and ``out`` or ``lse`` overlapping an input or each
        other; ``num_splits`` < 1.
    """
    arrays = (q, k, v, out, lse, bias, mask)
    options = (scale, causal, key_lengths, query_lengths, window, diagonal, num_splits, stream)
    return _planned("attention", _attention, arrays, options, out_index=3, lse_index=4)


def _attention(
    q: Array,
    k: Array,
    v: Array,
    out: Array | None,
    lse: Array | None,
    bias: Array | None,
    mask: Array | None,
    scale: float | None,
    causal: bool,
    key_lengths: Array | None,
    query_lengths: Array | None,
    window: tuple[int, int] | None,
    diagonal: Any,
    num_splits: int | None,
    stream: Any,
) -> Array:
    """:func:`attention`'s validation, planning and launch."""
    shadows, on_device = _prepare(
        {"q": q, "k": k, "v": v, "bias": bias, "mask": mask, "out": out, "lse": lse}
    )
    sq, sk, sv = shadows["q"], shadows["k"], shadows["v"]
    dtype = _check_qkv(shadows)
    num_splits = chk.check_num_splits(num_splits)
    leading = sq.shape[:-2]
    group = chk.check_heads(sq, sk, sv)
    chk.check_dim("k", sk.shape[-1], sq.shape[-1], "last dimension d =", "q")
    chk.check_dim("v", sv.shape[-2], sk.shape[-2], "key count Nk =", "k")
    scale = chk.check_scale(scale, sq.shape[-1])
    causal = chk.check_flag("causal", causal)
    nq, nk = sq.shape[-2], sk.shape[-2]
    diag, reach = _diagonal(diagonal, leading)
    left, right = _window(window, causal, nq + nk + reach)
    inputs = {"q": sq, "k": sk, "v": sv}
    views = _check_options(shadows, dtype, leading + (nq, nk), inputs)
    table = _dense_table(leading, nq, nk, key_lengths, query_lengths, diag)
    out_shape = leading + (nq, sv.shape[-1])
    _check_outputs(shadows, out, lse, out_shape, leading + (nq,), dtype, inputs)
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (q, k, v))
    out, sout = _output(backend, "out", out, shadows.get("out"), out_shape, dtype, q, stream)
    slse = shadows.get("lse")
    if sout.size or (slse is not None and slse.size):
        bias_arr, mask_arr = _options(backend, shadows, views, bias, mask)
        max_rows = _max_rows(table)
        heads = leading[-1] if leading else 1
        splits = _splits(
            backend, num_splits, int(np.prod(leading[:-1])), heads, group, max_rows, table
        )

        def run(
            q_: Any,
            k_: Any,
            v_: Any,
            out_: Any,
            lse_: Any,
            bias_: Any,
            mask_: Any,
            seq_: np.ndarray,
            stream: Any,
        ) -> None:
            _attend(
                backend, splits, None, q_, k_, v_, out_, lse_, seq_, max_rows, bias_, mask_,
                scale, left, right, stream, q,
            )  # fmt: skip

        _launch(
            backend,
            run,
            leading,
            [(q, sq), (k, sk), (v, sv), (out, sout), (lse, slse), bias_arr, mask_arr],
            [table],
            stream,
            keep_last=group != 1,
        )
    return out


def _splits(
    backend: Backend,
    num_splits: int | None,
    batch: int,
    heads: int,
    group: int,
    max_rows: int,
    table: np.ndarray,
    paged: bool = False,
) -> int:
    """The split count: ``num_splits`` or the backend's pick, capped at the
    longest key length (a split never needs to be shorter than one key)."""
    max_keys = int(table[..., seqs.K_LEN].max()) if table.size else 0
    if num_splits is None:
        num_splits = backend.default_splits(batch, heads, group, max_rows, max_keys, paged=paged)
    return max(1, min(int(num_splits), max_keys))


def _attend(
    backend: Backend,
    splits: int,
    block_table: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    seq: np.ndarray,
    max_rows: int,
    bias: Any,
    mask: Any,
    scale: float,
    left: int,
    right: int,
    stream: Any,
    like: Any,
) -> None:
    """The backend's attention: unsplit and dense through ``attention``
    (unchanged path), split or paged through ``split_attention`` (whose
    scratch ``like``'s array library allocates)."""
    if splits == 1 and block_table is None:
        backend.attention(
            q, k, v, out, lse, seq, max_rows, bias, mask, scale, left, right, stream=stream
        )
    else:
        backend.split_attention(
            q, k, v, out, lse, seq, max_rows, bias, mask, scale, left, right,
            splits, block_table, stream=stream, like=like,
        )  # fmt: skip


def _check_outputs(
    shadows: dict[str, np.ndarray],
    out: Any,
    lse: Any,
    out_shape: tuple[int, ...],
    lse_shape: tuple[int, ...],
    dtype: np.dtype,
    inputs: dict[str, np.ndarray],
) -> None:
    if out is not None:
        chk.check_output("out", shadows["out"], out_shape, dtype, inputs)
    if lse is not None:
        others = dict(inputs, **({"out": shadows["out"]} if out is not None else {}))
        chk.check_output("lse", shadows["lse"], lse_shape, dtype, others)


def varlen_attention(
    q: Array,
    k: Array,
    v: Array,
    cu_seqlens_q: Array,
    cu_seqlens_k: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    num_splits: int | None = None,
    out: Array | None = None,
    lse: Array | None = None,
    stream: Any = None,
) -> Array:
    """Packed variable-length attention (FlashAttention's cu_seqlens convention).

    The correct form of "the whole batch in one matrix": sequences are
    packed along the token axis and each attends only within itself. Work is
    proportional to ``sum_b nq_b * nk_b``, not ``(sum_b n_b)**2``.

    Parameters
    ----------
    q : array, shape (Tq, H, d)
    k : array, shape (Tk, Hk, d)
    v : array, shape (Tk, Hk, dv)
        Packed tokens; float32 or float64; Hk divides H (grouped-query).
    cu_seqlens_q, cu_seqlens_k : int32 or int64 array, shape (B + 1,)
        Prefix sums of the sequence lengths: sequence b owns query tokens
        ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` and key tokens
        ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]``. Start at 0, non-decreasing,
        end at Tq (Tk). Host arrays, also for GPU inputs.
    scale, causal, window
        As :func:`attention`, per sequence (bottom-right alignment with the
        sequence's own lengths).
    bias : array, broadcastable to (H, Tq, Tk), optional
    mask : bool array, broadcastable to (H, Tq, Tk), optional
        Indexed by packed token positions; only each sequence's own block is
        read.
    num_splits : int, optional
        As :func:`attention` (the work grid is sequences x key heads x
        query tiles).
    out : array, shape (Tq, H, dv), optional
    lse : array, shape (Tq, H), optional
        As :func:`attention` (note: FlashAttention returns lse as (H, Tq)).
    stream : optional
        CUDA stream for GPU inputs.

    Returns
    -------
    array, shape (Tq, H, dv)
        ``out`` if given, else a new array of the inputs' kind.

    Raises
    ------
    TypeError
        As :func:`attention`; cu_seqlens not int32/int64.
    ValueError
        As :func:`attention`; q, k, v not 3-d; cu_seqlens not starting at 0,
        decreasing, not ending at the packed size, or of different lengths.
    """
    shadows, on_device = _prepare(
        {"q": q, "k": k, "v": v, "bias": bias, "mask": mask, "out": out, "lse": lse}
    )
    sq, sk, sv = shadows["q"], shadows["k"], shadows["v"]
    dtype = _check_qkv(shadows)
    num_splits = chk.check_num_splits(num_splits)
    for name, what in (("q", "(Tq, H, d)"), ("k", "(Tk, Hk, d)"), ("v", "(Tk, Hk, dv)")):
        if shadows[name].ndim != 3:
            raise ValueError(
                f"{name} must have 3 dimensions {what}, got shape {shadows[name].shape}"
            )
    # As (H, T, d), so that heads are the leading (batch) axis.
    hq_view, hk_view, hv_view = (s.swapaxes(0, 1) for s in (sq, sk, sv))
    group = chk.check_heads(hq_view, hk_view, hv_view)
    chk.check_dim("k", sk.shape[-1], sq.shape[-1], "last dimension d =", "q")
    chk.check_dim("v", sv.shape[0], sk.shape[0], "token count Tk =", "k")
    scale = chk.check_scale(scale, sq.shape[-1])
    causal = chk.check_flag("causal", causal)
    tq, h = sq.shape[:2]
    tk = sk.shape[0]
    left, right = _window(window, causal, tq + tk)
    inputs = {"q": sq, "k": sk, "v": sv}
    views = _check_options(shadows, dtype, (h, tq, tk), inputs)
    cu_q = chk.check_cu_seqlens("cu_seqlens_q", _host_values(cu_seqlens_q), tq, "q")
    cu_k = chk.check_cu_seqlens("cu_seqlens_k", _host_values(cu_seqlens_k), tk, "k")
    if cu_k.shape != cu_q.shape:
        raise ValueError(
            f"cu_seqlens_k must have the same length as cu_seqlens_q ({cu_q.size}, B + 1), "
            f"got {cu_k.size}"
        )
    out_shape = (tq, h, sv.shape[-1])
    _check_outputs(shadows, out, lse, out_shape, (tq, h), dtype, inputs)
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (q, k, v))
    out, sout = _output(backend, "out", out, shadows.get("out"), out_shape, dtype, q, stream)
    nseq = cu_q.size - 1
    if nseq == 0 or h == 0:
        return out
    table = np.empty((nseq, seqs.COLUMNS), dtype=np.int64)
    table[:, seqs.Q_OFF] = cu_q[:-1]
    table[:, seqs.Q_LEN] = table[:, seqs.Q_ROWS] = np.diff(cu_q)
    table[:, seqs.K_OFF] = cu_k[:-1]
    table[:, seqs.K_LEN] = np.diff(cu_k)
    table[:, seqs.ALIGN] = table[:, seqs.K_LEN] - table[:, seqs.Q_LEN]
    table4 = seqs.broadcast(table, (nseq, h), axis0=True)

    def per_sequence(obj: Any, shadow: Any) -> Any:
        """(tokens, heads, ...) as (B, heads, tokens, ...) with a zero stride over B."""
        if obj is None:
            return None
        view = shadow.swapaxes(0, 1)
        shape = (nseq,) + view.shape
        strides = (0,) + view.strides
        return backend.restride(backend.as_kernel_array(obj, stream), shape, strides)

    args = [per_sequence(o, s) for o, s in ((q, sq), (k, sk), (v, sv), (out, sout))]
    args.append(per_sequence(lse, shadows.get("lse")))
    bias_arr, mask_arr = _options(backend, shadows, views, bias, mask)
    for arr, view in (bias_arr, mask_arr):
        args.append(
            None
            if arr is None
            else backend.restride(arr, (nseq,) + view.shape, (0,) + view.strides)
        )
    q_, k_, v_, out_, lse_, bias_, mask_ = args
    max_rows = int(table[:, seqs.Q_ROWS].max())
    splits = _splits(backend, num_splits, nseq, h, group, max_rows, table)
    _attend(
        backend, splits, None, q_, k_, v_, out_, lse_, table4, max_rows, bias_, mask_, scale,
        left, right, stream, q,
    )  # fmt: skip
    return out


def merge_attention(
    outs: Sequence[Array],
    lses: Sequence[Array],
    *,
    out: Array | None = None,
    lse: Array | None = None,
    stream: Any = None,
) -> Array:
    """Combine partial attention results over disjoint key sets, exactly.

    If ``outs[p], lses[p] = attention(q, k_p, v_p, lse=...)`` for disjoint
    key sets p, the result is ``attention`` over their union: with
    ``lse = log(sum_p exp(lses[p]))``, ``out = sum_p exp(lses[p] - lse) *
    outs[p]``. This is what splitting keys across threads, devices or
    machines needs. Parts with lse -inf (no visible key) weigh nothing; a
    row with no visible key anywhere gives zeros and lse -inf.

    Parameters
    ----------
    outs : sequence of arrays, each (..., Nq, dv)
        The partial outputs (or one array stacked along axis 0).
    lses : sequence of arrays, each (..., Nq)
        Their log-sum-exps, same dtype.
    out : array, shape (..., Nq, dv), optional
        Buffer for the result; returned.
    lse : array, shape (..., Nq), optional
        Receives the merged log-sum-exp.
    stream : optional
        CUDA stream for GPU inputs.

    Returns
    -------
    array, shape (..., Nq, dv)

    Raises
    ------
    TypeError
        Non-arrays, unsupported or mixed dtypes, host and GPU mixed.
    ValueError
        No partial results, ``len(outs) != len(lses)``, inconsistent
        shapes, outputs of the wrong shape or overlapping an input.
    """
    outs = [outs[i] for i in range(len(outs))]
    lses = [lses[i] for i in range(len(lses))]
    if not outs:
        raise ValueError("outs must hold at least one partial result, got 0")
    if len(lses) != len(outs):
        raise ValueError(
            f"lses must hold one lse per partial result: expected {len(outs)}, got {len(lses)}"
        )
    named = {f"outs[{i}]": o for i, o in enumerate(outs)}
    named.update({f"lses[{i}]": x for i, x in enumerate(lses)})
    shadows, on_device = _prepare(dict(named, out=out, lse=lse))
    first = shadows["outs[0]"]
    dtype = chk.check_dtype("outs[0]", first)
    chk.check_ndim("outs[0]", first, 2, "(..., Nq, dv)")
    for i in range(len(outs)):
        so, sl = shadows[f"outs[{i}]"], shadows[f"lses[{i}]"]
        chk.check_dtype(f"outs[{i}]", so, dtype)
        chk.check_dtype(f"lses[{i}]", sl, dtype)
        if so.shape != first.shape:
            raise ValueError(
                f"outs[{i}] must have shape {first.shape} (as outs[0]), got {so.shape}"
            )
        if sl.shape != first.shape[:-1]:
            raise ValueError(f"lses[{i}] must have shape {first.shape[:-1]}, got {sl.shape}")
    inputs = {n: shadows[n] for n in named}
    _check_outputs(shadows, out, lse, first.shape, first.shape[:-1], dtype, inputs)
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, outs)
    out, sout = _output(
        backend, "out", out, shadows.get("out"), first.shape, dtype, outs[0], stream
    )
    lse, slse = _output(
        backend, "lse", lse, shadows.get("lse"), first.shape[:-1], dtype, None, stream
    )
    if not slse.size:
        return out
    leading = first.shape[:-2]
    parts = [
        (outs[i], shadows[f"outs[{i}]"], lses[i], shadows[f"lses[{i}]"]) for i in range(len(outs))
    ]
    if len(parts) == 1:  # merge with an empty part (lse -inf): a copy
        empty = backend.constant(-np.inf, dtype)
        view = np.broadcast_to(np.full(1, -np.inf, dtype), first.shape[:-1])
        parts.append((outs[0], first, backend.restride(empty, view.shape, view.strides), view))
    acc = parts[0]
    for part in parts[1:]:
        _launch(
            backend,
            backend.merge,
            leading,
            [acc[:2], acc[2:], part[:2], part[2:], (out, sout), (lse, slse)],
            [],
            stream,
        )
        acc = (out, sout, lse, slse)
    return out


def paged_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    block_table: Array,
    key_lengths: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    query_lengths: Array | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    window: tuple[int, int] | None = None,
    num_splits: int | None = None,
    out: Array | None = None,
    lse: Array | None = None,
    stream: Any = None,
) -> Array:
    """Attention over a paged KV cache (FlashAttention's ``flash_attn_with_kvcache``
    convention with ``block_table``).

    Sequence b's keys are ``key_lengths[b]`` tokens stored in fixed-size
    blocks: its key position p lives at ``k_cache[block_table[b, p //
    block_size], p % block_size]`` (same for ``v_cache``). Equivalent to
    :func:`attention` on the gathered (B, Hk, max_blocks * block_size, d)
    keys with these ``key_lengths``; nothing is gathered or copied.

    Parameters
    ----------
    q : array, shape (B, H, Nq, d)
        Queries, heads before tokens as in :func:`attention` (a (B, Nq, H,
        d) array can be passed as ``q.swapaxes(1, 2)``); float32 or float64.
    k_cache : array, shape (num_blocks, block_size, Hk, d)
    v_cache : array, shape (num_blocks, block_size, Hk, dv)
        The physical blocks, same dtype as ``q``, any strides. Hk divides H
        (grouped-query: query head h reads key head ``h // (H // Hk)``).
    block_table : int32 array, shape (B, max_blocks)
        ``block_table[b, i]``: the physical block holding sequence b's
        logical block i. The first ``ceil(key_lengths[b] / block_size)``
        entries of each row must lie in [0, num_blocks); later ones are never
        read. On the same device as ``q`` (GPU tables are copied to the host
        to be checked, which synchronises).
    key_lengths : integer array, shape (B,)
        Keys of each sequence (``cache_seqlens``), in [0, max_blocks *
        block_size]. A host array, also for GPU inputs.
    scale, causal, window
        As :func:`attention`, aligned bottom-right per sequence with its own
        lengths (FlashAttention's kv-cache convention: the Nq queries are
        the last Nq positions of the sequence).
    query_lengths : integer array, shape (B,), optional
        As :func:`attention`.
    bias : array, broadcastable to (B, H, Nq, max_blocks * block_size), optional
    mask : bool array, broadcastable to (B, H, Nq, max_blocks * block_size), optional
        As :func:`attention`, indexed by logical key positions.
    num_splits : int, optional
        As :func:`attention`. None: on the CPU the work grid counts
        sequences x query tiles, not key heads (each thread reads whole
        cache rows of its own key range; see the guide, "Decoding and paged
        KV caches").
    out : array, shape (B, H, Nq, dv), optional
    lse : array, shape (B, H, Nq), optional
        As :func:`attention`.
    stream : optional
        CUDA stream for GPU inputs.

    Returns
    -------
    array, shape (B, H, Nq, dv)
        ``out`` if given, else a new array of the inputs' kind.

    Raises
    ------
    TypeError
        As :func:`attention`; ``block_table`` not int32, ``key_lengths``
        not integers.
    ValueError
        As :func:`attention`; arrays not 4-d, caches of different block
        counts, block sizes or heads, ``block_table`` not (B, max_blocks),
        too few blocks for a length, a needed entry outside [0, num_blocks),
        ``key_lengths`` missing or out of range.
    """
    shadows, on_device = _prepare(
        {
            "q": q,
            "k_cache": k_cache,
            "v_cache": v_cache,
            "block_table": block_table,
            "bias": bias,
            "mask": mask,
            "out": out,
            "lse": lse,
        }
    )
    sq, sk, sv = shadows["q"], shadows["k_cache"], shadows["v_cache"]
    dtype = chk.check_dtype("q", sq)
    chk.check_dtype("k_cache", sk, dtype)
    chk.check_dtype("v_cache", sv, dtype)
    num_splits = chk.check_num_splits(num_splits)
    for name, arr, what in (
        ("q", sq, "(B, H, Nq, d)"),
        ("k_cache", sk, "(num_blocks, block_size, Hk, d)"),
        ("v_cache", sv, "(num_blocks, block_size, Hk, dv)"),
    ):
        if arr.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions {what}, got shape {arr.shape}")
    if sv.shape[:3] != sk.shape[:3]:
        raise ValueError(
            f"v_cache must have the same (num_blocks, block_size, Hk) as k_cache "
            f"{sk.shape[:3]}, got {sv.shape[:3]}"
        )
    b, h, nq, d = sq.shape
    num_blocks, block_size, hk = sk.shape[:3]
    chk.check_dim("k_cache", sk.shape[3], d, "last dimension d =", "q")
    if hk == 0 or h % hk:
        raise ValueError(
            f"k_cache must have a number of heads (axis 2) that divides q's {h} "
            f"(grouped-query attention), got {hk}"
        )
    group = h // hk
    scale = chk.check_scale(scale, d)
    causal = chk.check_flag("causal", causal)
    if key_lengths is None:
        raise TypeError("key_lengths must be an integer array of shape (B,), got None")
    lengths = chk._host_integers("key_lengths", _host_values(key_lengths), f"of shape ({b},)")
    if lengths.shape != (b,):
        raise ValueError(
            f"key_lengths must have shape ({b},) (one per sequence), got {lengths.shape}"
        )
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"key_lengths must be >= 0, got {int(lengths.min())}")
    bt_host = np.asarray(_host_values(block_table))
    chk.check_block_table(bt_host, b, lengths.astype(np.int64), block_size, num_blocks)
    nk = bt_host.shape[1] * block_size
    left, right = _window(window, causal, nq + nk)
    inputs = {"q": sq, "k_cache": sk, "v_cache": sv, "block_table": shadows["block_table"]}
    views = _check_options(shadows, dtype, (b, h, nq, nk), inputs)
    table = _dense_table((b, h), nq, nk, lengths, query_lengths)
    out_shape = (b, h, nq, sv.shape[3])
    _check_outputs(shadows, out, lse, out_shape, (b, h, nq), dtype, inputs)
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (q, k_cache, v_cache))
    out, sout = _output(backend, "out", out, shadows.get("out"), out_shape, dtype, q, stream)
    slse = shadows.get("lse")
    if b == 0 or h == 0 or not (sout.size or (slse is not None and slse.size)):
        return out
    bias_arr, mask_arr = _options(backend, shadows, views, bias, mask)
    max_rows = _max_rows(table)
    splits = _splits(backend, num_splits, b, h, group, max_rows, table, paged=True)
    q_, k_, v_, bt_, out_ = (
        backend.as_kernel_array(o, stream) for o in (q, k_cache, v_cache, block_table, out)
    )
    lse_ = None if lse is None else backend.as_kernel_array(lse, stream)
    backend.split_attention(
        q_, k_, v_, out_, lse_, table, max_rows, bias_arr[0], mask_arr[0], scale, left, right,
        splits, bt_, stream=stream, like=q,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# Backward pass
# ---------------------------------------------------------------------------


def _check_backward(
    shadows: dict[str, np.ndarray],
    dtype: np.dtype,
    out_shape: tuple[int, ...],
    lse_shape: tuple[int, ...],
    inputs: dict[str, np.ndarray],
    grad_shapes: dict[str, tuple[int, ...]],
) -> None:
    """out / lse / dout (read) and dq / dk / dv (written) of a backward call."""
    for name, shape in (("out", out_shape), ("dout", out_shape), ("lse", lse_shape)):
        arr = shadows[name]
        chk.check_dtype(name, arr, dtype)
        if arr.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} (as the forward's {name if name != 'dout' else 'out'}), "
                f"got {arr.shape}"
            )
        inputs[name] = arr
    written: dict[str, np.ndarray] = {}
    for name, shape in grad_shapes.items():
        if name in shadows:
            chk.check_output(name, shadows[name], shape, dtype, dict(inputs, **written))
            written[name] = shadows[name]


def _grad_buffers(
    backend: Backend,
    shadows: dict[str, np.ndarray],
    given: dict[str, Any],
    grad_shapes: dict[str, tuple[int, ...]],
    dtype: np.dtype,
    like: Any,
    stream: Any,
) -> dict[str, tuple[Any, np.ndarray]]:
    """(array, shadow) of dq, dk, dv: the caller's, or new ones."""
    return {
        name: _output(backend, name, given[name], shadows.get(name), shape, dtype, like, stream)
        for name, shape in grad_shapes.items()
    }


def attention_backward(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    dout: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: Array | None = None,
    query_lengths: Array | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    window: tuple[int, int] | None = None,
    diagonal: Any = None,
    dq: Array | None = None,
    dk: Array | None = None,
    dv: Array | None = None,
    stream: Any = None,
) -> tuple[Array, Array, Array]:
    """Gradients of :func:`attention` with respect to q, k and v.

    FlashAttention-2's backward pass: from the forward's ``out`` and ``lse``
    it computes ``D = rowsum(dout * out)`` and, tile by tile, recomputes
    ``P = exp(S - lse)`` and accumulates ``dv += P^T dout``, ``dS = P * (dout
    v^T - D)``, ``dq += scale * dS k``, ``dk += scale * dS^T q``. No (Nq, Nk)
    array is allocated: extra memory is O(N). The result equals
    :func:`numbattn.reference.attention_backward`.

    Parameters
    ----------
    q, k, v : arrays, shapes (..., Nq, d), (..., Nk, d), (..., Nk, dv)
        The forward's inputs, as for :func:`attention` (any strides,
        grouped-query heads, ``dv`` may differ from ``d``).
    out : array, shape (..., Nq, dv)
        The forward's output.
    lse : array, shape (..., Nq)
        The forward's ``lse``: per row, the natural log of the sum over
        visible keys of ``exp(scale * q.k + bias)``; -inf for a row with no
        visible key. Must come from the same call (same options).
    dout : array, shape (..., Nq, dv)
        Gradient of the loss with respect to ``out``.
    scale, causal, key_lengths, query_lengths, bias, mask, window, diagonal
        The forward's options (see :func:`attention`), unchanged. ``bias``
        and ``mask`` are constants: no gradient is computed for them.
    dq, dk, dv : arrays shaped like q, k, v, optional
        Buffers for the gradients (same dtype and device as the inputs,
        writeable, no zero strides, overlapping neither an input nor each
        other); every element is overwritten.
    stream : optional
        CUDA stream for GPU inputs (see :func:`scores`).

    Returns
    -------
    (dq, dk, dv) : arrays shaped like q, k and v
        The given buffers, or new arrays of the inputs' kind. Rows of a
        query with no visible key (past its length, causal with Nq > Nk,
        masks) have dq = 0 and contribute nothing; keys no query sees (past
        their length, masked) get dk = dv = 0; never NaN from masking.
        Grouped-query attention: dk and dv of a key head are summed over
        its group of query heads.

    Raises
    ------
    TypeError
        As :func:`attention`, for ``out``, ``lse``, ``dout`` and the
        gradient buffers too.
    ValueError
        As :func:`attention`; ``out``, ``dout`` or ``lse`` of the wrong
        shape; a gradient buffer of the wrong shape, read-only, with a
        zero stride, or overlapping an input or another gradient buffer.
        Nothing is written when an error is raised.
    """
    shadows, on_device = _prepare(
        {
            "q": q, "k": k, "v": v, "out": out, "lse": lse, "dout": dout,
            "bias": bias, "mask": mask, "dq": dq, "dk": dk, "dv": dv,
        }
    )  # fmt: skip
    sq, sk, sv = shadows["q"], shadows["k"], shadows["v"]
    dtype = _check_qkv(shadows)
    leading = sq.shape[:-2]
    group = chk.check_heads(sq, sk, sv)
    chk.check_dim("k", sk.shape[-1], sq.shape[-1], "last dimension d =", "q")
    chk.check_dim("v", sv.shape[-2], sk.shape[-2], "key count Nk =", "k")
    scale = chk.check_scale(scale, sq.shape[-1])
    causal = chk.check_flag("causal", causal)
    nq, nk = sq.shape[-2], sk.shape[-2]
    diag, reach = _diagonal(diagonal, leading)
    left, right = _window(window, causal, nq + nk + reach)
    inputs = {"q": sq, "k": sk, "v": sv}
    views = _check_options(shadows, dtype, leading + (nq, nk), inputs)
    table = _dense_table(leading, nq, nk, key_lengths, query_lengths, diag)
    grad_shapes = {"dq": sq.shape, "dk": sk.shape, "dv": sv.shape}
    out_shape = leading + (nq, sv.shape[-1])
    _check_backward(shadows, dtype, out_shape, leading + (nq,), inputs, grad_shapes)
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (q, k, v))
    grads = _grad_buffers(
        backend, shadows, {"dq": dq, "dk": dk, "dv": dv}, grad_shapes, dtype, q, stream
    )
    if any(s.size for _, s in grads.values()):
        delta = backend.empty(leading + (nq,), dtype, like=None, stream=stream)[0]
        sdelta = chk.shadow("delta", delta)[0]
        bias_arr, mask_arr = _options(backend, shadows, views, bias, mask)
        max_rows = _max_rows(table)

        def run(
            q_: Any,
            k_: Any,
            v_: Any,
            out_: Any,
            lse_: Any,
            dout_: Any,
            delta_: Any,
            dq_: Any,
            dk_: Any,
            dv_: Any,
            bias_: Any,
            mask_: Any,
            seq_: np.ndarray,
            stream: Any,
        ) -> None:
            backend.attention_backward(
                q_, k_, v_, out_, lse_, dout_, delta_, dq_, dk_, dv_, seq_, max_rows, nk, nk,
                bias_, mask_, scale, left, right, stream=stream,
            )  # fmt: skip

        _launch(
            backend,
            run,
            leading,
            [(q, sq), (k, sk), (v, sv), (out, shadows["out"]), (lse, shadows["lse"])]
            + [(dout, shadows["dout"]), (delta, sdelta), grads["dq"], grads["dk"], grads["dv"]]
            + [bias_arr, mask_arr],
            [table],
            stream,
            keep_last=group != 1,
        )
    return grads["dq"][0], grads["dk"][0], grads["dv"][0]


def varlen_attention_backward(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    dout: Array,
    cu_seqlens_q: Array,
    cu_seqlens_k: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    dq: Array | None = None,
    dk: Array | None = None,
    dv: Array | None = None,
    stream: Any = None,
) -> tuple[Array, Array, Array]:
    """Gradients of :func:`varlen_attention` with respect to q, k and v.

    As :func:`attention_backward`, for packed sequences.

    Parameters
    ----------
    q, k, v : arrays, shapes (Tq, H, d), (Tk, Hk, d), (Tk, Hk, dv)
        The forward's packed inputs.
    out : array, shape (Tq, H, dv)
    lse : array, shape (Tq, H)
        The forward's output and log-sum-exp (:func:`varlen_attention`).
    dout : array, shape (Tq, H, dv)
        Gradient of the loss with respect to ``out``.
    cu_seqlens_q, cu_seqlens_k : int32 or int64 array, shape (B + 1,)
        As :func:`varlen_attention`.
    scale, causal, window, bias, mask
        The forward's options (bias and mask get no gradient).
    dq, dk, dv : arrays shaped like q, k, v, optional
        Buffers for the gradients, as :func:`attention_backward`.
    stream : optional
        CUDA stream for GPU inputs.

    Returns
    -------
    (dq, dk, dv) : arrays shaped like q, k and v
        Tokens of no sequence cannot exist (cu_seqlens cover every token);
        keys no query of their sequence sees get zeros.

    Raises
    ------
    TypeError
        As :func:`attention_backward`; cu_seqlens not int32/int64.
    ValueError
        As :func:`attention_backward` and :func:`varlen_attention`.
    """
    shadows, on_device = _prepare(
        {
            "q": q, "k": k, "v": v, "out": out, "lse": lse, "dout": dout,
            "bias": bias, "mask": mask, "dq": dq, "dk": dk, "dv": dv,
        }
    )  # fmt: skip
    sq, sk, sv = shadows["q"], shadows["k"], shadows["v"]
    dtype = _check_qkv(shadows)
    for name, what in (("q", "(Tq, H, d)"), ("k", "(Tk, Hk, d)"), ("v", "(Tk, Hk, dv)")):
        if shadows[name].ndim != 3:
            raise ValueError(
                f"{name} must have 3 dimensions {what}, got shape {shadows[name].shape}"
            )
    chk.check_heads(*(s.swapaxes(0, 1) for s in (sq, sk, sv)))
    chk.check_dim("k", sk.shape[-1], sq.shape[-1], "last dimension d =", "q")
    chk.check_dim("v", sv.shape[0], sk.shape[0], "token count Tk =", "k")
    scale = chk.check_scale(scale, sq.shape[-1])
    causal = chk.check_flag("causal", causal)
    tq, h = sq.shape[:2]
    tk = sk.shape[0]
    left, right = _window(window, causal, tq + tk)
    inputs = {"q": sq, "k": sk, "v": sv}
    views = _check_options(shadows, dtype, (h, tq, tk), inputs)
    cu_q = chk.check_cu_seqlens("cu_seqlens_q", _host_values(cu_seqlens_q), tq, "q")
    cu_k = chk.check_cu_seqlens("cu_seqlens_k", _host_values(cu_seqlens_k), tk, "k")
    if cu_k.shape != cu_q.shape:
        raise ValueError(
            f"cu_seqlens_k must have the same length as cu_seqlens_q ({cu_q.size}, B + 1), "
            f"got {cu_k.size}"
        )
    grad_shapes = {"dq": sq.shape, "dk": sk.shape, "dv": sv.shape}
    _check_backward(shadows, dtype, (tq, h, sv.shape[-1]), (tq, h), inputs, grad_shapes)
    backend = _backend(on_device)
    stream = backend.resolve_stream(stream, (q, k, v))
    grads = _grad_buffers(
        backend, shadows, {"dq": dq, "dk": dk, "dv": dv}, grad_shapes, dtype, q, stream
    )
    nseq = cu_q.size - 1
    result = grads["dq"][0], grads["dk"][0], grads["dv"][0]
    if nseq == 0 or h == 0:
        return result  # no token at all: every gradient is empty
    table = np.empty((nseq, seqs.COLUMNS), dtype=np.int64)
    table[:, seqs.Q_OFF] = cu_q[:-1]
    table[:, seqs.Q_LEN] = table[:, seqs.Q_ROWS] = np.diff(cu_q)
    table[:, seqs.K_OFF] = cu_k[:-1]
    table[:, seqs.K_LEN] = np.diff(cu_k)
    table[:, seqs.ALIGN] = table[:, seqs.K_LEN] - table[:, seqs.Q_LEN]
    table4 = seqs.broadcast(table, (nseq, h), axis0=True)
    delta = backend.empty((tq, h), dtype, like=None, stream=stream)[0]
    sdelta = chk.shadow("delta", delta)[0]

    def per_sequence(obj: Any, shadow: Any) -> Any:
        """(tokens, heads, ...) as (B, heads, tokens, ...) with a zero stride over B."""
        view = shadow.swapaxes(0, 1)
        return backend.restride(
            backend.as_kernel_array(obj, stream), (nseq,) + view.shape, (0,) + view.strides
        )

    pairs = [(q, sq), (k, sk), (v, sv), (out, shadows["out"]), (lse, shadows["lse"])]
    pairs += [(dout, shadows["dout"]), (delta, sdelta), grads["dq"], grads["dk"], grads["dv"]]
    args = [per_sequence(o, s) for o, s in pairs]
    bias_arr, mask_arr = _options(backend, shadows, views, bias, mask)
    for arr, view in (bias_arr, mask_arr):
        args.append(
            None
            if arr is None
            else backend.restride(arr, (nseq,) + view.shape, (0,) + view.strides)
        )
    q_, k_, v_, out_, lse_, dout_, delta_, dq_, dk_, dv_, bias_, mask_ = args
    max_rows = int(table[:, seqs.Q_ROWS].max())
    max_keys = int(table[:, seqs.K_LEN].max())
    backend.attention_backward(
        q_, k_, v_, out_, lse_, dout_, delta_, dq_, dk_, dv_, table4, max_rows, 0, max_keys,
        bias_, mask_, scale, left, right, stream=stream,
    )  # fmt: skip
    return result
