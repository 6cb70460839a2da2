"""Edge semantics on GPU arrays (simulator or real GPU), as on the CPU
(tests/test_semantics.py): huge windows, masked keys never read, huge
log-sum-exps in merges, and the scale multiplying the dot products.
Tiny shapes crossing the small tiles of conftest.py."""

import sys

import numpy as np
import pytest

import numbattn
from numbattn import reference
from tests.helpers import DTYPES, RTOL, assert_close, poisoned, randn
from tests.test_semantics import _plant, _poison_cases, _unbounded

cuda = pytest.importorskip("numba.cuda")


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host(x):
    return x.copy_to_host()


def _dev_opts(opts):
    return {n: (dev(x) if n in ("bias", "mask") else x) for n, x in opts.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq, nk", [(12, 12), (16, 11)])
def test_huge_windows(dtype, nq, nk):
    rng = np.random.default_rng(nq + nk)
    q, k, v = (randn(rng, (1, 2, n, 5), dtype) for n in (nq, nk, nk))
    for window in [(sys.maxsize, sys.maxsize), (0, sys.maxsize), (2**64, 0), (nk, nq)]:
        for causal in (False, True):
            same = _unbounded(window, nq + nk)
            what = f"window={window} causal={causal}"
            ref_out, ref_lse = reference.attention(q, k, v, causal=causal, window=same)
            out, lse = dev(poisoned(ref_out.shape, dtype)), dev(poisoned(ref_lse.shape, dtype))
            numbattn.attention(
                dev(q), dev(k), dev(v), causal=causal, window=window, out=out, lse=lse
            )
            assert_close(host(out), ref_out, dtype, f"{what} out")
            assert_close(host(lse), ref_lse, dtype, f"{what} lse")
            s = numbattn.scores(dev(q), dev(k), causal=causal, window=window)
            assert_close(host(s), reference.scores(q, k, causal=causal, window=same), dtype, what)


def test_huge_windows_varlen():
    dtype = np.float32
    rng = np.random.default_rng(3)
    cu_q, cu_k = np.array([0, 5, 14]), np.array([0, 9, 12])
    q, k, v = (randn(rng, (n, 2, 4), dtype) for n in (14, 12, 12))
    for window in [(sys.maxsize, 0), (0, 2**63)]:
        ref_out, _ = reference.varlen_attention(q, k, v, cu_q, cu_k, window=_unbounded(window, 26))
        out = numbattn.varlen_attention(dev(q), dev(k), dev(v), cu_q, cu_k, window=window)
        assert_close(host(out), ref_out, dtype, f"window={window}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", ["v", "k+v"])
def test_masked_keys_are_never_read(dtype, poison):
    """NaN/inf in v (and NaN in k) at keys a row cannot see leave the row alone;
    rows that see them get NaN/inf, as the reference."""
    rng = np.random.default_rng(7 + (poison == "v"))
    nq = nk = 12
    q, k, v = (randn(rng, (2, 2, n, 6), dtype) for n in (nq, nk, nk))
    for name, opts, keys in _poison_cases(rng, dtype, nq, nk):
        vp = _plant(v, keys, [np.nan, np.inf, -np.inf])
        kp = _plant(k, keys, [np.nan]) if poison == "k+v" else k
        ref_out, ref_lse = reference.attention(q, kp, vp, **opts)
        out, lse = dev(poisoned(ref_out.shape, dtype)), dev(poisoned(ref_lse.shape, dtype))
        numbattn.attention(dev(q), dev(kp), dev(vp), out=out, lse=lse, **_dev_opts(opts))
        assert_close(host(out), ref_out, dtype, f"{name} out")
        assert_close(host(lse), ref_lse, dtype, f"{name} lse")
        s = numbattn.scores(dev(q), dev(kp), **_dev_opts(opts))
        assert_close(host(s), reference.scores(q, kp, **opts), dtype, f"{name} scores")


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_huge_lse(dtype):
    rng = np.random.default_rng(5)
    outs = [randn(rng, (2, 5, 3), dtype) for _ in range(2)]
    big = np.finfo(dtype).max / 2
    lses = [np.full((2, 5), big, dtype) for _ in range(2)]
    lses[1][0, :2] = -np.inf
    lses[0][0, 1] = -np.inf
    ref_out, ref_lse = reference.merge_attention(outs, lses)
    lse = dev(poisoned(ref_lse.shape, dtype))
    out = numbattn.merge_attention([dev(o) for o in outs], [dev(x) for x in lses], lse=lse)
    assert_close(host(out), ref_out, dtype, "out")
    np.testing.assert_allclose(host(lse), ref_lse, rtol=RTOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_multiplies_the_dot_products(dtype):
    scale, mag = {np.float32: (1e30, 1e10), np.float64: (1e300, 1e200)}[dtype]
    q = np.full((1, 2, 5, 4), mag, dtype)
    k = np.full((1, 2, 6, 4), 1 / mag, dtype)
    k[..., 3, :] *= -1
    v = np.arange(2 * 6 * 3, dtype=dtype).reshape(1, 2, 6, 3)
    ref_out, ref_lse = reference.attention(q, k, v, scale=scale, causal=True)
    lse = dev(poisoned(ref_lse.shape, dtype))
    out = numbattn.attention(dev(q), dev(k), dev(v), scale=scale, causal=True, lse=lse)
    assert_close(host(out), ref_out, dtype, "out")
    np.testing.assert_allclose(host(lse), ref_lse, rtol=RTOL[np.dtype(dtype)])
