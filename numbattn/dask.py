"""Attention on Dask arrays: numbattn's kernels per chunk pair, merged exactly.

Install with ``pip install "numbattn[dask]"``. Importing :mod:`numbattn`
never imports Dask; importing this module does.

Graph
-----
For every block of the leading (batch, head) axes and every query chunk,
each key chunk gives one *pair* task: the in-memory :func:`numbattn.attention`
on that (query chunk, key chunk) returning a partial ``(out, lse)``. The
partials of one query chunk are combined by a tree of
:func:`numbattn.merge_attention` tasks, at most ``split_every`` partials per
task (dask's tree-reduction pattern, as ``dask.array.matmul`` reduces its
``blockwise(..., concatenate=False)`` products with ``reduction``). Each
task holds O(chunk) memory: the kernel never forms a score matrix, and a
partial is ``Nq_chunk x (dv + 1)`` numbers.

The graph is written directly rather than with ``blockwise`` +
``reduction`` because those create a task for *every* block pair, while
here pairs that causal, window or length limits mask entirely are decided
when the graph is built and left out: their tasks do not exist. A query
chunk with no visible key anywhere gets one task that writes zeros
(lse -inf), as the in-memory call does.

Alignment
---------
Causal and window visibility are relative to a diagonal: query i sees key j
when ``i + off - left <= j <= i + off + right`` with ``off = K_LEN - Q_LEN``
(bottom-right) or the caller's ``diagonal``. A pair whose query chunk
starts at row ``q0`` and key chunk at key ``k0`` is the in-memory call on
local indices with the diagonal ``off + q0 - k0`` (per batch element when
lengths or a per-batch ``diagonal`` are given) and lengths sliced to the
pair: ``clip(Q_LEN - q0, 0, chunk rows)`` and the same for
keys. The result equals the in-memory call on the whole arrays.

Threads
-------
Each task sets Numba's thread count (thread-local) for its kernel calls and
restores it afterwards: the ``numbattn.dask.threads`` config value if set
(read when the graph is built), else, in a ``distributed`` worker,
``OMP_NUM_THREADS`` (dask's nanny sets it to 1 per worker thread, since
``LocalCluster`` sizes workers x threads to the cores) or cores // worker
threads; on dask's local threaded scheduler cores // pool threads; on the
synchronous scheduler Numba's own setting.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import _checks as chk
from . import _sequences as seqs
from . import api

__all__ = ["attention"]

#: The dask.config key holding Numba threads per task (None: automatic).
THREADS_KEY = "numbattn.dask.threads"


# --------------------------------------------------------------------------
# Validation (on zero-memory NumPy shadows of the dask arrays' metadata)
# --------------------------------------------------------------------------


def _shadow(name: str, x: Any) -> np.ndarray:
    """A zero-stride NumPy array with ``x``'s shape and dtype, for numbattn._checks."""
    if any(isinstance(n, float) and math.isnan(n) for n in x.shape):
        raise ValueError(
            f"{name} has unknown chunk sizes (shape {x.shape}); call {name}.compute_chunk_sizes() first"
        )
    base = np.zeros(1, dtype=x.dtype)
    return np.lib.stride_tricks.as_strided(base, x.shape, (0,) * x.ndim, writeable=False)


def _chunk_library(name: str, x: da.Array) -> str:
    """'numpy' or 'cupy': the array library of ``x``'s chunks."""
    meta = x._meta
    if isinstance(meta, np.ndarray) and not isinstance(meta, np.ma.MaskedArray):
        return "numpy"
    module = type(meta).__module__.split(".")[0]
    if module == "cupy":
        return "cupy"
    raise TypeError(
        f"{name} must have numpy.ndarray or cupy.ndarray chunks, got "
        f"{type(meta).__module__}.{type(meta).__qualname__} chunks"
    )


def _as_dask(name: str, x: Any, allow_host: bool) -> da.Array:
    if isinstance(x, da.Array):
        return x
    if allow_host and isinstance(x, np.ndarray) and not isinstance(x, np.ma.MaskedArray):
        return da.from_array(x, chunks=x.shape or ())
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(chk._masked_message(name))
    what = "a dask.array.Array or a numpy.ndarray" if allow_host else "a dask.array.Array"
    hint = "" if allow_host else " (wrap it with dask.array.from_array)"
    raise TypeError(f"{name} must be {what}{hint}, got {type(x).__module__}.{type(x).__qualname__}")


def _host_lengths(name: str, x: Any) -> Any:
    if x is not None and (isinstance(x, da.Array) or dask.is_dask_collection(x)):
        raise TypeError(
            f"{name} must be a small host (NumPy) integer array, not a dask collection: "
            "it shapes the graph; pass numpy.asarray(" + name + ".compute())"
        )
    return x


# --------------------------------------------------------------------------
# Chunk alignment
# --------------------------------------------------------------------------


def _group_chunks(chunks: tuple[int, ...], group: int) -> tuple[int, ...]:
    """Query-head chunks rounded to multiples of ``group`` (whole key heads)."""
    if group == 1:
        return chunks
    bounds = list(itertools.accumulate(chunks))
    total = bounds[-1] if bounds else 0
    kept = [b for b in bounds if b % group == 0 and b < total] + [total]
    return tuple(b - a for a, b in zip([0, *kept[:-1]], kept)) or (0,)


def _option_chunks(
    x: da.Array, full: tuple[int, ...], target: tuple[tuple[int, ...], ...]
) -> tuple[da.Array, tuple[bool, ...]]:
    """``x`` with full ndim, chunked like ``target`` on every axis it does not broadcast.

    Returns the array and, per axis, whether it is broadcast (size 1 against
    a larger axis: one chunk, always block 0).
    """
    x = x[(None,) * (len(full) - x.ndim)]
    broadcast = tuple(s == 1 and n != 1 for s, n in zip(x.shape, full))
    chunks = tuple((1,) if b else c for b, c in zip(broadcast, target))
    return x.rechunk(chunks), broadcast


# --------------------------------------------------------------------------
# Tasks (run on the workers)
# --------------------------------------------------------------------------


def _auto_threads() -> int | None:
    """Numba threads for a task when numbattn.dask.threads is unset (None: leave as is)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cores = os.cpu_count() or 1
    worker = None
    distributed = sys.modules.get("distributed")  # a worker process has imported it
    if distributed is not None:
        try:
            worker = distributed.get_worker()
        except ValueError:  # not in a worker's task
            pass
    if worker is not None:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        if omp.isdigit() and int(omp) > 0:
            return int(omp)
        return max(1, cores // max(1, worker.state.nthreads))
    if threading.current_thread() is threading.main_thread():
        return None  # synchronous scheduler: the task has the process to itself
    pool = dask.config.get("num_workers", None) or cores
    return max(1, cores // int(pool))


class _NumbaThreads:
    """Context manager: Numba's (thread-local) thread count for one task."""

    def __init__(self, library: str, threads: int | None) -> None:
        self.library = library
        self.threads = threads
        self.previous: int | None = None

    def __enter__(self) -> None:
        if self.library != "numpy":  # CuPy chunks: GPU kernels, no Numba threads
            return
        wanted = self.threads if self.threads is not None else _auto_threads()
        if wanted is None:
            return
        import numba

        self.previous = numba.get_num_threads()
        numba.set_num_threads(max(1, min(wanted, numba.config.NUMBA_NUM_THREADS)))

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            import numba

            numba.set_num_threads(self.previous)


def _module(library: str) -> Any:
    if library == "numpy":
        return np
    import cupy

    return cupy


def _empty(library: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised lse buffer (tests poison it through this function)."""
    return _module(library).empty(shape, dtype=dtype)


def _pair(
    q: Any,
    k: Any,
    v: Any,
    bias: Any,
    mask: Any,
    *,
    library: str,
    threads: int | None,
    options: dict[str, Any],
) -> tuple[Any, Any]:
    """One (query chunk, key chunk) pair: partial (out, lse) of the in-memory kernel."""
    lse = _empty(library, q.shape[:-1], q.dtype)
    with _NumbaThreads(library, threads):
        out = api.attention(q, k, v, bias=bias, mask=mask, lse=lse, **options)
    return out, lse


def _merge(parts: Sequence[tuple[Any, Any]], *, library: str, threads: int | None) -> tuple:
    """Exact combination of partials over disjoint key chunks."""
    outs = [p[0] for p in parts]
    lses = [p[1] for p in parts]
    lse = _empty(library, lses[0].shape, lses[0].dtype)
    with _NumbaThreads(library, threads):
        out = api.merge_attention(outs, lses, lse=lse)
    return out, lse


def _nothing_visible(
    out_shape: tuple[int, ...], lse_shape: tuple[int, ...], dtype: str, library: str
) -> tuple[Any, Any]:
    """A query chunk that sees no key: zeros and lse -inf, as the in-memory call."""
    xp = _module(library)
    return xp.zeros(out_shape, dtype=dtype), xp.full(lse_shape, -np.inf, dtype=dtype)


def _take(pair: tuple[Any, Any], i: int) -> Any:
    return pair[i]


# --------------------------------------------------------------------------
# Graph
# --------------------------------------------------------------------------


def _starts(chunks: tuple[int, ...]) -> list[int]:
    return [0, *itertools.accumulate(chunks)][:-1]


def _pair_visible(
    q0: int,
    q1: int,
    k0: int,
    k1: int,
    q_len: np.ndarray,
    k_len: np.ndarray,
    off: np.ndarray,
    lo: int,
    hi: int,
) -> np.ndarray:
    """Per batch row: whether any (i, j) in the pair is visible by causal/window/lengths.

    ``lo``/``hi`` bound ``j - i - off`` (-big/+big when unbounded).
    Over the rectangle of real rows and keys, ``j - i`` takes every value
    between ``k0 - (qe - 1)`` and ``(ke - 1) - q0``.
    """
    qe = np.minimum(q1, q_len)
    ke = np.minimum(k1, k_len)
    some = (qe > q0) & (ke > k0)
    return some & (k0 - (qe - 1) - off <= hi) & ((ke - 1) - q0 - off >= lo)


def _local_diagonal(off: np.ndarray, n_rows: int, n_keys: int, left: int, right: int) -> np.ndarray:
    """A block's diagonals (one per batch row), clamped into ``+-2**60``
    without changing what the block sees.

    In a block of ``n_rows`` queries and ``n_keys`` keys, ``j - i`` spans
    ``[1 - n_rows, n_keys - 1]``, and a bounded window side compares it with
    ``off - left`` or ``off + right`` only: past the value where every pair
    (or none) passes a side's test, a larger ``|off|`` changes nothing. So
    ``off + q0 - k0``, which can leave the range the in-memory call accepts
    when the caller's diagonal is near ``+-2**60``, is clamped there. The
    blocks with a visible pair and a window side within ``n_rows + n_keys``
    of ``2**60`` that are left raise ValueError here, while the graph is
    built.
    """
    first, last = 1 - n_rows, n_keys - 1
    if left >= 0 and right >= 0:
        off = np.clip(off, first - right - 1, last + left + 1)
    elif right >= 0:  # keys j <= i + off + right: none below, all from last - right
        off = np.clip(off, first - right - 1, last - right)
    elif left >= 0:  # keys j >= i + off - left: all up to first + left, none above
        off = np.clip(off, first + left, last + left + 1)
    if off.size and int(np.abs(off).max()) > chk.DIAGONAL_LIMIT:
        raise ValueError(
            f"diagonal and window (left={left}, right={right}) place a block of "
            f"{n_rows} queries and {n_keys} keys at the local diagonal "
            f"{int(off[np.argmax(np.abs(off))])}, beyond +-2**60; keep the window's sides "
            "below 2**60 - (Nq + Nk), or -1 (unbounded)"
        )
    return off


def attention(
    q: da.Array,
    k: da.Array,
    v: da.Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_lengths: Any = None,
    query_lengths: Any = None,
    window: tuple[int, int] | None = None,
    diagonal: Any = None,
    bias: Any = None,
    mask: Any = None,
    return_lse: bool = False,
    split_every: int | None = None,
) -> da.Array | tuple[da.Array, da.Array]:
    """Scaled-dot-product attention on Dask arrays, equal to :func:`numbattn.attention`.

    Lazy: builds a graph of in-memory numbattn calls, one per visible
    (query chunk, key chunk) pair, whose partial results are merged exactly
    (:func:`numbattn.merge_attention`) by a tree reduction over the key
    chunks. Nothing is compiled or run until the result is computed.

    Parameters
    ----------
    q : dask.array.Array, shape (..., Nq, d)
    k : dask.array.Array, shape (..., Nk, d)
    v : dask.array.Array, shape (..., Nk, dv)
        float32 or float64 (all the same), NumPy- or CuPy-backed (all the
        same; CuPy chunks run the CUDA kernels). Any chunking of the leading
        axes, Nq and Nk, uneven or of size 1: k and v are rechunked to q's
        leading chunks and v to k's key chunks; d and dv become one chunk.
        Grouped-query attention (k, v with fewer heads on the last leading
        axis): q's head chunks are rounded up to whole groups and k/v get
        the matching head chunks.
    scale, causal, window, diagonal
        As :func:`numbattn.attention`, over the whole arrays (default
        bottom-right alignment; ``diagonal``: an int or a NumPy integer
        array of shape (B,), not a dask array).
    key_lengths, query_lengths : integer NumPy array, shape (B,), optional
        As :func:`numbattn.attention`; host arrays (not dask), sliced per
        block when the graph is built.
    bias : dask.array.Array or numpy.ndarray, broadcastable to (..., Nq, Nk), optional
    mask : bool dask.array.Array or numpy.ndarray, broadcastable to (..., Nq, Nk), optional
        As :func:`numbattn.attention`; chunked like the score blocks (axes
        of size 1 stay broadcast, one chunk).
    return_lse : bool, default False
        Also return the log-sum-exp of each query row.
    split_every : int >= 2, optional
        Most partial results one merge task combines (the tree's width);
        default dask's ``split_every`` config value, else 4.

    Returns
    -------
    out : dask.array.Array, shape (..., Nq, dv)
        Chunked like q (heads rounded for grouped-query), one chunk over dv;
        chunks of q's array library.
    lse : dask.array.Array, shape (..., Nq)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError
        q, k or v not dask arrays; bias/mask neither dask nor NumPy; lengths
        or diagonal given as dask arrays; ``split_every`` not an integer; chunks other than NumPy/CuPy or mixed;
        otherwise as :func:`numbattn.attention` (dtypes, flags, window).
    ValueError
        Unknown chunk sizes, ``split_every`` < 2, and as
        :func:`numbattn.attention` (shapes, heads, lengths, broadcasting).
    """
    q, k, v = (_as_dask(n, x, allow_host=False) for n, x in (("q", q), ("k", k), ("v", v)))
    named = {"q": q, "k": k, "v": v}
    if bias is not None:
        named["bias"] = bias = _as_dask("bias", bias, allow_host=True)
    if mask is not None:
        named["mask"] = mask = _as_dask("mask", mask, allow_host=True)
    library = _chunk_library("q", q)
    for name, x in named.items():
        other = _chunk_library(name, x)
        if other != library:
            raise TypeError(
                f"{name} has {other} chunks but q has {library} chunks; "
                "all arrays of one call must live on the same device"
            )
    diagonal = _host_lengths("diagonal", diagonal)
    key_lengths = _host_lengths("key_lengths", key_lengths)
    query_lengths = _host_lengths("query_lengths", query_lengths)
    return_lse = chk.check_flag("return_lse", return_lse)
    if split_every is not None and (
        isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer))
    ):
        raise TypeError(f"split_every must be an integer or None, got {type(split_every).__name__}")
    if split_every is None:  # dask's own default for its reductions (may be a per-axis dict)
        configured = dask.config.get("split_every", None)
        split = configured if isinstance(configured, int) and configured >= 2 else 4
    else:
        split = int(split_every)
    if split < 2:
        raise ValueError(f"split_every must be >= 2, got {split}")

    threads = dask.config.get(THREADS_KEY, None)
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1
    ):
        raise ValueError(
            f"dask config {THREADS_KEY!r} must be a positive integer or None, got {threads!r}"
        )
    threads = None if threads is None else int(threads)

    # The in-memory API's checks, on shadows (no data, nothing computed).
    shadows = {name: _shadow(name, x) for name, x in named.items()}
    sq, sk, sv = shadows["q"], shadows["k"], shadows["v"]
    dtype = api._check_qkv(shadows)
    leading = sq.shape[:-2]
    group = chk.check_heads(sq, sk, sv)
    chk.check_dim("k", sk.shape[-1], sq.shape[-1], "last dimension d =", "q")
    chk.check_dim("v", sv.shape[-2], sk.shape[-2], "key count Nk =", "k")
    scale = chk.check_scale(scale, sq.shape[-1])
    causal = chk.check_flag("causal", causal)
    window = chk.check_window(window)
    nq, nk = sq.shape[-2], sk.shape[-2]
    full = leading + (nq, nk)
    api._check_options(shadows, dtype, full, {})
    diag, reach = api._diagonal(diagonal, leading)
    table = api._dense_table(leading, nq, nk, key_lengths, query_lengths, diag)
    has_lengths = key_lengths is not None or query_lengths is not None
    per_batch = has_lengths or (diag is not None and diag.ndim == 1)
    if per_batch:  # (B, COLUMNS): the table's rows index the batch axis
        rows = table[(slice(None),) + (0,) * (len(leading) - 1)]
    else:
        rows = table.reshape(-1, seqs.COLUMNS)[:1]
    q_len, k_len, align = rows[:, seqs.Q_LEN], rows[:, seqs.K_LEN], rows[:, seqs.ALIGN]

    # Window with causal folded in, as api._window; j - i - off must lie in [lo, hi].
    left, right = api._window(window, causal, nq + nk + reach)
    big = nq + nk + reach + 1
    lo = -big if left < 0 else -left
    hi = big if right < 0 else right
    aligned = causal or left >= 0 or right >= 0

    # Chunks: k/v follow q on the leading axes (heads: per group), v follows k on Nk.
    nl = len(leading)
    lead_chunks = list(q.chunks[:nl])
    kv_lead = list(lead_chunks)
    if group != 1:
        lead_chunks[-1] = _group_chunks(q.chunks[nl - 1], group)
        kv_lead[-1] = tuple(c // group for c in lead_chunks[-1])
    q_chunks, k_chunks = q.chunks[nl], k.chunks[nl]
    d, dv = sq.shape[-1], sv.shape[-1]
    q = q.rechunk((*lead_chunks, q_chunks, (d,)))
    k = k.rechunk((*kv_lead, k_chunks, (d,)))
    v = v.rechunk((*kv_lead, k_chunks, (dv,)))
    target = (*lead_chunks, q_chunks, k_chunks)
    opts: dict[str, tuple[da.Array, tuple[bool, ...]]] = {}
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None:
            opts[name] = _option_chunks(x, full, target)

    token = tokenize(
        q, k, v, *(o[0] for o in opts.values()), sorted(opts), scale, causal, window,
        None if key_lengths is None else np.asarray(key_lengths),
        None if query_lengths is None else np.asarray(query_lengths),
        diag, split, return_lse, threads,
    )  # fmt: skip
    pair_name = f"attention-pair-{token}"
    merge_name = f"attention-merge-{token}"
    out_name = f"attention-out-{token}"
    lse_name = f"attention-lse-{token}"
    dt = str(np.dtype(dtype))

    dsk: dict[Any, Any] = {}
    out_keys: dict[Any, Any] = {}
    lse_keys: dict[Any, Any] = {}
    q_starts, k_starts = _starts(q_chunks), _starts(k_chunks)
    b_starts = _starts(lead_chunks[0]) if nl else [0]
    for lead_idx in itertools.product(*(range(len(c)) for c in lead_chunks)):
        kv_idx = lead_idx
        lead_shape = tuple(c[i] for c, i in zip(lead_chunks, lead_idx))
        if per_batch:
            b0 = b_starts[lead_idx[0]]
            rows_slice = slice(b0, b0 + lead_shape[0])
        else:
            rows_slice = slice(0, 1)
        ql, kl, off = q_len[rows_slice], k_len[rows_slice], align[rows_slice]
        for qi, (q0, nqc) in enumerate(zip(q_starts, q_chunks)):
            parts = []
            for ki, (k0, nkc) in enumerate(zip(k_starts, k_chunks)):
                vis = _pair_visible(q0, q0 + nqc, k0, k0 + nkc, ql, kl, off, lo, hi)
                if not vis.any():
                    continue  # fully masked (or empty): no task
                options: dict[str, Any] = {"scale": scale}
                if has_lengths:
                    options["query_lengths"] = np.clip(ql - q0, 0, nqc)
                    options["key_lengths"] = np.clip(kl - k0, 0, nkc)
                if aligned:  # causal folded into the window, as the in-memory call does
                    options["window"] = (left, right)
                    local = _local_diagonal(off + q0 - k0, nqc, nkc, left, right)
                    options["diagonal"] = local if per_batch else int(local[0])
                args: list[Any] = [
                    (q.name, *lead_idx, qi, 0),
                    (k.name, *kv_idx, ki, 0),
                    (v.name, *kv_idx, ki, 0),
                ]
                for name in ("bias", "mask"):
                    if name in opts:
                        arr, bcast = opts[name]
                        idx = (*lead_idx, qi, ki)
                        args.append((arr.name, *(0 if b else i for b, i in zip(bcast, idx))))
                    else:
                        args.append(None)
                key = (pair_name, *lead_idx, qi, ki)
                task = functools.partial(_pair, library=library, threads=threads, options=options)
                dsk[key] = (task, *args)
                parts.append(key)
            final = _reduce(dsk, parts, merge_name, (*lead_idx, qi), split, library, threads)
            if final is None:
                final = (merge_name, *lead_idx, qi, "empty")
                dsk[final] = (
                    _nothing_visible, (*lead_shape, nqc, dv), (*lead_shape, nqc), dt, library
                )  # fmt: skip
            out_key = (out_name, *lead_idx, qi, 0)
            lse_key = (lse_name, *lead_idx, qi)
            out_keys[out_key] = (_take, final, 0)
            lse_keys[lse_key] = (_take, final, 1)

    deps: list[Any] = [q, k, v, *(o[0] for o in opts.values())]
    dsk.update(out_keys)
    graph = HighLevelGraph.from_collections(out_name, dsk, dependencies=deps)
    xp_meta = q._meta
    out = da.Array(
        graph,
        out_name,
        chunks=(*lead_chunks, q_chunks, (dv,)),
        meta=meta_from_array(xp_meta, ndim=nl + 2, dtype=dtype),
    )
    if not return_lse:
        return out
    lse_graph = HighLevelGraph.from_collections(lse_name, lse_keys, dependencies=[cast(Any, out)])
    lse = da.Array(
        lse_graph,
        lse_name,
        chunks=(*lead_chunks, q_chunks),
        meta=meta_from_array(xp_meta, ndim=nl + 1, dtype=dtype),
    )
    return out, lse


def _reduce(
    dsk: dict[Any, Any],
    parts: list[Any],
    name: str,
    index: tuple[int, ...],
    split: int,
    library: str,
    threads: int | None,
) -> Any:
    """Tree of merge tasks over ``parts`` (at most ``split`` per task); the root key."""
    level = 0
    task = functools.partial(_merge, library=library, threads=threads)
    while len(parts) > 1:
        merged = []
        for g, start in enumerate(range(0, len(parts), split)):
            group = parts[start : start + split]
            if len(group) == 1:
                merged.append(group[0])
                continue
            key = (name, *index, level, g)
            dsk[key] = (task, group)
            merged.append(key)
        parts = merged
        level += 1
    return parts[0] if parts else None
