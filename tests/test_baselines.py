"""The asv suites' copy of the NumPy baselines (benchmarks/common.py, kept
because asv runs today's suites against old commits) agrees with the
package's (numbattn.baselines), and both with the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import common
from numbattn import baselines, reference
from tests.helpers import assert_close


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_asv_baselines_agree(dtype, causal):
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 3, 6, 4)).astype(dtype) for _ in range(3))
    q = q[:, :, :5]  # Nq < Nk: the causal diagonal is offset, every row sees a key
    np.testing.assert_array_equal(common.causal_mask(5, 6), baselines.causal_mask(5, 6))
    s = baselines.numpy_scores(q, k, 0.3, causal)
    np.testing.assert_array_equal(common.numpy_scores(q, k, 0.3, causal), s)
    np.testing.assert_array_equal(common.numpy_softmax(s), baselines.numpy_softmax(s))
    a = baselines.numpy_attention(q, k, v, 0.3, causal)
    np.testing.assert_array_equal(common.numpy_attention(q, k, v, 0.3, causal), a)
    ref_out = reference.attention(q, k, v, scale=0.3, causal=causal)[0]
    assert_close(a, ref_out, np.float32)  # NumPy in dtype: float32-level agreement
    assert_close(s, reference.scores(q, k, scale=0.3, causal=causal), dtype)


def test_one_relative_error():
    from numbattn import _bench
    from tests import helpers

    assert helpers.rel_err is reference.relative_error
    assert _bench.rel_err is reference.relative_error
    ref = np.array([1.0, -np.inf, np.nan, 0.0])
    assert reference.relative_error(ref, ref) == 0.0
    assert reference.relative_error(ref[:3], ref) == np.inf  # shapes differ
    assert reference.relative_error([1.0, np.inf, np.nan, 0.0], ref) == np.inf
    assert reference.relative_error([1.0, -np.inf, 0.0, 0.0], ref) == np.inf
    assert reference.relative_error([np.nan, -np.inf, np.nan, 0.0], ref) == np.inf
    assert reference.relative_error([2.0, -np.inf, np.nan, 0.0], ref) == 1.0
