"""The ``diagonal`` keyword: where causal and window are aligned.

Query i is aligned with key ``i + diagonal`` (default Nk - Nq per batch
element, bottom-right). Its purpose: a block of a larger problem computes its
exact part of the whole (numbattn.dask builds on this), so the main test cuts
problems into query x key blocks and merges the blocks back.
"""

import itertools

import numpy as np
import pytest

import numbattn
from numbattn import reference

from .helpers import DTYPES, assert_close, poisoned, randn

DIAGONALS = (-20, -5, -1, 0, 3, 11, 40, 2**60, -(2**60))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("diagonal", DIAGONALS)
@pytest.mark.parametrize("causal, window", [(True, None), (False, (2, 1)), (True, (4, 0))])
def test_matches_reference(rng, tiles, dtype, diagonal, causal, window):
    nq, nk = 9, 13
    q, k, v = (randn(rng, (2, 2, n, 8), dtype) for n in (nq, nk, nk))
    kw = dict(causal=causal, window=window, diagonal=diagonal)
    out, lse = poisoned((2, 2, nq, 8), dtype), poisoned((2, 2, nq), dtype)
    numbattn.attention(q, k, v, out=out, lse=lse, **kw)
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    s = poisoned((2, 2, nq, nk), dtype)
    numbattn.scores(q, k, out=s, **kw)
    assert_close(s, reference.scores(q, k, **kw), dtype, "scores")


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_is_bottom_right_per_batch_element(rng, dtype):
    q, k, v = (randn(rng, (3, 2, n, 4), dtype) for n in (6, 10, 10))
    qlen, klen = np.array([6, 2, 5]), np.array([10, 7, 1])
    kw = dict(causal=True, window=(3, -1), key_lengths=klen, query_lengths=qlen)
    implicit = numbattn.attention(q, k, v, **kw)
    explicit = numbattn.attention(q, k, v, diagonal=klen - qlen, **kw)
    np.testing.assert_array_equal(implicit, explicit)
    scalar = numbattn.attention(q[:1], k[:1], v[:1], causal=True, diagonal=4)
    np.testing.assert_array_equal(scalar, numbattn.attention(q[:1], k[:1], v[:1], causal=True))
    top_left = numbattn.attention(q, k, v, causal=True, diagonal=0)
    assert_close(top_left, reference.attention(q, k, v, causal=True, diagonal=0)[0], dtype)


def _blocks(n, cuts):
    edges = [0, *cuts, n]
    return list(itertools.pairwise(edges))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "causal, window, lengths", [(True, None, False), (False, (5, 2), True), (True, (7, 0), True)]
)
def test_blocks_of_a_larger_problem_merge_to_the_whole(rng, dtype, causal, window, lengths):
    """Each (query block, key block) with diagonal = off + r0 - c0 and its
    slice of the lengths, merged over key blocks, is the whole problem."""
    b, h, nq, nk, d = 3, 2, 17, 23, 8
    q, k, v = (randn(rng, (b, h, n, d), dtype) for n in (nq, nk, nk))
    qlen = np.array([17, 9, 0]) if lengths else np.full(b, nq)
    klen = np.array([23, 14, 5]) if lengths else np.full(b, nk)
    whole = dict(causal=causal, window=window)
    if lengths:
        whole.update(key_lengths=klen, query_lengths=qlen)
    ref_out, ref_lse = reference.attention(q, k, v, **whole)
    out = np.empty_like(ref_out, dtype=dtype)
    lse = np.empty_like(ref_lse, dtype=dtype)
    for r0, r1 in _blocks(nq, [5, 6, 12]):
        parts, lses = [], []
        for c0, c1 in _blocks(nk, [4, 13, 20]):
            kw = dict(
                causal=causal,
                window=window,
                diagonal=klen - qlen + r0 - c0,
                query_lengths=np.clip(qlen - r0, 0, r1 - r0),
                key_lengths=np.clip(klen - c0, 0, c1 - c0),
            )
            o, lse_part = poisoned((b, h, r1 - r0, d), dtype), poisoned((b, h, r1 - r0), dtype)
            numbattn.attention(
                q[..., r0:r1, :], k[..., c0:c1, :], v[..., c0:c1, :], out=o, lse=lse_part, **kw
            )
            parts.append(o)
            lses.append(lse_part)
        numbattn.merge_attention(parts, lses, out=out[..., r0:r1, :], lse=lse[..., r0:r1])
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


def test_errors_name_the_argument_and_write_nothing(rng):
    q, k, v = (randn(rng, (2, 1, 4, 4), np.float32) for _ in range(3))
    out = poisoned((2, 1, 4, 4), np.float32)
    cases = [
        (True, TypeError, "diagonal"),
        (1.5, TypeError, "diagonal"),
        (np.array([1.0, 2.0]), TypeError, "integer dtype"),
        (np.array([1, 2, 3]), ValueError, r"shape \(2,\)"),
        (2**60 + 1, ValueError, "2\\*\\*60"),
        (np.array([0, -(2**61)]), ValueError, "2\\*\\*60"),
    ]
    for diagonal, err, match in cases:
        with pytest.raises(err, match=match):
            numbattn.attention(q, k, v, causal=True, diagonal=diagonal, out=out)
        with pytest.raises(err, match=match):
            numbattn.scores(q, k, causal=True, diagonal=diagonal)
        assert np.isnan(out).all()
    no_batch = (q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(
        ValueError,
        match=r"^diagonal must be an int when q has no batch dimension, got an array of shape \(1,\)$",
    ):
        numbattn.attention(*no_batch, diagonal=np.array([1]))
    with pytest.raises(
        TypeError,
        match=r"^diagonal must be an int \(q has no batch dimension\), got builtins\.float$",
    ):
        numbattn.attention(*no_batch, diagonal=1.0)


@pytest.mark.parametrize("batch", [True, False])
def test_zero_dimensional_integer_array_is_an_int(rng, batch):
    """np.array(1) is taken as np.int64(1) is, with or without a batch axis."""
    q, k, v = (randn(rng, (2, 1, 4, 4) if batch else (4, 4), np.float64) for _ in range(3))
    want = numbattn.attention(q, k, v, causal=True, diagonal=np.int64(1))
    for diagonal in (np.array(1), np.array(1, dtype=np.uint8)):
        got = numbattn.attention(q, k, v, causal=True, diagonal=diagonal)
        assert np.array_equal(got, want)
    assert_close(want, reference.attention(q, k, v, causal=True, diagonal=1)[0], np.float64)
