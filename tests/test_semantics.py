"""Edge semantics shared by the reference and the CPU kernels (issue 8).

- Window sides of any size (sys.maxsize, 2**64) mean "unbounded" once they
  reach Nq + Nk; nothing overflows.
- Masked keys are never read: a NaN or inf in k or v at a key that a row
  cannot see (causal, window, key_lengths, mask, -inf bias) does not reach
  that row; rows that see it do get the NaN.
- merge_attention is exact for huge log-sum-exps.
- The scale multiplies the dot products: q * scale may overflow where the
  scores do not.
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


# ------------------------------------------------- masked keys are never read


def _poison_cases(rng, dtype, nq, nk):
    """(name, options, planted keys): keys chosen so that some rows see them
    and some do not."""
    mask = rng.random((2, 1, nq, nk)) < 0.5
    mask[..., 0] = True  # no empty rows needed here
    bias = randn(rng, (1, 2, nq, nk), dtype)
    bias[rng.random(bias.shape) < 0.5] = -np.inf
    bias[..., 0] = 0.0
    return [
        ("causal", dict(causal=True), [nk - 1, nk - 3]),
        ("key_lengths", dict(key_lengths=np.array([nk - 5, nk])), [nk - 4, nk - 1]),
        ("window", dict(window=(2, 1)), [5]),
        ("window+causal", dict(window=(3, -1), causal=True), [1, nk - 2]),
        ("mask", dict(mask=mask), [3, nk - 1]),
        ("-inf bias", dict(bias=bias), [3, nk - 1]),
    ]


def _plant(x, keys, values):
    x = x.copy()
    for j in keys:
        x[..., j, : len(values)] = values
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", ["v", "k+v"])
def test_masked_keys_are_never_read(rng, tiles, dtype, poison):
    """NaN/inf in v (and NaN in k) at keys a row cannot see leave the row alone."""
    nq = nk = 12
    q, k, v = (randn(rng, (2, 2, n, 6), dtype) for n in (nq, nk, nk))
    for name, opts, keys in _poison_cases(rng, dtype, nq, nk):
        vp = _plant(v, keys, [np.nan, np.inf, -np.inf])
        kp = _plant(k, keys, [np.nan]) if poison == "k+v" else k
        clean_out, clean_lse = reference.attention(q, k, v, **opts)
        ref_out, ref_lse = reference.attention(q, kp, vp, **opts)
        # The reference: rows that see a planted key are touched, the others not.
        seen = np.isfinite(reference.scores(q, k, **opts)[..., keys]).any(axis=-1)
        touched = ~np.isfinite(ref_out).all(axis=-1)
        np.testing.assert_array_equal(touched, seen, err_msg=name)
        assert seen.any() and not seen.all(), name
        assert_close(ref_out[~seen], clean_out[~seen], np.float64, f"reference {name}")
        np.testing.assert_array_equal(ref_lse[~seen], clean_lse[~seen], err_msg=name)
        out, lse = poisoned(ref_out.shape, dtype), poisoned(ref_lse.shape, dtype)
        numbattn.attention(q, kp, vp, out=out, lse=lse, **opts)
        assert_close(out, ref_out, dtype, f"{name} out")
        assert_close(lse, ref_lse, dtype, f"{name} lse")
        assert_close(numbattn.scores(q, kp, **opts), reference.scores(q, kp, **opts), dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keys_past_key_lengths_are_never_read(rng, tiles, dtype):
    q, k, v = (randn(rng, (3, 2, 10, 5), dtype) for _ in range(3))
    lengths = np.array([0, 4, 10])
    kp, vp = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        kp[b, :, n:] = np.nan
        vp[b, :, n:] = np.inf
    for causal in (False, True):
        ref_out, ref_lse = reference.attention(q, k, v, causal=causal, key_lengths=lengths)
        out, lse = poisoned(ref_out.shape, dtype), poisoned(ref_lse.shape, dtype)
        numbattn.attention(q, kp, vp, causal=causal, key_lengths=lengths, out=out, lse=lse)
        assert_close(out, ref_out, dtype, "out")
        assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_visible_nan_value_at_zero_weight_still_poisons(rng, dtype):
    """A visible key is read even when its weight underflows to 0 (0 * NaN)."""
    q, k, v = (randn(rng, (1, 1, 4, 3), dtype) for _ in range(3))
    bias = np.zeros((4, 4), dtype)
    bias[:, 2] = -1e4  # visible, weight exp(-1e4) == 0
    v[..., 2, 0] = np.nan
    ref_out, _ = reference.attention(q, k, v, bias=bias)
    assert np.isnan(ref_out[..., 0]).all() and np.isfinite(ref_out[..., 1:]).all()
    assert_close(numbattn.attention(q, k, v, bias=bias), ref_out, dtype, "out")


# ------------------------------------------------------------- merge, scale


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_multiplies_the_dot_products(tiles, dtype):
    """q * scale overflows, scale * (q . k) does not: no NaN, as the reference."""
    big = {np.float32: (1e30, 1e10), np.float64: (1e300, 1e200)}[dtype]
    scale, mag = big
    q = np.full((1, 2, 5, 4), mag, dtype)
    k = np.full((1, 2, 6, 4), 1 / mag, dtype)
    k[..., 3, :] *= -1
    v = np.arange(2 * 6 * 3, dtype=dtype).reshape(1, 2, 6, 3)
    for opts in ({}, {"causal": True}, {"bias": np.zeros((5, 6), dtype)}):
        ref_out, ref_lse = reference.attention(q, k, v, scale=scale, **opts)
        lse = poisoned(ref_lse.shape, dtype)
        out = numbattn.attention(q, k, v, scale=scale, lse=lse, **opts)
        assert np.isfinite(out).all() and np.isfinite(lse).all(), opts
        assert_close(out, ref_out, dtype, f"{opts} out")
        # Huge values: elementwise tolerances (the norms of assert_close overflow).
        rtol = RTOL[np.dtype(dtype)]
        np.testing.assert_allclose(lse, ref_lse, rtol=rtol, err_msg=f"{opts} lse")
        s = numbattn.scores(q, k, scale=scale, **opts)
        ref_s = reference.scores(q, k, scale=scale, **opts)
        np.testing.assert_allclose(s, ref_s, rtol=rtol, err_msg=f"{opts} scores")
