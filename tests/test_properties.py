"""Randomised shapes and tile sizes (Hypothesis) against numbattn.reference."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbattn
from numbattn import reference

from .helpers import assert_close
from .layouts import Carved, layouts, leading_shapes

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

sizes = st.integers(0, 40)
heads = st.sampled_from([1, 3, 8, 16, 33, 64])


@st.composite
def problems(draw):
    """Shapes, options, tile sizes, and a memory layout for every array
    (tests/layouts.py: size-1 leading axes anywhere, transposes, steps,
    broadcast inputs; outputs inside guarded buffers)."""
    lead = draw(leading_shapes(max_size=12))
    nq, nk = draw(sizes), draw(sizes)
    d, dv = draw(heads), draw(heads)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    causal = draw(st.booleans())
    q_tile, k_tile = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**32 - 1))
    views = {n: draw(layouts(len(lead) + 2)) for n in ("q", "k", "v")}
    views.update({n: draw(layouts(len(lead) + 2, broadcast=False)) for n in ("out", "p")})
    views["lse"] = draw(layouts(len(lead) + 1, broadcast=False))
    return lead, nq, nk, d, dv, dtype, causal, q_tile, k_tile, seed, views


def carve_input(rng, shape, dtype, layout):
    return Carved(shape, dtype, layout, np.nan, lambda s: rng.standard_normal(s).astype(dtype))


def carve_output(shape, dtype, layout):
    return Carved(shape, dtype, layout, np.nan, writeable=True)


@SETTINGS
@given(problems())
def test_attention_random_shapes(monkeypatch, problem):
    lead, nq, nk, d, dv, dtype, causal, q_tile, k_tile, seed, views = problem
    monkeypatch.setattr(numbattn.config, "CPU_QUERY_TILE", q_tile)
    monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", k_tile)
    rng = np.random.default_rng(seed)
    q = carve_input(rng, lead + (nq, d), dtype, views["q"])
    k = carve_input(rng, lead + (nk, d), dtype, views["k"])
    v = carve_input(rng, lead + (nk, dv), dtype, views["v"])
    out = carve_output(lead + (nq, dv), dtype, views["out"])
    lse = carve_output(lead + (nq,), dtype, views["lse"])
    numbattn.attention(q.view, k.view, v.view, causal=causal, out=out.view, lse=lse.view)
    assert out.untouched() and lse.untouched(), "written outside out or lse"
    ref_out, ref_lse = reference.attention(q.view, k.view, v.view, causal=causal)
    assert_close(out.view, ref_out, dtype, "out")
    assert_close(lse.view, ref_lse, dtype, "lse")


@SETTINGS
@given(problems())
def test_scores_then_softmax_random_shapes(monkeypatch, problem):
    lead, nq, nk, d, _, dtype, causal, q_tile, k_tile, seed, views = problem
    monkeypatch.setattr(numbattn.config, "CPU_SCORES_QUERY_TILE", q_tile)
    monkeypatch.setattr(numbattn.config, "CPU_SCORES_KEY_TILE", k_tile)
    rng = np.random.default_rng(seed)
    q = carve_input(rng, lead + (nq, d), dtype, views["q"])
    k = carve_input(rng, lead + (nk, d), dtype, views["k"])
    s = carve_output(lead + (nq, nk), dtype, views["out"])
    numbattn.scores(q.view, k.view, causal=causal, out=s.view)
    assert s.untouched(), "written outside the scores"
    assert_close(s.view, reference.scores(q.view, k.view, causal=causal), dtype, "scores")
    p = carve_output(s.view.shape, dtype, views["p"])
    numbattn.softmax(s.view, out=p.view)
    assert p.untouched(), "written outside the softmax"
    assert_close(p.view, reference.softmax(s.view), dtype, "softmax")


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
