"""Host side of the CPU backend: buffers, tile sizes and kernel calls."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np

from .. import config
from .._checks import check_knob
from .._layout import host_index as index  # noqa: F401  (backend interface)
from .._layout import host_restride as restride  # noqa: F401
from .._plans import recording
from .args import (
    AttentionArgs,
    AttentionBackwardArgs,
    DecodeArgs,
    MergeArgs,
    ScoresArgs,
    SoftmaxArgs,
)

name = "cpu"

# Numba's fallback "workqueue" threading layer crashes when two Python threads
# launch parallel kernels at once; omp and tbb are safe. Serialise only then.
_workqueue_lock = threading.Lock()

# A process forked after Numba started GNU OpenMP (its "omp" threading layer,
# the default where TBB is absent) is killed by Numba on its first parallel
# launch ("Terminating: fork() called from a process already using GNU
# OpenMP"), so a fork-based multiprocessing.Pool would wait forever for it.
# Such a child runs serial compilations of the same kernels instead.
_serial = False


def _gnu_openmp_started() -> bool:
    """Whether Numba's threading layer is running on GNU OpenMP (not fork-safe)."""
    numba = sys.modules.get("numba")
    if numba is None:
        return False
    try:
        layer = numba.threading_layer()
    except ValueError:  # no threading layer launched yet: a child may start one
        return False
    if layer != "omp":  # tbb and workqueue survive fork
        return False
    omppool = sys.modules.get("numba.np.ufunc.omppool")
    return getattr(omppool, "openmp_vendor", "GNU") == "GNU"  # Intel's is fork-safe


def _after_fork_in_child() -> None:
    global _serial, _workqueue_lock
    _workqueue_lock = threading.Lock()  # may have been held by a parent thread
    if _gnu_openmp_started():
        _serial = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def serial() -> bool:
    """True in a process forked after GNU OpenMP started: kernels run serially."""
    return _serial


def _call(kernel, args: tuple, work: int | None = None) -> None:
    """Run ``kernel(*args)`` (its serial twin after an unsafe fork, or for a
    call of at most ``config.CPU_SERIAL_WORK`` multiply-adds, ``work``),
    reporting the launch to a call being recorded as a plan (numbattn._plans).

    Kernel arguments are the call's arrays or axis permutations of them,
    constants, and scratch the kernel writes: never copies of the call's data
    (a plan replays the other arrays as they were)."""
    if work is not None and work <= _knob("CPU_SERIAL_WORK", 0) and not _serial:
        kernel = kernel.serial  # less work than waking Numba's threads costs
    launches = recording()
    if launches is not None:
        launches.append((kernel, args))
    run_kernel(kernel, args)


def argument_kinds(kernel) -> tuple:
    """Each positional argument's kind (numbattn.cpu.args) of a kernel :func:`_call` ran."""
    return kernel._kinds


def launcher(kernel, args: tuple):
    """``run(args)`` for later launches of ``kernel`` with arguments of the
    types, ranks and roles of ``args`` (a call plan's replays): the compiled
    entry point itself when :func:`run_kernel` would call just that."""
    if not _serial:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = None
        entry = kernel.entry_for(args) if layer not in (None, "workqueue") else None
        if entry is not None:
            return lambda a: entry(*a)
    return lambda a: run_kernel(kernel, a)


def run_kernel(kernel, args: tuple) -> None:
    """Run ``kernel(*args)`` (its serial twin after an unsafe fork)."""
    if _serial:
        kernel.serial(*args)
        return
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet in this process
        layer = None
    if layer in (None, "workqueue"):
        with _workqueue_lock:
            kernel(*args)
    else:
        kernel(*args)


def resolve_stream(stream, arrays):
    if stream is not None:
        raise ValueError("stream applies to GPU arrays only; got a stream with host (NumPy) arrays")
    return None


def as_kernel_array(obj, stream=None):
    return obj


def to_host(obj):
    """Host arrays are already on the host."""
    return obj


def empty(shape, dtype, like=None, stream=None):
    arr = np.empty(shape, dtype=dtype)
    return arr, arr


def _knob(name: str, minimum: int = 1) -> int:
    """``numbattn.config.<name>``, checked (ValueError naming it) before any work."""
    return check_knob(name, getattr(config, name), minimum)


def _threads():
    """Numba's thread count: the kernels interleave their work items for it."""
    if _serial:
        return 1
    import numba

    return numba.get_num_threads()


def constant(value, dtype):
    """A 1-element host array holding ``value``."""
    return np.full(1, value, dtype)


def _frozen(arr):
    arr.flags.writeable = False
    return arr


# Stand-ins for absent options, so that one compiled specialisation per dtype
# serves every call (the kernels never read them: has_bias/has_mask/has_lse).
_DUMMY_MASK = _frozen(np.zeros((1, 1, 1, 1), dtype=np.bool_))
_DUMMY: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {
    np.dtype(dt): (_frozen(np.zeros((1, 1, 1, 1), dt)), np.zeros((1, 1, 1), dt))
    for dt in (np.float32, np.float64)
}


def _options(dtype, bias, mask):
    dummy_bias, _ = _DUMMY.get(np.dtype(dtype), _DUMMY[np.dtype(np.float64)])
    return (
        dummy_bias if bias is None else bias,
        _DUMMY_MASK if mask is None else mask,
        bias is not None,
        mask is not None,
    )


def scores_args(
    q,
    k,
    out,
    seq,
    max_rows,
    bias,
    mask,
    scale,
    window_left,
    window_right,
    q_tile: int | None = None,
    k_tile: int | None = None,
) -> ScoresArgs:
    """The scores kernel's arguments for the backend call of the same name
    (tiles: numbattn.config's unless given). Run with ``scores_kernel(*args)``."""
    bias_, mask_, has_bias, has_mask = _options(q.dtype, bias, mask)
    return ScoresArgs(
        q=q,
        k=k,
        out=out,
        bias=bias_,
        mask=mask_,
        seq=seq,
        max_rows=int(max_rows),
        has_bias=has_bias,
        has_mask=has_mask,
        scale=float(scale),
        left=int(window_left),
        right=int(window_right),
        q_tile=_knob("CPU_SCORES_QUERY_TILE") if q_tile is None else q_tile,
        k_tile=_knob("CPU_SCORES_KEY_TILE") if k_tile is None else k_tile,
        n_threads=_threads(),
    )


def scores(q, k, out, seq, max_rows, bias, mask, scale, window_left, window_right, stream=None):
    from .kernels import scores_kernel

    _call(
        scores_kernel,
        scores_args(q, k, out, seq, max_rows, bias, mask, scale, window_left, window_right),
    )


def softmax(x, out, stream=None):
    from .kernels import softmax_kernel

    _call(softmax_kernel, SoftmaxArgs(x=x, out=out))


def attention_args(
    q,
    k,
    v,
    out,
    lse,
    seq,
    max_rows,
    bias,
    mask,
    scale,
    window_left,
    window_right,
    q_tile: int | None = None,
    k_tile: int | None = None,
) -> AttentionArgs:
    """The attention kernel's arguments for the backend call of the same name
    (``lse`` may be None; tiles: numbattn.config's unless given). Run with
    ``attention_kernel(*args)``."""
    bias_, mask_, has_bias, has_mask = _options(q.dtype, bias, mask)
    has_lse = lse is not None
    if not has_lse:
        lse = _DUMMY.get(np.dtype(q.dtype), _DUMMY[np.dtype(np.float64)])[1]
    return AttentionArgs(
        q=q,
        k=k,
        v=v,
        out=out,
        lse=lse,
        bias=bias_,
        mask=mask_,
        seq=seq,
        max_rows=int(max_rows),
        has_lse=has_lse,
        has_bias=has_bias,
        has_mask=has_mask,
        scale=float(scale),
        left=int(window_left),
        right=int(window_right),
        q_tile=_knob("CPU_QUERY_TILE") if q_tile is None else q_tile,
        k_tile=_knob("CPU_KEY_TILE") if k_tile is None else k_tile,
        n_threads=_threads(),
    )


def attention(
    q, k, v, out, lse, seq, max_rows, bias, mask, scale, window_left, window_right, stream=None
):
    from .kernels import attention_kernel

    if max_rows <= _knob("CPU_STREAM_ROWS", 0):  # few queries: the streaming kernel
        split_attention(
            q, k, v, out, lse, seq, max_rows, bias, mask, scale, window_left, window_right, 1, None
        )
        return
    _call(
        attention_kernel,
        attention_args(
            q, k, v, out, lse, seq, max_rows, bias, mask, scale, window_left, window_right
        ),
        _work(q, v, max_rows, k.shape[2]),
    )


def _work(q, v, max_rows, keys) -> int:
    """Multiply-adds of an attention call at most (every row sees every key)."""
    return q.shape[0] * q.shape[1] * int(max_rows) * int(keys) * (q.shape[3] + v.shape[3])


def merge(o1, l1, o2, l2, out, lse, stream=None):
    from .kernels import merge_kernel

    if lse is None:  # not wanted: the kernel writes it to scratch
        lse = np.empty(o1.shape[:3], dtype=o1.dtype)
    _call(merge_kernel, MergeArgs(o1=o1, l1=l1, o2=o2, l2=l2, out=out, lse=lse))


# --- Split-K and paged KV caches ------------------------------------------


def _stream_rows(max_rows: int, group: int) -> int:
    """Query rows per work item of the streaming kernel."""
    return max(1, min(int(max_rows), _knob("CPU_STREAM_ROWS", 0)))


def default_splits(batch, heads, group, max_rows, max_keys, *, paged=False):
    """``num_splits=None``: split the keys only when the streaming kernel's
    work items (sequence x key head x query tile) cannot keep every thread
    busy. 1 for long queries (the tiled kernel's grid), for items >= 4x the
    threads or a multiple of them; else the smallest n <= 16 giving n x items
    a >= 90 % balanced share per thread (or >= 4x the threads), while chunks
    keep >= config.CPU_MIN_SPLIT_KEYS keys. ``paged`` (key heads interleaved
    in each row): the key heads are not counted, as the threads then stream
    whole rows of their own key ranges; a share of every row per thread
    (heads dealt to the threads) ran 1.4-1.9x slower (2 threads, Zen 4)."""
    if max_rows > _knob("CPU_STREAM_ROWS", 0) or group < 1:
        return 1
    threads = _threads()
    qt = _stream_rows(max_rows, group)
    items = batch * (1 if paged else heads // group) * -(-max_rows // qt)
    if items == 0 or items >= 4 * threads or items % threads == 0:
        return 1
    best = 1
    for n in range(2, 17):
        if max_keys < n * _knob("CPU_MIN_SPLIT_KEYS"):
            break
        best = n
        total = items * n
        if total >= 4 * threads or total / (threads * -(-total // threads)) >= 0.9:
            break
    return best


def _heads_per_item(k, batch: int, per_sequence: int, rows_per_head: int) -> int:
    """Key heads one work item of the streaming kernel covers. 1 when each
    head's rows are contiguous (a (B, Hk, N, d) cache). With the heads
    interleaved within each row (FlashAttention's (blocks, block_size, Hk,
    d) paged layout, or (B, N, Hk, d)), one head's rows are 512-byte pieces
    4 KiB apart and streaming them head by head runs at half speed, so a work
    item takes as many heads of a row as the thread count allows (reading
    whole rows), keeping at most 256 query rows of scratch."""
    hk = k.shape[2]
    if hk <= 1 or abs(k.strides[2]) >= abs(k.strides[1]):
        return 1
    threads = _threads()
    for chunks in range(1, hk + 1):
        if hk % chunks:
            continue
        hpi = hk // chunks
        if batch * per_sequence * chunks >= threads and hpi * rows_per_head <= 256:
            return hpi
    return 1


def decode_args(
    q,
    k,
    v,
    out,
    lse,
    seq,
    max_rows,
    bias,
    mask,
    scale,
    window_left,
    window_right,
    num_splits,
    block_table,
    q_tile: int | None = None,
    k_tile: int | None = None,
) -> DecodeArgs:
    """The streaming kernel's arguments for :func:`split_attention`: a dense
    (G1, Hk, Nk, d) k / v is viewed as a (G1, Nk, Hk, d) cache of one block
    per batch element (no copy)."""
    bias_, mask_, has_bias, has_mask = _options(q.dtype, bias, mask)
    has_lse = lse is not None
    if not has_lse:
        lse = _DUMMY.get(np.dtype(q.dtype), _DUMMY[np.dtype(np.float64)])[1]
    if block_table is None:
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        block_table = np.arange(q.shape[0], dtype=np.int32).reshape(-1, 1)
    group = q.shape[1] // k.shape[2] if k.shape[2] else 1
    qt = _stream_rows(max_rows, group) if q_tile is None else q_tile
    hpi = _heads_per_item(
        k, q.shape[0], -(-int(max_rows) // max(1, qt)) * int(num_splits), group * qt
    )
    return DecodeArgs(
        q=q,
        k=k,
        v=v,
        table=block_table,
        out=out,
        lse=lse,
        bias=bias_,
        mask=mask_,
        seq=seq,
        max_rows=int(max_rows),
        has_lse=has_lse,
        has_bias=has_bias,
        has_mask=has_mask,
        scale=float(scale),
        left=int(window_left),
        right=int(window_right),
        num_splits=int(num_splits),
        heads_per_item=hpi,
        q_tile=qt,
        k_tile=_knob("CPU_STREAM_KEY_TILE") if k_tile is None else k_tile,
        wide_rows=_knob("CPU_STREAM_WIDE_ROWS"),
        n_threads=_threads(),
    )


def split_attention(
    q,
    k,
    v,
    out,
    lse,
    seq,
    max_rows,
    bias,
    mask,
    scale,
    window_left,
    window_right,
    num_splits,
    block_table,
    stream=None,
    like=None,
):
    from .kernels import decode_kernel

    g2 = q.shape[1]
    if block_table is None and g2 > 1 and seq.strides[1] != 0 and not (seq == seq[:, :1]).all():
        # The table differs between heads (the batch axis is the heads axis):
        # the kernel shares one table row among the heads of an item, so run
        # one query head at a time.
        group = g2 // k.shape[1] if k.shape[1] else 1
        for h in range(g2):
            hs, ks = slice(h, h + 1), slice(h // group, h // group + 1)
            split_attention(
                q[:, hs], k[:, ks], v[:, ks], out[:, hs], None if lse is None else lse[:, hs],
                seq[:, hs], max_rows, None if bias is None else bias[:, hs],
                None if mask is None else mask[:, hs], scale, window_left, window_right,
                num_splits, None,
            )  # fmt: skip
        return
    args = decode_args(
        q, k, v, out, lse, seq, max_rows, bias, mask, scale, window_left, window_right,
        num_splits, block_table,
    )  # fmt: skip
    keys = k.shape[2] if block_table is None else block_table.shape[1] * k.shape[1]
    _call(decode_kernel, args, _work(q, v, max_rows, keys))


def attention_backward_args(
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
    seq,
    max_rows,
    key_rows,
    max_keys,
    bias,
    mask,
    scale,
    window_left,
    window_right,
    q_tile: int | None = None,
    k_tile: int | None = None,
) -> AttentionBackwardArgs:
    """The backward kernel's arguments for the backend call of the same name
    (tiles: numbattn.config's unless given). Run with
    ``attention_backward_kernel(*args)``.

    ``splits``: key-tile slices per key head, each with its own dQ
    accumulator (rows x d): enough work items for twice the threads, so a
    single head still keeps every thread busy; 1 when there are enough
    heads (then the accumulators are one dq-sized array), and never more
    than ``config.CPU_BWD_SPLIT_BYTES`` of accumulators allow."""
    bias_, mask_, has_bias, has_mask = _options(q.dtype, bias, mask)
    k_tile = _knob("CPU_BWD_KEY_TILE") if k_tile is None else k_tile
    n_threads = _threads()
    heads = q.shape[0] * k.shape[1]
    key_tiles = -(-int(max_keys) // max(1, k_tile))
    # Memory cap: the accumulators (splits x rows x d) stay within
    # CPU_BWD_SPLIT_BYTES, or one dq-sized array when dq alone is larger.
    acc_bytes = q.shape[0] * q.shape[1] * (int(max_rows) + 3) * q.shape[3] * q.itemsize
    cap = _knob("CPU_BWD_SPLIT_BYTES", 0) // max(1, acc_bytes)
    splits = max(1, min(-(-2 * n_threads // max(1, heads)), key_tiles, cap))
    return AttentionBackwardArgs(
        q=q,
        k=k,
        v=v,
        out=out,
        lse=lse,
        dout=dout,
        delta=delta,
        dq=dq,
        dk=dk,
        dv=dv,
        bias=bias_,
        mask=mask_,
        seq=seq,
        max_rows=int(max_rows),
        key_rows=int(key_rows),
        max_keys=int(max_keys),
        has_bias=has_bias,
        has_mask=has_mask,
        scale=float(scale),
        left=int(window_left),
        right=int(window_right),
        q_tile=_knob("CPU_BWD_QUERY_TILE") if q_tile is None else q_tile,
        k_tile=k_tile,
        splits=splits,
        n_threads=n_threads,
    )


def attention_backward(
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
    seq,
    max_rows,
    key_rows,
    max_keys,
    bias,
    mask,
    scale,
    window_left,
    window_right,
    stream=None,
):
    from .kernels import attention_backward_kernel

    _call(
        attention_backward_kernel,
        attention_backward_args(
            q, k, v, out, lse, dout, delta, dq, dk, dv, seq, max_rows, key_rows, max_keys,
            bias, mask, scale, window_left, window_right,
        ),
    )  # fmt: skip
