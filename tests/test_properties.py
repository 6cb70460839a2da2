"""Randomised shapes and tile sizes (Hypothesis) against numbattn.reference."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbattn
from numbattn import reference

from .helpers import assert_close, poisoned

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

sizes = st.integers(0, 40)
heads = st.sampled_from([1, 3, 8, 16, 33, 64])


@st.composite
def problems(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    nq, nk = draw(sizes), draw(sizes)
    d, dv = draw(heads), draw(heads)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    causal = draw(st.booleans())
    q_tile, k_tile = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**32 - 1))
    return lead, nq, nk, d, dv, dtype, causal, q_tile, k_tile, seed


@SETTINGS
@given(problems())
def test_attention_random_shapes(monkeypatch, problem):
    lead, nq, nk, d, dv, dtype, causal, q_tile, k_tile, seed = problem
    monkeypatch.setattr(numbattn.config, "CPU_QUERY_TILE", q_tile)
    monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", k_tile)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead + (nq, d)).astype(dtype)
    k = rng.standard_normal(lead + (nk, d)).astype(dtype)
    v = rng.standard_normal(lead + (nk, dv)).astype(dtype)
    out, lse = poisoned(lead + (nq, dv), dtype), poisoned(lead + (nq,), dtype)
    numbattn.attention(q, k, v, causal=causal, out=out, lse=lse)
    ref_out, ref_lse = reference.attention(q, k, v, causal=causal)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")


@SETTINGS
@given(problems())
def test_scores_then_softmax_random_shapes(monkeypatch, problem):
    lead, nq, nk, d, _, dtype, causal, q_tile, k_tile, seed = problem
    monkeypatch.setattr(numbattn.config, "CPU_QUERY_TILE", q_tile)
    monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", k_tile)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(lead + (nq, d)).astype(dtype)
    k = rng.standard_normal(lead + (nk, d)).astype(dtype)
    s = poisoned(lead + (nq, nk), dtype)
    numbattn.scores(q, k, causal=causal, out=s)
    assert_close(s, reference.scores(q, k, causal=causal), dtype, "scores")
    p = poisoned(s.shape, dtype)
    numbattn.softmax(s, out=p)
    assert_close(p, reference.softmax(s), dtype, "softmax")


@SETTINGS
@given(st.integers(2, 4), st.integers(1, 20), st.integers(1, 20), st.data())
def test_changing_one_sequence_changes_no_other(b, nq, nk, data):
    """Batch elements are independent: perturb sequence ``which`` only."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    causal = data.draw(st.booleans())
    q = rng.standard_normal((b, 2, nq, 8))
    k = rng.standard_normal((b, 2, nk, 8))
    v = rng.standard_normal((b, 2, nk, 5))
    base = numbattn.attention(q, k, v, causal=causal)
    which = data.draw(st.integers(0, b - 1))
    k[which] = rng.standard_normal(k[which].shape) * 10
    v[which] = rng.standard_normal(v[which].shape)
    changed = numbattn.attention(q, k, v, causal=causal)
    others = [i for i in range(b) if i != which]
    np.testing.assert_array_equal(changed[others], base[others])
