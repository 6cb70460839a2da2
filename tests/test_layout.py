"""Leading batch axes of size 1 between others (issue 8), CPU backend.

numbattn._layout merges adjacent leading axes into (G1, G2) views. These are
the issue's reproductions: a unit axis must not let the axes on either side
of it merge unless their strides allow it, in every array of the call.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn._layout import BatchPlan

from .helpers import DTYPES, assert_close, poisoned, randn


def run_attention(q, k, v, dtype, **kw):
    out = poisoned(q.shape[:-1] + (v.shape[-1],), dtype)
    lse = poisoned(q.shape[:-1], dtype)
    assert numbattn.attention(q, k, v, out=out, lse=lse, **kw) is out
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_batch_mask_with_unit_kv_heads(rng, tiles, dtype):
    b, g, n, d = 2, 4, 6, 8
    q, k, v = (randn(rng, (b, 1, g, n, d), dtype) for _ in range(3))
    mask = np.ones((b, 1, 1, 1, n), bool)
    mask[1, ..., 3:] = False
    run_attention(q, k, v, dtype, mask=mask)
    s = poisoned((b, 1, g, n, n), dtype)
    numbattn.scores(q, k, mask=mask, out=s)
    assert_close(s, reference.scores(q, k, mask=mask), dtype, "scores")


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_batch_bias_with_unit_axis(rng, tiles, dtype):
    b, g, n, d = 2, 4, 6, 8
    q, k, v = (randn(rng, (b, 1, g, n, d), dtype) for _ in range(3))
    bias = randn(rng, (b, 1, 1, n, n), dtype)
    run_attention(q, k, v, dtype, bias=bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_key_lengths_with_unit_axis(rng, tiles, dtype):
    q, k, v = (randn(rng, (3, 1, 2, 8, 4), dtype) for _ in range(3))
    run_attention(q, k, v, dtype, key_lengths=[8, 2, 5])
    run_attention(q, k, v, dtype, key_lengths=[8, 2, 5], query_lengths=[3, 8, 0], causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_transposed_view_with_unit_axis(rng, dtype):
    x = randn(rng, (3, 2, 6), dtype).transpose(1, 0, 2)[:, None]  # (2, 1, 3, 6)
    out = poisoned(x.shape, dtype)
    numbattn.softmax(x, out=out)
    assert_close(out, reference.softmax(x), dtype, "softmax")


def _carved(rng, dtype, fill):
    """A (2, 1, 3, 8, 4) view of the first 96 * 2 elements of a bigger buffer;
    ``fill`` everywhere else. Returns (buffer, view)."""
    buf = np.full(20 * 8 * 4, fill, dtype)
    buf[: 6 * 8 * 4] = randn(rng, 6 * 8 * 4, dtype)
    view = buf[: 6 * 8 * 4].reshape(3, 2, 8, 4).transpose(1, 0, 2, 3)[:, None]
    return buf, view


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_write_past_out(rng, tiles, dtype):
    x, v = randn(rng, (2, 1, 3, 8, 4), dtype), randn(rng, (2, 1, 3, 8, 4), dtype)
    buf, out = _carved(rng, dtype, 0)
    guard = buf[6 * 8 * 4 :].copy()
    numbattn.attention(x, x, v, out=out)
    np.testing.assert_array_equal(buf[6 * 8 * 4 :], guard)
    assert_close(out, reference.attention(x, x, v)[0], dtype, "out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_read_past_q(rng, tiles, dtype):
    x, v = randn(rng, (2, 1, 3, 8, 4), dtype), randn(rng, (2, 1, 3, 8, 4), dtype)
    _, q = _carved(rng, dtype, np.nan)
    run_attention(q, x, v, dtype)


def _plan(leading, *arrays, keep_last=False):
    plan = BatchPlan(leading, arrays, keep_last=keep_last)
    return plan.outer_axes, plan.inner_groups


def _as_strided(shape, strides):
    """A float32 array view with the given element strides (values unused)."""
    return np.lib.stride_tricks.as_strided(
        np.zeros(1, np.float32), shape, tuple(4 * s for s in strides)
    )


def test_plan_unit_axes_never_bridge_unmergeable_axes():
    contiguous = _as_strided((2, 1, 3, 5), (15, 15, 5, 1))
    swapped = _as_strided((2, 1, 3, 5), (5, 7, 10, 1))
    assert _plan((2, 1, 3), contiguous) == ([], [[], [0, 1, 2]])
    assert _plan((2, 1, 3), contiguous, swapped) == ([], [[0, 1], [2]])
    # A broadcast (stride 0) axis merges only with another broadcast axis.
    broadcast = _as_strided((2, 1, 3, 5), (5, 99, 0, 1))
    assert _plan((2, 1, 3), contiguous, broadcast) == ([], [[0, 1], [2]])
    both = _as_strided((2, 1, 3, 5), (0, 99, 0, 1))
    assert _plan((2, 1, 3), contiguous, both) == ([], [[], [0, 1, 2]])
    # Unit axes anywhere, three non-unit axes, none mergeable: one outer axis.
    odd = _as_strided((1, 2, 1, 3, 1, 4, 1, 5), (0, 1, 5, 2, 7, 6, 3, 1))
    assert _plan((1, 2, 1, 3, 1, 4, 1), odd) == ([0, 1, 2], [[3, 4], [5, 6]])
    # Negative strides merge when they step consistently.
    neg = _as_strided((2, 1, 3, 5), (-15, 4, -5, 1))
    assert _plan((2, 1, 3), neg) == ([], [[], [0, 1, 2]])
    flipped = _as_strided((2, 1, 3, 5), (15, 4, -5, 1))
    assert _plan((2, 1, 3), flipped) == ([], [[0, 1], [2]])


def test_plan_keep_last():
    q = _as_strided((2, 1, 4, 5), (20, 20, 5, 1))
    k = _as_strided((2, 1, 1, 5), (5, 5, 5, 1))
    assert _plan((2, 1, 4), q, k, keep_last=True) == ([], [[0, 1], [2]])
    assert _plan((1, 4), q[0], k[0], keep_last=True) == ([], [[0], [1]])
    assert _plan((4,), q[0, 0], k[0, 0], keep_last=True) == ([], [[], [0]])
