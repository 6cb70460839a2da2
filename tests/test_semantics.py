"""Edge semantics shared by the reference and the CPU kernels (issue 8).

- Window sides of any size (sys.maxsize, 2**64) mean "unbounded" once they
  reach Nq + Nk; nothing overflows.
- merge_attention is exact for huge log-sum-exps.
"""

import sys

import numpy as np
import pytest

import numbattn
from numbattn import reference

from .helpers import DTYPES, RTOL, assert_close, poisoned, randn

HUGE = (sys.maxsize, 2**63, 2**64, np.uint64(2**64 - 1), np.int64(2**62))


def _unbounded(window, limit):
    return tuple(-1 if int(w) >= limit else int(w) for w in window)


# ------------------------------------------------------------------ windows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq, nk", [(12, 12), (16, 12), (9, 14)])
@pytest.mark.parametrize("causal", [False, True])
def test_huge_windows(rng, tiles, dtype, nq, nk, causal):
    """Windows with huge sides match the same window with those sides unbounded."""
    q, k, v = (randn(rng, (2, 3, n, 8), dtype) for n in (nq, nk, nk))
    windows = [(h, h) for h in HUGE] + [(0, sys.maxsize), (sys.maxsize, 0), (2**64, 1)]
    windows += [(3, 2**70), (nq + nk, nq + nk - 1), (nk, nq)]
    for window in windows:
        same = _unbounded(window, nq + nk)
        what = f"window={window}"
        ref_out, ref_lse = reference.attention(q, k, v, causal=causal, window=same)
        huge_out, huge_lse = reference.attention(q, k, v, causal=causal, window=window)
        np.testing.assert_array_equal(huge_out, ref_out, err_msg=f"reference {what}")
        np.testing.assert_array_equal(huge_lse, ref_lse, err_msg=f"reference {what}")
        out, lse = poisoned(ref_out.shape, dtype), poisoned(ref_lse.shape, dtype)
        numbattn.attention(q, k, v, causal=causal, window=window, out=out, lse=lse)
        assert_close(out, ref_out, dtype, f"{what} out")
        assert_close(lse, ref_lse, dtype, f"{what} lse")
        ref_s = reference.scores(q, k, causal=causal, window=same)
        np.testing.assert_array_equal(reference.scores(q, k, causal=causal, window=window), ref_s)
        assert_close(numbattn.scores(q, k, causal=causal, window=window), ref_s, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_windows_varlen(rng, tiles, dtype):
    cu_q, cu_k = np.array([0, 5, 5, 17, 20]), np.array([0, 3, 9, 21, 21])
    q, k, v = (randn(rng, (n, 4, 6), dtype) for n in (20, 21, 21))
    for window in [(sys.maxsize, sys.maxsize), (0, 2**64), (2**63, 0), (1, 41), (41, 1)]:
        same = _unbounded(window, 41)
        ref_out, ref_lse = reference.varlen_attention(q, k, v, cu_q, cu_k, window=same)
        huge = reference.varlen_attention(q, k, v, cu_q, cu_k, window=window)
        np.testing.assert_array_equal(huge[0], ref_out)
        lse = poisoned(ref_lse.shape, dtype)
        out = numbattn.varlen_attention(q, k, v, cu_q, cu_k, window=window, lse=lse)
        assert_close(out, ref_out, dtype, f"window={window} out")
        assert_close(lse, ref_lse, dtype, f"window={window} lse")


def test_window_validation_unchanged():
    q = np.zeros((1, 4, 2), np.float32)
    with pytest.raises(ValueError, match="window left must be >= -1"):
        numbattn.attention(q, q, q, window=(-2, sys.maxsize))
    with pytest.raises(ValueError, match="window right must be >= -1"):
        numbattn.attention(q, q, q, window=(2**64, -(2**64)))
    with pytest.raises(TypeError, match="window must be a pair of integers"):
        numbattn.attention(q, q, q, window=(1.0, 2))


def test_reference_visible_huge():
    for nq, nk in ((5, 5), (7, 3), (3, 7)):
        for window in ((sys.maxsize, sys.maxsize), (0, 2**64), (2**64, 0)):
            np.testing.assert_array_equal(
                reference.visible(nq, nk, window=window),
                reference.visible(nq, nk, window=_unbounded(window, nq + nk)),
            )


# -------------------------------------------------------------------- merge


def test_reference_merge_huge_lse():
    outs = [np.ones((1, 2)), 2 * np.ones((1, 2))]
    out, lse = reference.merge_attention(outs, [np.array([3e38]), np.array([3e38])])
    np.testing.assert_allclose(out, 1.5, rtol=1e-15)
    np.testing.assert_allclose(lse, 3e38, rtol=1e-15)
    out, lse = reference.merge_attention(outs + outs, [np.array([1e308])] * 4)
    np.testing.assert_allclose(out, 1.5, rtol=1e-15)
    out, lse = reference.merge_attention(outs, [np.array([1e308]), np.array([1e308 - 1e300])])
    np.testing.assert_allclose(out, 1.0, rtol=1e-15)  # the second weighs exp(-1e300) = 0
    out, lse = reference.merge_attention(outs, [np.array([-np.inf]), np.array([-np.inf])])
    assert (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_huge_lse_reference_agrees_with_kernel(rng, dtype):
    """Two parts whose lses are so large that lse_p - lse loses log(2)."""
    outs = [randn(rng, (2, 5, 3), dtype) for _ in range(2)]
    big = np.finfo(dtype).max / 2
    lses = [np.full((2, 5), big, dtype) for _ in range(2)]
    lses[1][0, :2] = -np.inf
    lses[0][0, 1] = -np.inf
    ref_out, ref_lse = reference.merge_attention(outs, lses)
    lse = poisoned(ref_lse.shape, dtype)
    out = numbattn.merge_attention(outs, lses, lse=lse)
    assert_close(out, ref_out, dtype, "out")
    np.testing.assert_allclose(lse, ref_lse, rtol=RTOL[np.dtype(dtype)])  # norms overflow
