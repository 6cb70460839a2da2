"""Leading batch axes of size 1 between others (issue 8), CPU backend.

numbattn._layout merges adjacent leading axes into (G1, G2) views. First the
issue's reproductions: a unit axis must not let the axes on either side of
it merge unless their strides allow it, in every array of the call. Then
property tests: every array argument of attention, scores, softmax and
merge_attention in a random layout (tests/layouts.py), outputs in guarded
buffers.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbattn
from numbattn import reference
from numbattn._layout import BatchPlan

from .helpers import DTYPES, assert_close, poisoned, randn
from .layouts import Carved, attention_problems, layouts, leading_shapes


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


# ---------------------------------------------------------------- properties
#
# Every array argument in a random layout (tests/layouts.py): size-1 leading
# axes anywhere, transposes, steps, negative steps, broadcast inputs. Output
# buffers are NaN-filled with guard regions: nothing outside out/lse may be
# written, and no input buffer may change.

SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _tiles(monkeypatch, data):
    monkeypatch.setattr(numbattn.config, "CPU_QUERY_TILE", data.draw(st.integers(1, 5)))
    monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", data.draw(st.integers(1, 6)))
    monkeypatch.setattr(numbattn.config, "CPU_SCORES_QUERY_TILE", data.draw(st.integers(1, 9)))
    monkeypatch.setattr(numbattn.config, "CPU_SCORES_KEY_TILE", data.draw(st.integers(1, 40)))


def _input(data, rng, shape, dtype, broadcast=True):
    layout = data.draw(layouts(len(shape), broadcast), label=f"layout of input {shape}")
    if np.dtype(dtype) == np.bool_:
        return Carved(shape, dtype, layout, True, lambda s: rng.random(s) < 0.7)
    return Carved(shape, dtype, layout, np.nan, lambda s: randn(rng, s, dtype))


def _output(data, shape, dtype):
    layout = data.draw(layouts(len(shape), broadcast=False), label=f"layout of output {shape}")
    return Carved(shape, dtype, layout, np.nan, writeable=True)


def _carve_inputs(data, rng, shapes, opts, dtype):
    arrays = {n: _input(data, rng, s, dtype) for n, s in shapes.items()}
    if "bias" in opts:
        arrays["bias"] = _input(data, rng, opts.pop("bias"), dtype)
    if "mask" in opts:
        arrays["mask"] = _input(data, rng, opts.pop("mask"), np.bool_)
    return arrays


def _check_guards(inputs, outputs):
    for name, c in inputs.items():
        assert c.unchanged(), f"input {name} was written"
    for name, c in outputs.items():
        assert c.untouched(), f"written outside {name}"


@SETTINGS
@given(attention_problems(), st.booleans(), st.data())
def test_attention_any_layout(monkeypatch, problem, with_lse, data):
    shapes, opts, dtype = problem
    _tiles(monkeypatch, data)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    inputs = _carve_inputs(data, rng, shapes, opts, dtype)
    lead, nq = shapes["q"][:-2], shapes["q"][-2]
    outputs = {"out": _output(data, lead + (nq, shapes["v"][-1]), dtype)}
    if with_lse:
        outputs["lse"] = _output(data, lead + (nq,), dtype)
    args = {n: c.view for n, c in inputs.items()}
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    outs = {n: c.view for n, c in outputs.items()}
    assert numbattn.attention(q, k, v, **args, **opts, **outs) is outs["out"]
    ref_out, ref_lse = reference.attention(q, k, v, **args, **opts)
    _check_guards(inputs, outputs)
    assert_close(outs["out"], ref_out, dtype, "out")
    if with_lse:
        assert_close(outs["lse"], ref_lse, dtype, "lse")


@SETTINGS
@given(attention_problems(with_v=False), st.data())
def test_scores_any_layout(monkeypatch, problem, data):
    shapes, opts, dtype = problem
    _tiles(monkeypatch, data)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    inputs = _carve_inputs(data, rng, shapes, opts, dtype)
    outputs = {"out": _output(data, shapes["q"][:-1] + (shapes["k"][-2],), dtype)}
    args = {n: c.view for n, c in inputs.items()}
    q, k = args.pop("q"), args.pop("k")
    out = outputs["out"].view
    assert numbattn.scores(q, k, **args, **opts, out=out) is out
    _check_guards(inputs, outputs)
    assert_close(out, reference.scores(q, k, **args, **opts), dtype, "scores")


@SETTINGS
@given(leading_shapes(), st.integers(0, 9), st.sampled_from(DTYPES), st.booleans(), st.data())
def test_softmax_any_layout(lead, n, dtype, in_place, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))

    def values(shape):
        x = randn(rng, shape, dtype, scale=3)
        x[rng.random(shape) < 0.2] = -np.inf
        return x

    shape = lead + (n,)
    if in_place:
        x = Carved(shape, dtype, data.draw(layouts(len(shape), False)), np.nan, values, True)
        ref = reference.softmax(x.view)
        assert numbattn.softmax(x.view, out=x.view) is x.view
        _check_guards({}, {"x": x})
        assert_close(x.view, ref, dtype, "softmax in place")
        return
    x = Carved(shape, dtype, data.draw(layouts(len(shape))), np.nan, values)
    out = _output(data, shape, dtype)
    assert numbattn.softmax(x.view, out=out.view) is out.view
    _check_guards({"x": x}, {"out": out})
    assert_close(out.view, reference.softmax(x.view), dtype, "softmax")


@SETTINGS
@given(
    leading_shapes(), st.integers(0, 6), st.integers(0, 4), st.integers(1, 3),
    st.sampled_from(DTYPES), st.data(),
)  # fmt: skip
def test_merge_any_layout(lead, nq, dv, parts, dtype, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))

    def lses(shape):
        x = randn(rng, shape, dtype, scale=3)
        x[rng.random(shape) < 0.3] = -np.inf
        return x

    inputs = {}
    for p in range(parts):
        inputs[f"outs[{p}]"] = _input(data, rng, lead + (nq, dv), dtype)
        layout = data.draw(layouts(len(lead) + 1))
        inputs[f"lses[{p}]"] = Carved(lead + (nq,), dtype, layout, np.nan, lses)
    outputs = {"out": _output(data, lead + (nq, dv), dtype)}
    if data.draw(st.booleans()):
        outputs["lse"] = _output(data, lead + (nq,), dtype)
    outs = [inputs[f"outs[{p}]"].view for p in range(parts)]
    parts_lse = [inputs[f"lses[{p}]"].view for p in range(parts)]
    out = outputs["out"].view
    lse = outputs["lse"].view if "lse" in outputs else None
    assert numbattn.merge_attention(outs, parts_lse, out=out, lse=lse) is out
    _check_guards(inputs, outputs)
    ref_out, ref_lse = reference.merge_attention(outs, parts_lse)
    assert_close(out, ref_out, dtype, "out")
    if lse is not None:
        assert_close(lse, ref_lse, dtype, "lse")
