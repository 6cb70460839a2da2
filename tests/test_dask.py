"""numbattn.dask: chunked attention on Dask arrays against the in-memory call and the reference.

Everything but the cluster test runs on dask's synchronous scheduler, in
this process, so numbattn's kernels compile once per dtype for the session
(the same specialisations as every other test). Outputs are poisoned: the
kernels' output buffers and the lse buffers of the pair and merge tasks
are NaN-filled, so an element that no task writes fails.
"""

import re

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import numbattn  # noqa: E402
import numbattn.dask as nd  # noqa: E402
from numbattn import reference  # noqa: E402
from numbattn.cpu import backend as cpu_backend  # noqa: E402

from .helpers import DTYPES, assert_close, randn  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned_sync(monkeypatch):
    """Synchronous scheduler; every buffer a task allocates starts as NaN."""

    def empty(shape, dtype, like=None, stream=None):
        arr = np.full(shape, np.nan, dtype=dtype)
        return arr, arr

    def empty_lse(library, shape, dtype):
        return np.full(shape, np.nan, dtype=dtype)

    monkeypatch.setattr(cpu_backend, "empty", empty)
    monkeypatch.setattr(nd, "_empty", empty_lse)
    with dask.config.set(scheduler="sync"):
        yield


# (B, H, Hk, Nq, Nk, d, dv), q chunks, k chunks (k's leading chunks are realigned to q's).
CHUNKINGS = {
    "one-chunk": ((2, 4, 4, 13, 17, 8, 5), (2, 4, 13, 8), (2, 4, 17, 8)),
    "uneven": ((3, 4, 4, 19, 23, 8, 5), ((2, 1), (1, 3), (7, 5, 7), 3), (1, 2, (10, 13), 8)),
    "size-1": ((2, 2, 2, 4, 5, 4, 3), (1, 1, 1, 4), (1, 1, 1, 4)),
    "key-chunks": ((2, 4, 4, 16, 29, 8, 5), (2, 2, 8, 8), (2, 4, (5, 5, 5, 5, 9), 8)),
    "gqa-heads": ((2, 6, 2, 11, 14, 8, 5), (1, 1, (4, 7), 8), (2, 1, 5, 8)),
}

OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (4, 2)},
    "window-causal": {"window": (6, -1), "causal": True},
    "window-huge": {"window": (10**30, 3)},
    "lengths": {"key_lengths": "k", "query_lengths": "q"},
    "lengths-causal": {"key_lengths": "k", "query_lengths": "q", "causal": True},
    "lengths-window": {"key_lengths": "k", "window": (3, 1)},
    "bias-mask": {"bias": "full", "mask": "broadcast", "scale": 0.3},
    "bias-broadcast-causal": {"bias": "broadcast", "causal": True},
    "diagonal-causal": {"diagonal": "int", "causal": True},
    "diagonal-batch-window": {"diagonal": "batch", "window": (2, 3), "key_lengths": "k"},
}


def _inputs(rng, dims, dtype, chunks):
    b, h, hk, nq, nk, d, dv = dims
    q = randn(rng, (b, h, nq, d), dtype)
    k = randn(rng, (b, hk, nk, d), dtype)
    v = randn(rng, (b, hk, nk, dv), dtype)
    qc, kc = chunks
    return (q, k, v), (da.from_array(q, qc), da.from_array(k, kc), da.from_array(v, kc[:-1] + (3,)))


def _options(rng, spec, dims, dtype):
    b, h, _, nq, nk, _, _ = dims
    opts = {}
    for name, value in spec.items():
        if name == "key_lengths":
            opts[name] = rng.integers(0, nk + 1, b)
            opts[name][0] = nk
        elif name == "query_lengths":
            opts[name] = rng.integers(0, nq + 1, b)
        elif name == "bias":
            shape = (b, h, nq, nk) if value == "full" else (1, h, 1, nk)
            opts[name] = randn(rng, shape, dtype)
        elif name == "diagonal":
            opts[name] = int(rng.integers(-nq, nk)) if value == "int" else rng.integers(-nq, nk, b)
        elif name == "mask":
            opts[name] = rng.random((b, 1, nq, nk)) < 0.7
        else:
            opts[name] = value
    return opts


def _as_dask_options(opts, qc):
    """bias as a chunked dask array (mask stays NumPy: both forms are accepted)."""
    out = dict(opts)
    if "bias" in opts:
        out["bias"] = da.from_array(opts["bias"], chunks=(1, 2, 5, 7))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_matches_in_memory_and_reference(rng, chunking, option, dtype):
    dims, qc, kc = CHUNKINGS[chunking]
    (q, k, v), (dq, dk, dv) = _inputs(rng, dims, dtype, (qc, kc))
    opts = _options(rng, OPTIONS[option], dims, dtype)
    out, lse = nd.attention(
        dq, dk, dv, return_lse=True, split_every=2, **_as_dask_options(opts, qc)
    )
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and lse.shape == q.shape[:-1]
    got, got_lse = dask.compute(out, lse)
    assert type(got) is np.ndarray and got.shape == out.shape and got_lse.shape == lse.shape

    mem_lse = np.full(q.shape[:-1], np.nan, dtype)
    mem = numbattn.attention(q, k, v, lse=mem_lse, **opts)
    np.testing.assert_allclose(got, mem, rtol=0, atol=50 * np.finfo(dtype).eps)
    np.testing.assert_allclose(got_lse, mem_lse, rtol=0, atol=50 * np.finfo(dtype).eps)

    ref, ref_lse = reference.attention(q, k, v, **opts)
    assert_close(got, ref, dtype, f"out {chunking} {option}")
    assert_close(got_lse, ref_lse, dtype, f"lse {chunking} {option}")


def _pair_tasks(arr):
    return [key for key in dict(arr.__dask_graph__()) if key[0].startswith("attention-pair-")]


def test_fully_masked_causal_pairs_are_absent(rng):
    """4 query x 4 key chunks of 8 (Nq = Nk): causal leaves the 10 pairs on and below the diagonal."""
    q = da.from_array(randn(rng, (2, 3, 32, 4), np.float64), chunks=(2, 3, 8, 4))
    k = da.from_array(randn(rng, (2, 3, 32, 4), np.float64), chunks=(2, 3, 8, 4))
    pairs = {key[-2:] for key in _pair_tasks(nd.attention(q, k, k))}
    assert len(pairs) == 16
    pairs = {key[-2:] for key in _pair_tasks(nd.attention(q, k, k, causal=True))}
    assert pairs == {(i, j) for i in range(4) for j in range(4) if j <= i}
    # A window of 3 keys to the left: each query chunk sees its own and the previous key chunk.
    pairs = {key[-2:] for key in _pair_tasks(nd.attention(q, k, k, window=(3, 0)))}
    assert pairs == {(i, j) for i in range(4) for j in (i - 1, i) if j >= 0}


def test_masked_pairs_follow_lengths_and_bottom_right_alignment(rng):
    """Nq = 16, Nk = 32 (off = 16): with key lengths, alignment moves per batch element."""
    q = da.from_array(randn(rng, (2, 1, 16, 4), np.float64), chunks=(1, 1, 8, 4))
    k = da.from_array(randn(rng, (2, 1, 32, 4), np.float64), chunks=(1, 1, 8, 4))
    pairs = {key[1:2] + key[-2:] for key in _pair_tasks(nd.attention(q, k, k, causal=True))}
    assert pairs == {(b, 0, j) for b in (0, 1) for j in range(3)} | {
        (b, 1, j) for b in (0, 1) for j in range(4)
    }
    # Batch 1 has 8 keys and 16 queries: off = -8, so query chunk 0 sees nothing (no pair
    # at all: one task writes zeros) and key chunks past 8 keys are absent.
    lengths = np.array([32, 8])
    pairs = {
        key[1:2] + key[-2:]
        for key in _pair_tasks(nd.attention(q, k, k, causal=True, key_lengths=lengths))
    }
    assert {p for p in pairs if p[0] == 1} == {(1, 1, 0)}


def test_query_chunk_with_no_visible_key_is_zeros(rng):
    """Causal with Nq > Nk: the first query rows see no key (zeros, lse -inf), without a pair task."""
    q_np = randn(rng, (1, 2, 12, 4), np.float32)
    k_np = randn(rng, (1, 2, 4, 4), np.float32)
    q = da.from_array(q_np, chunks=(1, 2, 4, 4))
    k = da.from_array(k_np, chunks=(1, 2, 2, 4))
    out, lse = nd.attention(q, k, k, causal=True, return_lse=True)
    assert {key[-2] for key in _pair_tasks(out)} == {2}  # rows 0..7 see no key (off = -8)
    got, got_lse = dask.compute(out, lse)
    ref, ref_lse = reference.attention(q_np, k_np, k_np, causal=True)
    assert_close(got, ref, np.float32, "out")
    assert_close(got_lse, ref_lse, np.float32, "lse")
    assert np.all(got[:, :, :8] == 0) and np.all(np.isneginf(got_lse[:, :, :8]))


def test_split_every_sets_the_tree_width(rng):
    q_np = randn(rng, (1, 1, 4, 4), np.float64)
    k_np = randn(rng, (1, 1, 40, 4), np.float64)
    q = da.from_array(q_np, chunks=(1, 1, 4, 4))
    k = da.from_array(k_np, chunks=(1, 1, 5, 4))  # 8 key chunks
    ref, _ = reference.attention(q_np, k_np, k_np)
    for split, merges in ((2, 4 + 2 + 1), (3, 3 + 1), (8, 1), (100, 1)):
        out = nd.attention(q, k, k, split_every=split)
        keys = [key for key in dict(out.__dask_graph__()) if key[0].startswith("attention-merge-")]
        assert len(keys) == merges, split
        assert_close(out.compute(), ref, np.float64, f"split_every={split}")
    with dask.config.set(split_every=2):
        out = nd.attention(q, k, k)
        keys = [key for key in dict(out.__dask_graph__()) if key[0].startswith("attention-merge-")]
        assert len(keys) == 7


def test_zero_sizes(rng):
    for nq, nk, b in ((0, 5, 2), (4, 0, 2), (4, 5, 0)):
        q_np = randn(rng, (b, 2, nq, 3), np.float64)
        k_np = randn(rng, (b, 2, nk, 3), np.float64)
        v_np = randn(rng, (b, 2, nk, 2), np.float64)
        out, lse = nd.attention(
            da.from_array(q_np), da.from_array(k_np), da.from_array(v_np), return_lse=True
        )
        got, got_lse = dask.compute(out, lse)
        ref, ref_lse = reference.attention(q_np, k_np, v_np)
        assert_close(got, ref, np.float64, "out")
        assert_close(got_lse, ref_lse, np.float64, "lse")


def test_building_the_graph_runs_no_kernel(rng, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel ran while the graph was built")

    for name in ("attention", "merge", "scores", "softmax"):
        monkeypatch.setattr(cpu_backend, name, refuse)
    q = da.from_array(randn(rng, (2, 2, 8, 4), np.float32), chunks=(1, 2, 4, 4))
    out, lse = nd.attention(q, q, q, return_lse=True)
    assert isinstance(out, da.Array) and isinstance(lse, da.Array)
    assert type(out._meta) is np.ndarray and out._meta.dtype == np.float32
    assert type(lse._meta) is np.ndarray and lse._meta.ndim == 3


def test_importing_numbattn_does_not_import_dask():
    import subprocess
    import sys

    code = "import sys, numbattn; print('dask' in sys.modules, 'distributed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr


def _good(rng, dtype=np.float32):
    q = da.from_array(randn(rng, (2, 4, 6, 3), dtype), chunks=(1, 2, 3, 3))
    k = da.from_array(randn(rng, (2, 2, 5, 3), dtype), chunks=(1, 2, 5, 3))
    v = da.from_array(randn(rng, (2, 2, 5, 2), dtype), chunks=(1, 2, 5, 2))
    return {"q": q, "k": k, "v": v}


BAD = [
    ("q", lambda g: np.zeros((2, 4, 6, 3), np.float32), TypeError, "q must be a dask.array.Array"),
    ("v", lambda g: [[1.0]], TypeError, "v must be a dask.array.Array"),
    ("k", lambda g: g["k"].astype(np.float64), TypeError, "k must have dtype float32"),
    ("q", lambda g: g["q"].astype(np.int32), TypeError, "q must have dtype float32 or float64"),
    ("v", lambda g: g["v"][:, :, :4], ValueError, "v must have key count Nk = 5"),
    ("k", lambda g: g["k"][..., :2], ValueError, "k must have last dimension d = 3"),
    (
        "k",
        lambda g: da.zeros((2, 3, 5, 3), dtype=np.float32),
        ValueError,
        "k must have a number of heads",
    ),
    ("k", lambda g: da.zeros((3, 2, 5, 3), dtype=np.float32), ValueError, "leading"),
    ("q", lambda g: g["q"][0, 0, :, 0], ValueError, "q must have at least 2 dimensions"),
    ("q", lambda g: g["q"][g["q"][:, 0, 0, 0] > 0], ValueError, "q has unknown chunk sizes"),
    ("bias", lambda g: da.zeros((2, 4, 6, 4), dtype=np.float32), ValueError, "bias of shape"),
    (
        "bias",
        lambda g: da.zeros((6, 5), dtype=np.float64),
        TypeError,
        "bias must have dtype float32",
    ),
    ("bias", lambda g: "x", TypeError, "bias must be a dask.array.Array or a numpy.ndarray"),
    ("mask", lambda g: np.ones((6, 5), np.float32), TypeError, "mask must have dtype bool"),
    ("mask", lambda g: np.ma.ones((6, 5), bool), TypeError, "mask is a numpy.ma.MaskedArray"),
    ("key_lengths", lambda g: da.ones(2, dtype=int), TypeError, "key_lengths must be a small host"),
    ("key_lengths", lambda g: np.array([5, 6]), ValueError, "key_lengths must lie in"),
    ("query_lengths", lambda g: np.array([1, 2, 3]), ValueError, "query_lengths must have shape"),
    ("key_lengths", lambda g: np.array([1.0, 2.0]), TypeError, "integer dtype"),
    ("causal", lambda g: 1, TypeError, "causal must be a bool"),
    ("diagonal", lambda g: da.zeros(2, dtype=int), TypeError, "diagonal must be a small host"),
    ("diagonal", lambda g: np.array([1, 2, 3]), ValueError, "diagonal must be an int or have"),
    ("diagonal", lambda g: 2.5, TypeError, "diagonal must be an integer array"),
    ("return_lse", lambda g: "yes", TypeError, "return_lse must be a bool"),
    ("window", lambda g: (1,), TypeError, "window must be a pair"),
    ("window", lambda g: (-2, 0), ValueError, "window left must be >= -1"),
    ("scale", lambda g: float("inf"), ValueError, "scale must be finite"),
    ("scale", lambda g: "1", TypeError, "scale must be a real number"),
    ("split_every", lambda g: 1, ValueError, "split_every must be >= 2"),
    ("split_every", lambda g: 0, ValueError, "split_every must be >= 2, got 0"),
    ("split_every", lambda g: 2.0, TypeError, "split_every must be an integer"),
]


@pytest.mark.parametrize(("arg", "make", "exc", "message"), BAD, ids=[b[3] for b in BAD])
def test_bad_input_raises_when_the_graph_is_built(rng, arg, make, exc, message):
    args = _good(rng)
    args[arg] = make(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=re.escape(message)):
        nd.attention(q, k, v, **args)


EXTREME_DIAGONALS = [2**60, -(2**60), 2**60 - 3, 5 - 2**60, "per-batch"]
EXTREME_WINDOWS = [
    {"causal": True},
    {"window": (3, -1)},
    {"window": (-1, 2)},
    {"window": (3, 2)},
    {"window": (2, 0), "causal": True},
]


@pytest.mark.parametrize("opts", EXTREME_WINDOWS, ids=str)
@pytest.mark.parametrize("diagonal", EXTREME_DIAGONALS, ids=str)
def test_diagonals_at_the_limit(rng, diagonal, opts):
    """A block's diagonal ``diagonal + q0 - k0`` may pass +-2**60 when the
    caller's is near it: each block's is clamped where its visibility does
    not change, so every diagonal the in-memory call takes computes."""
    if diagonal == "per-batch":
        diagonal = np.array([2**60, -(2**60)])
    q, k, v = (randn(rng, (2, 1, n, 4), np.float64) for n in (5, 6, 6))
    dq, dk, dv = (da.from_array(x, chunks=(1, 1, 2, 4)) for x in (q, k, v))
    got = nd.attention(dq, dk, dv, diagonal=diagonal, **opts).compute()
    mem = numbattn.attention(q, k, v, diagonal=diagonal, **opts)
    np.testing.assert_allclose(got, mem, rtol=0, atol=50 * np.finfo(np.float64).eps)
    ref = reference.attention(q, k, v, diagonal=diagonal, **opts)[0]
    assert_close(got, ref, np.float64, f"diagonal {diagonal} {opts}")


def test_block_diagonal_past_the_limit_raises_when_the_graph_is_built(rng):
    """A window side within Nq + Nk of 2**60 bounds a block whose diagonal
    passes 2**60 and cannot be clamped: refused at graph construction."""
    x = da.from_array(randn(rng, (1, 1, 4, 4), np.float64), chunks=(1, 1, 2, 4))
    k = x.rechunk((1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"local diagonal 1152921504606846978, beyond \+-2\*\*60"):
        nd.attention(x, k, k, diagonal=2**60, window=(2**60 + 1, -1))


def test_lengths_need_a_batch_axis(rng):
    q = da.from_array(randn(rng, (6, 3), np.float64))
    with pytest.raises(ValueError, match="key_lengths and query_lengths need a batch dimension"):
        nd.attention(q, q, q, key_lengths=np.array([3]))


def test_unaligned_leading_chunks_and_gqa_heads_are_rechunked(rng):
    """k/v leading chunks follow q's; q's head chunks round up to whole key-head groups."""
    q_np = randn(rng, (4, 6, 5, 3), np.float64)
    k_np = randn(rng, (4, 3, 7, 3), np.float64)
    q = da.from_array(q_np, chunks=(3, 1, 5, 3))
    k = da.from_array(k_np, chunks=(1, 3, 2, 3))
    out = nd.attention(q, k, k)
    assert out.chunks == ((3, 1), (2, 2, 2), (5,), (3,))
    assert_close(out.compute(), reference.attention(q_np, k_np, k_np)[0], np.float64, "out")


def test_threads_per_task(rng, monkeypatch):
    """The config key sets Numba's thread count inside each task, and it is restored after."""
    import numba

    seen = []
    real = cpu_backend.attention

    def spy(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_backend, "attention", spy)
    before = numba.get_num_threads()
    q_np = randn(rng, (2, 1, 6, 3), np.float64)
    q = da.from_array(q_np, chunks=(1, 1, 3, 3))
    with dask.config.set({nd.THREADS_KEY: 1}):
        out = nd.attention(q, q, q)
    out.compute()
    assert seen and set(seen) == {1}
    assert numba.get_num_threads() == before


def test_threads_config_is_checked(rng):
    q = da.from_array(randn(rng, (1, 1, 4, 3), np.float64))
    for bad in (0, "2", True):
        with (
            dask.config.set({nd.THREADS_KEY: bad}),
            pytest.raises(ValueError, match=re.escape(nd.THREADS_KEY)),
        ):
            nd.attention(q, q, q)


def test_concurrent_tasks_on_the_threaded_scheduler(rng):
    """Two worker threads launching parallel kernels at once (threads_per_worker > 1):
    the threading layer in use must be thread-safe (numbattn serialises workqueue)."""
    q_np = randn(rng, (4, 2, 24, 8), np.float32)
    q = da.from_array(q_np, chunks=(1, 2, 8, 8))
    k = da.from_array(q_np, chunks=(1, 2, 6, 8))
    out = nd.attention(q, k, k)
    got = out.compute(scheduler="threads", num_workers=2)
    assert_close(got, reference.attention(q_np, q_np, q_np)[0], np.float32, "out")


WORKQUEUE_SCRIPT = """
import dask, dask.array as da, numba, numpy as np
import numbattn.dask as nd
from numbattn import reference
rng = np.random.default_rng(0)
q = rng.standard_normal((8, 2, 32, 8))
d = da.from_array(q, chunks=(1, 2, 16, 8))
with dask.config.set({nd.THREADS_KEY: 2}):
    out = nd.attention(d, d, d, causal=True)
got = out.compute(scheduler="threads", num_workers=4)
err = reference.relative_error(got, reference.attention(q, q, q, causal=True)[0])
print(numba.threading_layer(), err < 1e-12)
"""


def test_workqueue_layer_with_concurrent_tasks():
    """Numba's workqueue layer aborts on concurrent parallel launches: four task
    threads with two Numba threads each must still run (numbattn serialises them)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    result = subprocess.run(
        [sys.executable, "-c", WORKQUEUE_SCRIPT], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["workqueue", "True"], result.stdout + result.stderr[-2000:]


def test_auto_threads_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert nd._auto_threads() is None  # main thread: the synchronous scheduler
    import threading

    result = []
    with dask.config.set(num_workers=2):
        t = threading.Thread(target=lambda: result.append(nd._auto_threads()))
        t.start()
        t.join()
    import os

    assert result == [max(1, len(os.sched_getaffinity(0)) // 2)]


def test_local_cluster_processes(rng):
    """Two worker processes (pickling, spawn, per-worker compilation), causal, key chunks."""
    distributed = pytest.importorskip("distributed")
    q_np = randn(rng, (2, 2, 24, 8), np.float32)
    k_np = randn(rng, (2, 2, 32, 8), np.float32)
    v_np = randn(rng, (2, 2, 32, 4), np.float32)
    q = da.from_array(q_np, chunks=(1, 2, 12, 8))
    k = da.from_array(k_np, chunks=(1, 2, 8, 8))
    v = da.from_array(v_np, chunks=(1, 2, 8, 4))
    causal = True
    out, lse = nd.attention(q, k, v, causal=causal, return_lse=True)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        got, got_lse = client.compute([out, lse], sync=True)
        workers = list(client.scheduler_info()["workers"])
        futures = [client.submit(nd._auto_threads, pure=False, workers=[w]) for w in workers]
        threads = client.gather(futures)
    assert threads == [1, 1]  # OMP_NUM_THREADS=1 from dask's nanny
    ref, ref_lse = reference.attention(q_np, k_np, v_np, causal=causal)
    assert_close(got, ref, np.float32, "out")
    assert_close(got_lse, ref_lse, np.float32, "lse")


def test_bench_dask_runs(capsys):
    """`python -m numbattn bench --dask` on a tiny problem: checked result, figures present."""
    pytest.importorskip("distributed")
    from numbattn.__main__ import main

    rc = main(
        "bench --dask --shape 2,2,64,8 --dask-chunks 2,2,2 --causal yes --min-repeat 1 "
        "--no-progress --json".split()
    )
    import json

    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    (record,) = doc["results"]
    assert record["causal"] and record["rel_error_vs_in_memory"] <= 1e-5
    assert len(record["worker_peak_above_held_MiB"]) == 2
