"""numbattn.attention on the CPU against numbattn.reference."""

import threading

import numpy as np
import pytest

import numbattn
from numbattn import reference

from .helpers import DTYPES, assert_close, poisoned, randn

# (leading, Nq, Nk, d, dv): sizes off every tile multiple, Nq != Nk both ways.
SHAPES = [
    ((2, 3), 37, 29, 16, 16),
    ((2, 3), 29, 37, 16, 8),
    ((1,), 1, 1, 1, 1),
    ((), 70, 130, 64, 64),
    ((3,), 65, 65, 80, 24),
    ((1, 2), 20, 45, 128, 128),
    ((1, 1), 9, 11, 256, 33),
]


def run(q, k, v, dtype, **kw):
    out = poisoned(q.shape[:-1] + (v.shape[-1],), dtype)
    lse = poisoned(q.shape[:-1], dtype)
    got = numbattn.attention(q, k, v, out=out, lse=lse, **kw)
    assert got is out
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(rng, tiles, dtype, causal, shape):
    leading, nq, nk, d, dv = shape
    q = randn(rng, leading + (nq, d), dtype)
    k = randn(rng, leading + (nk, d), dtype)
    v = randn(rng, leading + (nk, dv), dtype)
    out, lse = run(q, k, v, dtype, causal=causal)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_allocation_and_scale(rng, dtype):
    q, k, v = (randn(rng, (2, 17, 8), dtype) for _ in range(3))
    got = numbattn.attention(q, k, v, scale=0.3)
    assert got.dtype == dtype and got.shape == (2, 17, 8) and got.flags.c_contiguous
    assert_close(got, reference.attention(q, k, v, scale=0.3)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_views(rng, tiles, dtype, causal):
    """(B, N, H, d) storage viewed as (B, H, N, d), for inputs and outputs."""
    b, n, h, d = 2, 23, 3, 16
    q = randn(rng, (b, n, h, d), dtype).swapaxes(1, 2)
    k = randn(rng, (b, n + 4, h, d), dtype).swapaxes(1, 2)
    v = randn(rng, (b, n + 4, h, 2 * d), dtype)[..., ::2].swapaxes(1, 2)
    out_storage = poisoned((b, n, h, d), dtype)
    out = out_storage.swapaxes(1, 2)
    lse_storage = poisoned((b, n, h), dtype)
    lse = lse_storage.swapaxes(1, 2)
    numbattn.attention(q, k, v, causal=causal, out=out, lse=lse)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_leading_dims_not_mergeable(rng, dtype):
    """Three leading dims that no view can merge: looped outside the kernel."""
    q = randn(rng, (2, 3, 5, 7, 4, 8), dtype).transpose(0, 2, 4, 3, 1, 5)[:, :, :, :, 0]
    k = randn(rng, (2, 5, 4, 9, 8), dtype)[:, :, :, 1:]
    v = randn(rng, (2, 5, 4, 8, 6), dtype)
    assert q.shape[:-2] == k.shape[:-2] == (2, 5, 4)
    out, lse = run(q, k, v, dtype, causal=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_score_magnitudes(rng, tiles, dtype):
    """|q.k| * scale around 1e4: a naive exp overflows."""
    q = randn(rng, (2, 19, 32), dtype, scale=25.0)
    k = randn(rng, (2, 31, 32), dtype, scale=25.0)
    v = randn(rng, (2, 31, 8), dtype)
    out, lse = run(q, k, v, dtype, scale=1.0)
    ref_out, ref_lse = reference.attention(q, k, v, scale=1.0)
    assert np.abs(ref_lse).max() > 5e3
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows(rng, tiles, dtype):
    """Causal with Nq > Nk: the first Nq - Nk rows see no key."""
    q = randn(rng, (2, 12, 8), dtype)
    k = randn(rng, (2, 5, 8), dtype)
    v = randn(rng, (2, 5, 3), dtype)
    out, lse = run(q, k, v, dtype, causal=True)
    assert np.all(out[:, :7] == 0) and np.all(lse[:, :7] == -np.inf)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_keys(rng, dtype):
    q = randn(rng, (2, 4, 8), dtype)
    k = randn(rng, (2, 0, 8), dtype)
    v = randn(rng, (2, 0, 5), dtype)
    out, lse = run(q, k, v, dtype)
    assert np.all(out == 0) and np.all(lse == -np.inf)


@pytest.mark.parametrize(
    "qs,ks,vs",
    [
        ((0, 4, 8), (0, 3, 8), (0, 3, 2)),
        ((2, 0, 8), (2, 3, 8), (2, 3, 2)),
        ((2, 4, 8), (2, 3, 8), (2, 3, 0)),
    ],
)
def test_empty_dimensions(rng, qs, ks, vs):
    q, k, v = randn(rng, qs, np.float32), randn(rng, ks, np.float32), randn(rng, vs, np.float32)
    out, lse = run(q, k, v, np.float32)
    assert out.shape == qs[:-1] + (vs[-1],)
    ref_out, ref_lse = reference.attention(q, k, v)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_poisons_only_its_row(rng, dtype):
    q = randn(rng, (2, 6, 8), dtype)
    k = randn(rng, (2, 9, 8), dtype)
    v = randn(rng, (2, 9, 4), dtype)
    q[1, 2, 3] = np.nan
    out, _ = run(q, k, v, dtype)
    assert np.all(np.isnan(out[1, 2]))
    mask = np.ones(out.shape[:-1], bool)
    mask[1, 2] = False
    assert np.all(np.isfinite(out[mask]))
    assert_close(out[mask], reference.attention(q, k, v)[0][mask], dtype)


def test_batch_elements_are_independent(rng, tiles):
    """Changing sequence b never changes the output of another sequence."""
    dtype = np.float64
    q, k, v = (randn(rng, (4, 2, 13, 8), dtype) for _ in range(3))
    base = numbattn.attention(q, k, v, causal=True)
    for b in range(4):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        q2[b] += 1.0
        k2[b] *= -3.0
        v2[b] = 7.0
        changed = numbattn.attention(q2, k2, v2, causal=True)
        others = [i for i in range(4) if i != b]
        np.testing.assert_array_equal(changed[others], base[others])
        assert not np.array_equal(changed[b], base[b])


def test_threads_release_the_gil(rng):
    """Several Python threads call the kernel at once; every result is right."""
    dtype = np.float32
    problems = [tuple(randn(rng, (2, 2, 40, 16), dtype) for _ in range(3)) for _ in range(6)]
    results = [None] * len(problems)
    errors = []

    def work(i):
        try:
            results[i] = numbattn.attention(*problems[i], causal=bool(i % 2))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (q, k, v) in enumerate(problems):
        assert_close(results[i], reference.attention(q, k, v, causal=bool(i % 2))[0], dtype)
