"""The fused CPU kernel's grouped work items (issue 12): several query tiles
of one head share each packed K / V tile (``_tile_group``), against
numbattn.reference with poisoned outputs."""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cpu import backend as cpu_backend
from numbattn.cpu import kernels as K

from .helpers import DTYPES, assert_close, poisoned, randn

Q_TILE, K_TILE, THREADS = 8, 12, 2


@pytest.mark.parametrize(
    ("n_qt", "heads", "rows", "width", "itemsize", "nthr", "want"),
    [
        (8, 32, 128, 128, 4, 2, K._GROUP_MAX),  # (1, 32, 1024, 64) float32
        (4, 32, 128, 128, 4, 2, 4),  # (4, 8, 512, 64)
        (16, 8, 128, 128, 8, 2, 2),  # float64: 128 KiB of Q and O per tile
        (32, 8, 128, 256, 8, 2, 1),  # float64, d = 128: one tile fills the budget
        (16, 1, 128, 128, 4, 2, 1),  # one head: 16 items for 2 threads
        (16, 2, 128, 128, 4, 2, 2),  # 16 items of 2 tiles
        (3, 64, 128, 128, 4, 2, 3),  # no more tiles than the head has
        (1, 64, 128, 128, 4, 2, 1),
        (0, 4, 4, 8, 4, 2, 1),  # no queries
    ],
)
def test_tile_group(n_qt, heads, rows, width, itemsize, nthr, want):
    assert K._tile_group(n_qt, heads, rows, width, itemsize, nthr) == want


@pytest.fixture
def grouped(monkeypatch):
    """Tiny tiles and a fixed thread count for the work grid (Numba may run
    more threads: the kernel then allocates their scratch per item), so the
    shapes below get items of several query tiles."""
    monkeypatch.setattr(numbattn.config, "CPU_QUERY_TILE", Q_TILE)
    monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", K_TILE)
    monkeypatch.setattr(cpu_backend, "_threads", lambda: THREADS)


def _group(heads, nq, d, dv, dtype):
    """The tiles per item the kernel picks for this call (as it computes it)."""
    n_qt = -(-nq // Q_TILE)
    rows = -(-min(Q_TILE, nq) // 4) * 4
    return K._tile_group(n_qt, heads, rows, d + dv, np.dtype(dtype).itemsize, THREADS)


# (B, H, Hk, Nq, Nk, d, dv): tails everywhere (Nq, Nk off the tiles; the
# last item of a head with fewer tiles), Nq != Nk both ways, GQA.
SHAPES = [
    (2, 4, 4, 70, 61, 16, 24),
    (2, 4, 2, 45, 83, 20, 8),
    (1, 9, 3, 37, 37, 32, 32),
]
OPTIONS = [
    {},
    {"causal": True},
    {"window": (9, 2)},
    {"window": (-1, 5)},
    {"window": (6, -1)},
    {"causal": True, "key_lengths": "k", "query_lengths": "q"},
    {"key_lengths": "k", "query_lengths": "q"},
    {"bias": True},
    {"mask": True, "causal": True},
]


def _inputs(rng, shape, dtype):
    b, h, hk, nq, nk, d, dv = shape
    q = randn(rng, (b, h, nq, d), dtype)
    k = randn(rng, (b, hk, nk, d), dtype)
    v = randn(rng, (b, hk, nk, dv), dtype)
    return q, k, v


def _options(rng, opts, shape, dtype):
    b, h, _, nq, nk, _, _ = shape
    kw = dict(opts)
    if kw.get("key_lengths") == "k":
        kw["key_lengths"] = rng.integers(0, nk + 1, b)
        kw["key_lengths"][0] = nk
    if kw.get("query_lengths") == "q":
        kw["query_lengths"] = rng.integers(0, nq + 1, b)
        kw["query_lengths"][-1] = nq - 3
    if kw.get("bias") is True:
        kw["bias"] = randn(rng, (b, h, nq, nk), dtype)
        kw["bias"][..., ::7] = -np.inf
    if kw.get("mask") is True:
        kw["mask"] = rng.random((b, h, nq, nk)) < 0.8
    return kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_grouped_items(rng, grouped, dtype, opts, shape):
    b, h, _, nq, _, d, dv = shape
    assert _group(b * h, nq, d, dv, dtype) > 1  # the path under test
    q, k, v = _inputs(rng, shape, dtype)
    kw = _options(rng, opts, shape, dtype)
    out = poisoned((b, h, nq, dv), dtype)
    lse = poisoned((b, h, nq), dtype)
    numbattn.attention(q, k, v, out=out, lse=lse, **kw)
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_strided_views(rng, grouped, dtype):
    """(B, N, H, d) storage with every other element of the last axis: the
    strided packing of Q, K and V in grouped items."""
    b, h, nq, nk, d = 2, 4, 50, 40, 24
    assert _group(b * h, nq, d, d, dtype) > 1
    q, k, v = (randn(rng, (b, n, h, 2 * d), dtype)[..., ::2].swapaxes(1, 2) for n in (nq, nk, nk))
    out = poisoned((b, h, nq, d), dtype)
    lse = poisoned((b, h, nq), dtype)
    numbattn.attention(q, k, v, out=out, lse=lse, causal=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_nan_value(rng, grouped, dtype):
    """A NaN value in a key tile shared by a group (the key-by-key P @ V
    path for every tile of the item) reaches only the rows that see it."""
    b, h, nq, d = 1, 8, 40, 16
    assert _group(b * h, nq, d, d, dtype) > 1
    q, k, v = (randn(rng, (b, h, nq, d), dtype) for _ in range(3))
    v[0, 3, 30, 5] = np.nan
    out = poisoned(q.shape, dtype)
    lse = poisoned(q.shape[:-1], dtype)
    numbattn.attention(q, k, v, out=out, lse=lse, causal=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert np.isnan(out[0, 3, 30:, 5]).all() and not np.isnan(out[0, 3, :30]).any()
    assert not np.isnan(np.delete(out, 3, axis=1)).any()
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
