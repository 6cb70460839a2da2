"""The forward's register-blocked micro-kernel (issue 12): attention and
scores on the shared _gemm, overwritten S tiles and row-view packing,
against numbattn.reference with poisoned outputs."""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cpu import kernels as K

from .helpers import DTYPES, assert_close, poisoned, randn


@pytest.mark.parametrize(
    ("features", "machine", "want"),
    [
        ("+avx512f,+avx2,+avx,+fma", "x86_64", (64, 4)),
        ("+avx2,+avx,+fma,-avx512f", "x86_64", (32, 2)),
        ("+sse4.2,-avx,-avx512f", "x86_64", (16, 2)),
        ("+neon,+fp-armv8", "aarch64", (16, 4)),
        ("+neon", "arm64", (16, 4)),
        ("", "ppc64le", (16, 2)),
    ],
)
def test_vector_shape(features, machine, want):
    """Vector width and block from the target's features: a full block's
    accumulators, B vectors and broadcast fit the register file."""
    assert K._vector_shape(features, machine) == want


def test_host_vector_shape():
    vbytes, nv = K._host_vector_shape()
    assert (K._VBYTES, K._NV) == (vbytes, nv)
    assert vbytes in (16, 32, 64) and nv in (2, 4)


@pytest.fixture(params=["odd-tiles", "tiny-tiles"])
def fwd_tiles(request, monkeypatch):
    """Key tiles that are not a whole number of vectors (a 4-vector block,
    fewer whole vectors and a scalar tail in one tile), query tiles not a
    multiple of 4; and tiny tiles."""
    q_tile, k_tile = (13, 72) if request.param == "odd-tiles" else (3, 5)
    monkeypatch.setattr(numbattn.config, "CPU_QUERY_TILE", q_tile)
    monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", k_tile)
    return request.param


def _inputs(rng, dtype, layout, nq=50, nk=150, d=72, dv=40):
    """q, k, v of shape (2, 2, N, d); "strided": (B, N, H, 2d) storage, every
    other element of the last axis (non-unit inner stride: strided packing)."""
    if layout == "contiguous":
        q = randn(rng, (2, 2, nq, d), dtype)
        k = randn(rng, (2, 2, nk, d), dtype)
        v = randn(rng, (2, 2, nk, dv), dtype)
    else:
        q = randn(rng, (2, nq, 2, 2 * d), dtype)[..., ::2].swapaxes(1, 2)
        k = randn(rng, (2, nk, 2, 2 * d), dtype)[..., ::2].swapaxes(1, 2)
        v = randn(rng, (2, nk, 2, 2 * dv), dtype)[..., ::2].swapaxes(1, 2)
    return q, k, v


OPTIONS = [
    {},
    {"causal": True},
    {"window": (20, 3)},
    {"causal": True, "key_lengths": np.array([150, 61]), "query_lengths": np.array([50, 37])},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_attention(rng, fwd_tiles, dtype, layout, opts):
    q, k, v = _inputs(rng, dtype, layout)
    if "key_lengths" in opts:
        # Keys past a sequence's length are never read, even NaN / inf.
        k[1, :, 61:] = np.nan
        v[1, :, 61:] = np.inf
    out = poisoned(q.shape[:-1] + (v.shape[-1],), dtype)
    lse = poisoned(q.shape[:-1], dtype)
    numbattn.attention(q, k, v, out=out, lse=lse, **opts)
    ref_out, ref_lse = reference.attention(q, k, v, **opts)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_nan_value_in_a_tile(rng, fwd_tiles, dtype):
    """A NaN value of a visible key (the key-by-key P @ V path) reaches only
    the rows that see it; the other rows of the same tiles stay exact."""
    q, k, v = _inputs(rng, dtype, "contiguous", nq=40, nk=40)
    v[0, 1, 30, 5] = np.nan
    out = poisoned(q.shape[:-1] + (v.shape[-1],), dtype)
    lse = poisoned(q.shape[:-1], dtype)
    numbattn.attention(q, k, v, out=out, lse=lse, causal=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert np.isnan(out[0, 1, 30:, 5]).all() and not np.isnan(out[0, 1, :30]).any()
    assert_close(out, ref_out, dtype, "out")  # NaN where the reference has it
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("opts", OPTIONS[:3], ids=str)
def test_scores(rng, fwd_tiles, dtype, layout, opts):
    q, k, _ = _inputs(rng, dtype, layout)
    out = poisoned(q.shape[:-1] + (k.shape[-2],), dtype)
    numbattn.scores(q, k, out=out, **opts)
    assert_close(out, reference.scores(q, k, **opts), dtype, "scores")
