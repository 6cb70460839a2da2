"""numbattn.softmax on the CPU: every row path of the kernel against
numbattn.reference, with outputs poisoned.

The kernel writes exp straight into a unit-stride output row and scales it
there, taking the row from x (unit stride), from the output itself (in
place) or gathering a strided x into the output row; strided outputs go
through a scratch row. Each of these paths is run here,
for both dtypes, on rows with special values and on rows of length 1.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference

from .helpers import DTYPES, assert_close, poisoned, randn

LAYOUTS = ("contiguous", "in_place", "x_strided", "out_strided", "both_strided", "in_place_strided")


def _special_rows(rng, rows, n, dtype):
    """rows x n inputs: ordinary rows, then (where there are enough rows) one
    all -inf, one with a NaN, one with +inf, one partly -inf, one with a
    single finite entry among -inf, one of huge magnitude (a naive exp
    overflows), one with -inf and a NaN."""
    x = randn(rng, (rows, n), np.float64, scale=3.0)
    specials = [
        lambda r: r.fill(-np.inf),
        lambda r: r.__setitem__(n // 2, np.nan),
        lambda r: r.__setitem__(n - 1, np.inf),
        lambda r: r.__setitem__(slice(None, None, 2), -np.inf),
        lambda r: (r.fill(-np.inf), r.__setitem__(n // 3, 1.5)),
        lambda r: r.__imul__(1e4),
        lambda r: (r.__setitem__(0, -np.inf), r.__setitem__(n - 1, np.nan)),
    ]
    for i, f in enumerate(specials[: rows - 2]):
        f(x[i + 1])
    return x.astype(dtype)


def _arrays(layout, x, dtype):
    """(x argument, out argument) for ``layout``; both (rows, n) views."""
    rows, n = x.shape
    if layout in ("x_strided", "both_strided", "in_place_strided"):
        store = poisoned((rows, 2 * n), dtype)
        store[:, ::2] = x
        xa = store[:, ::2]
    else:
        xa = x.copy()
    if layout.startswith("in_place"):
        return xa, xa
    if layout in ("out_strided", "both_strided"):
        return xa, poisoned((rows, 3 * n), dtype)[:, 1::3]
    return xa, poisoned((rows, n), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows,n", [(9, 1500), (11, 300), (9, 7), (5, 1)], ids=str)
def test_softmax_row_paths(rng, dtype, layout, rows, n):
    x = _special_rows(rng, rows, n, dtype)
    ref = reference.softmax(x)
    xa, out = _arrays(layout, x, dtype)
    assert (xa is out) == layout.startswith("in_place")
    unit = ("contiguous", "in_place")
    assert (xa.strides[-1] == xa.itemsize) == (layout in unit + ("out_strided",))
    assert (out.strides[-1] == out.itemsize) == (layout in unit + ("x_strided",))
    got = numbattn.softmax(xa, out=out)
    assert got is out
    assert_close(out, ref, dtype, layout)
    # exact special rows: all -inf -> zeros; a NaN -> a NaN row; rows of one
    # finite element -> 1
    if n == 1:
        finite = np.isfinite(x[:, 0])
        assert np.all(out[finite, 0] == 1)
        assert np.all(np.isnan(out[np.isnan(x[:, 0]), 0]))
    else:
        assert np.all(out[1] == 0)
        assert np.all(np.isnan(out[2]))
        assert np.all(np.isnan(out[3]))  # +inf: inf - inf, as the reference
        assert np.all(out[4, ::2] == 0) and np.all(out[4, 1::2] > 0)
        if rows > 5:
            assert out[5, n // 3] == 1 and np.count_nonzero(out[5]) == 1
            assert np.all(np.isfinite(out[6])) and np.all(np.isnan(out[7]))
    ok = ~np.isnan(ref).any(axis=-1) & (x > -np.inf).any(axis=-1)  # not NaN, not all -inf
    np.testing.assert_allclose(out[ok].sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out[np.isnan(ref).any(axis=-1)], np.nan)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_softmax_float64_elementwise(rng, layout):
    """Each probability, not only the norm: float64 within a few ulp of the
    reference for exponents down to -60 (the polynomial of softmax's exp)."""
    x = rng.uniform(-60.0, 0.0, (6, 513))
    x[:, 0] = 0.0
    ref = reference.softmax(x)
    xa, out = _arrays(layout, x, np.float64)
    numbattn.softmax(xa, out=out)
    rel = np.abs(out / ref - 1)
    assert rel.max() <= 4e-15, rel.max()


def test_softmax_exp_range():
    """exp over the whole float64 range of x - max: underflow to exactly 0,
    no NaN or inf, and agreement with np.exp where the result is normal."""
    d = -np.concatenate([np.linspace(0.0, 750.0, 30001), [1e300, np.inf]])
    x = np.stack([d, d[::-1].copy()])
    out = numbattn.softmax(x)
    for row, src in zip(out, x):
        m = src.max()
        e = np.exp(src - m)
        want = e / e.sum()
        assert np.all(np.isfinite(row)) and np.all(row >= 0)
        big = want > 1e-290
        rel = np.abs(row[big] / want[big] - 1)
        # |x - max| up to ~668 here: the range reduction's error grows with it
        assert rel.max() <= 1e-13, rel.max()
        assert np.all(row[src - m < -746] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_batched_views(rng, dtype):
    """Leading axes of any strides (transposed heads, broadcast rows), each
    row path above through the (G1, G2, n) kernel view."""
    x = randn(rng, (3, 40, 5), dtype, scale=4.0).transpose(2, 0, 1)  # (5, 3, 40)
    out = poisoned((3, 5, 40), dtype).transpose(1, 0, 2)
    numbattn.softmax(x, out=out)
    assert_close(out, reference.softmax(x), dtype)
    row = randn(rng, (1, 1, 33), dtype)
    b = np.broadcast_to(row, (4, 3, 33))
    out2 = poisoned((4, 3, 33), dtype)
    numbattn.softmax(b, out=out2)
    assert_close(out2, reference.softmax(b), dtype)


@pytest.mark.parametrize(
    "dtype,bound", [(np.float32, 5e-7), (np.float64, 1e-14)], ids=["f32", "f64"]
)
def test_softmax_exp_accuracy(dtype, bound):
    """softmax's own exp (kernels._vexp_sm: degree-5 / degree-10 polynomials):
    exp(0) is exactly 1 (the row maximum's term), relative error within
    ``bound`` over [-80, 0] against np.exp in float64, exactly 0 for -inf
    and far below, NaN for NaN."""
    from numba import njit

    from numbattn.cpu import kernels

    @njit
    def exps(x, out):
        for i in range(x.size):
            out[i] = kernels._vexp_sm(x[i])

    x = np.concatenate([np.linspace(-80.0, 0.0, 100_001), [-np.inf, -1e4, np.nan]]).astype(dtype)
    got = np.empty_like(x)
    exps(x, got)
    ref = np.exp(x[:-3].astype(np.float64))
    assert got[100_000] == 1.0
    assert np.max(np.abs(got[:-3] - ref) / ref) <= bound
    assert got[-3] == 0.0 and got[-2] == 0.0 and np.isnan(got[-1])
