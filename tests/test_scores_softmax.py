"""numbattn.scores and numbattn.softmax on the CPU against numbattn.reference."""

import numpy as np
import pytest

import numbattn
from numbattn import reference

from .helpers import DTYPES, assert_close, poisoned, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "leading,nq,nk,d",
    [((2, 3), 37, 29, 16), ((1,), 29, 37, 80), ((), 70, 130, 1), ((2,), 5, 9, 256)],
    ids=str,
)
def test_scores_match_reference(rng, tiles, dtype, causal, leading, nq, nk, d):
    q = randn(rng, leading + (nq, d), dtype)
    k = randn(rng, leading + (nk, d), dtype)
    out = poisoned(leading + (nq, nk), dtype)
    assert numbattn.scores(q, k, causal=causal, out=out) is out
    assert_close(out, reference.scores(q, k, causal=causal), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_non_contiguous_and_scale(rng, tiles, dtype):
    q = randn(rng, (2, 21, 3, 16), dtype).swapaxes(1, 2)
    k = randn(rng, (2, 3, 16, 34), dtype).swapaxes(-1, -2)[:, :, ::2]
    out = poisoned((2, 3, 17, 21), dtype).swapaxes(-1, -2)
    numbattn.scores(q, k, scale=0.7, out=out)
    assert_close(out, reference.scores(q, k, scale=0.7), dtype)
    got = numbattn.scores(q, k)
    assert got.shape == (2, 3, 21, 17) and got.dtype == dtype
    assert_close(got, reference.scores(q, k), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 37), (1,), (5, 1000), (2, 3, 4, 9), (7, 0)], ids=str)
def test_softmax_matches_reference(rng, dtype, shape):
    x = randn(rng, shape, dtype, scale=3.0)
    out = poisoned(shape, dtype)
    assert numbattn.softmax(x, out=out) is out
    assert_close(out, reference.softmax(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_special_values(rng, dtype):
    x = randn(rng, (6, 50), dtype, scale=1e4)  # naive exp overflows
    x[1, :] = -np.inf  # all masked -> zeros
    x[2, 10] = np.nan  # NaN -> that row NaN
    x[3, ::2] = -np.inf  # partly masked
    x[4, 7] = np.inf  # +inf dominates -> NaN like the reference (inf - inf)
    out = numbattn.softmax(x)
    ref = reference.softmax(x)
    assert np.all(out[1] == 0)
    assert np.all(np.isnan(out[2]))
    assert np.all(out[3, ::2] == 0)
    assert_close(out, ref, dtype)
    assert np.all(np.isfinite(out[[0, 1, 3, 5]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_in_place_and_views(rng, dtype):
    x = randn(rng, (4, 3, 33), dtype)
    expected = reference.softmax(x)
    assert numbattn.softmax(x, out=x) is x
    assert_close(x, expected, dtype)
    y = randn(rng, (33, 4, 3), dtype).transpose(1, 2, 0)  # last axis strided
    out = poisoned((4, 3, 33), dtype)
    numbattn.softmax(y, out=out)
    assert_close(out, reference.softmax(y), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_of_scores_is_attention_weights(rng, dtype):
    """scores -> softmax -> @ v reproduces the fused kernel (the unfused path)."""
    q, k, v = (randn(rng, (2, 19, 8), dtype) for _ in range(3))
    p = numbattn.softmax(numbattn.scores(q, k, causal=True))
    assert_close(p @ v, reference.attention(q, k, v, causal=True)[0], dtype)
