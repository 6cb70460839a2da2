"""Bad input: a clear error before anything is written.

Every test runs twice: with no call plan (numbattn._plans), and after the
good calls that the bad ones alter were made twice, so their plans are warm.
"""

import numpy as np
import pytest

import numbattn
from numbattn import _plans

from .helpers import poisoned


def arrays(dtype=np.float32, lead=(2, 3), nq=5, nk=7, d=4, dv=6):
    rng = np.random.default_rng(0)
    q = rng.standard_normal(lead + (nq, d)).astype(dtype)
    k = rng.standard_normal(lead + (nk, d)).astype(dtype)
    v = rng.standard_normal(lead + (nk, dv)).astype(dtype)
    return q, k, v


def expect_untouched(fn, exc, match, *buffers):
    """``fn`` raises ``exc`` matching ``match`` and leaves ``buffers`` as they were."""
    before = [b.copy() for b in buffers]
    with pytest.raises(exc, match=match):
        fn()
    for b, orig in zip(buffers, before):
        np.testing.assert_array_equal(b, orig)


def _good_calls():
    """The well-formed calls the tests below alter (each made twice: recorded, replayed)."""
    for dtype in (np.float32, np.float64):
        for nq, d, lead in ((5, 4, (2, 3)), (7, 6, (2, 3)), (20, 4, (2, 3)), (5, 4, ())):
            q, k, v = arrays(dtype, lead=lead, nq=nq, d=d)
            out_shape = lead + (nq, v.shape[-1])
            for _ in range(2):
                numbattn.attention(q, k, v)
                numbattn.attention(q, k, v, out=poisoned(out_shape, dtype))
                numbattn.attention(
                    q, k, v, out=poisoned(out_shape, dtype), lse=poisoned(lead + (nq,), dtype)
                )
                numbattn.attention(q[..., :1, :], k, v, out=poisoned(lead + (1, 6), dtype))


@pytest.fixture(autouse=True, params=["cold", "warm"])
def plans(request):
    _plans.clear()
    if request.param == "warm":
        _good_calls()
        assert _plans._plans, "the good calls left no plan"
    yield request.param
    _plans.clear()


# (description, kwargs-builder, exception, message regex) for attention.
def _attention_cases():
    q, k, v = arrays()
    f64 = arrays(np.float64)
    return [
        ("q not an array", dict(q=q.tolist()), TypeError, r"q must be a numpy.ndarray"),
        (
            "q int",
            dict(q=q.astype(np.int32)),
            TypeError,
            r"q must have dtype float32 or float64, got int32",
        ),
        (
            "q float16",
            dict(q=q.astype(np.float16)),
            TypeError,
            r"q must have dtype float32 or float64, got float16",
        ),
        (
            "k complex",
            dict(k=k.astype(np.complex64)),
            TypeError,
            r"k must have dtype float32 or float64, got complex64",
        ),
        (
            "v object",
            dict(v=v.astype(object)),
            TypeError,
            r"v must have dtype float32 or float64, got object",
        ),
        ("mixed dtype", dict(k=f64[1]), TypeError, r"k must have dtype float32 .*got float64"),
        ("q 1-d", dict(q=q[0, 0, 0]), ValueError, r"q must have at least 2 dimensions"),
        (
            "leading",
            dict(k=k[:1]),
            ValueError,
            r"k must have the same leading .*expected \(2, 3\), got \(1, 3\)",
        ),
        (
            "v leading",
            dict(v=v[:1]),
            ValueError,
            r"v must have the same leading .*as k: expected \(2, 3\), got \(1, 3\)",
        ),
        ("d", dict(k=k[..., :3]), ValueError, r"k must have last dimension d = 4 \(as q\), got 3"),
        ("nk", dict(v=v[:, :, :6]), ValueError, r"v must have key count Nk = 7 \(as k\), got 6"),
        ("scale str", dict(scale="1"), TypeError, r"scale must be a real number"),
        ("scale bool", dict(scale=True), TypeError, r"scale must be a real number"),
        ("scale nan", dict(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
        ("scale inf", dict(scale=np.inf), ValueError, r"scale must be finite, got inf"),
        ("causal", dict(causal=1), TypeError, r"causal must be a bool, got int"),
        ("stream on host", dict(stream=0), ValueError, r"stream applies to GPU arrays only"),
    ]


@pytest.mark.parametrize("case", _attention_cases(), ids=lambda c: c[0])
def test_attention_bad_input_leaves_out_untouched(case):
    _, overrides, exc, match = case
    q, k, v = arrays()
    out = poisoned((2, 3, 5, 6), np.float32)
    lse = poisoned((2, 3, 5), np.float32)
    kw = dict(q=q, k=k, v=v) | overrides
    args = (kw.pop("q"), kw.pop("k"), kw.pop("v"))
    expect_untouched(
        lambda: numbattn.attention(*args, out=out, lse=lse, **kw), exc, match, out, lse
    )


def test_attention_bad_out_and_lse():
    q, k, v = arrays()
    out = poisoned((2, 3, 5, 6), np.float32)
    lse = poisoned((2, 3, 5), np.float32)

    def call(**kw):
        return lambda: numbattn.attention(q, k, v, **kw)

    expect_untouched(
        call(out=out[..., :5]),
        ValueError,
        r"out must have shape \(2, 3, 5, 6\), got \(2, 3, 5, 5\)",
    )
    expect_untouched(
        call(out=out.astype(np.float64)), TypeError, r"out must have dtype float32, got float64"
    )
    ro = out.copy()
    ro.flags.writeable = False
    expect_untouched(call(out=ro), ValueError, r"out must be writeable")
    expect_untouched(
        call(out=out, lse=lse[..., :4]),
        ValueError,
        r"lse must have shape \(2, 3, 5\), got \(2, 3, 4\)",
        out,
    )
    expect_untouched(
        call(out=out, lse=lse.astype(np.float64)), TypeError, r"lse must have dtype float32", out
    )
    expect_untouched(call(out=out, lse=[0.0]), TypeError, r"lse must be a numpy.ndarray", out)
    expect_untouched(
        call(out=np.broadcast_to(out[..., :1], out.shape)), ValueError, r"out must be writeable"
    )
    strided0 = np.lib.stride_tricks.as_strided(out, out.shape, (0,) * 4)
    expect_untouched(call(out=strided0), ValueError, r"out must not repeat elements", out)


def test_attention_overlap_rejected():
    q, k, v = arrays(nq=7, d=6)  # out shape == v shape == q shape
    qc = q.copy()
    expect_untouched(
        lambda: numbattn.attention(q, k, v, out=q), ValueError, r"out must not overlap q", q
    )
    expect_untouched(
        lambda: numbattn.attention(qc, k, v, out=v), ValueError, r"out must not overlap v", v
    )
    out = poisoned(q.shape, np.float32)
    big = poisoned((2, 3, 7, 7), np.float32)
    expect_untouched(
        lambda: numbattn.attention(q, k, v, out=big[..., :6], lse=big[..., 5]),
        ValueError,
        r"lse must not overlap out",
        big,
    )
    lse_in_q = q[..., 0]
    expect_untouched(
        lambda: numbattn.attention(q, k, v, out=out, lse=lse_in_q),
        ValueError,
        r"lse must not overlap q",
        q,
        out,
    )


def test_disjoint_interleaved_views_are_not_overlap():
    """out may share a buffer with an input if no element is shared."""
    rng = np.random.default_rng(1)
    store = rng.standard_normal((2, 9, 2, 4)).astype(np.float32)
    q, out = store[:, :, 0], store[:, :, 1]
    k, v = q.copy(), q.copy()
    expected = numbattn.attention(q.copy(), k, v)
    numbattn.attention(q, k, v, out=out)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_scores_bad_input():
    q, k, _ = arrays()
    out = poisoned((2, 3, 5, 7), np.float32)
    expect_untouched(
        lambda: numbattn.scores(q, k[..., :2], out=out),
        ValueError,
        r"k must have last dimension d = 4",
        out,
    )
    expect_untouched(
        lambda: numbattn.scores(q, k.astype(np.float64), out=out),
        TypeError,
        r"k must have dtype float32",
        out,
    )
    expect_untouched(
        lambda: numbattn.scores(q, k, out=out[..., :6]),
        ValueError,
        r"out must have shape \(2, 3, 5, 7\)",
        out,
    )
    expect_untouched(
        lambda: numbattn.scores(q, k, out=out, scale=-np.inf),
        ValueError,
        r"scale must be finite",
        out,
    )
    expect_untouched(
        lambda: numbattn.scores(q[0, 0, 0], k, out=out),
        ValueError,
        r"q must have at least 2 dimensions",
        out,
    )
    expect_untouched(
        lambda: numbattn.scores(q, k, out=out, causal="yes"),
        TypeError,
        r"causal must be a bool",
        out,
    )


def test_softmax_bad_input():
    x = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    out = poisoned((3, 8), np.float32)
    expect_untouched(
        lambda: numbattn.softmax(x.astype(np.int64), out=out),
        TypeError,
        r"x must have dtype float32 or float64, got int64",
        out,
    )
    expect_untouched(
        lambda: numbattn.softmax(np.float32(1.0), out=out), TypeError, r"x must be a numpy.ndarray"
    )
    expect_untouched(
        lambda: numbattn.softmax(np.array(1.0)), ValueError, r"x must have at least 1 dimensions"
    )
    expect_untouched(
        lambda: numbattn.softmax(x, out=out[:, :7]),
        ValueError,
        r"out must have shape \(3, 8\), got \(3, 7\)",
        out,
    )
    expect_untouched(
        lambda: numbattn.softmax(x, out=out.astype(np.float64)),
        TypeError,
        r"out must have dtype float32",
    )
    store = np.random.default_rng(3).standard_normal((3, 9)).astype(np.float32)
    expect_untouched(
        lambda: numbattn.softmax(store[:, :8], out=store[:, 1:]),
        ValueError,
        r"out must not overlap x",
        store,
    )


# ---- ragged batches and masks (issue 5) ----------------------------------


def _options_cases():
    mask_ok = np.ones((2, 1, 1, 7), bool)
    return [
        (
            "key_lengths negative",
            dict(key_lengths=np.array([3, -1])),
            ValueError,
            r"key_lengths must lie in \[0, 7\], got -1",
        ),
        (
            "key_lengths too long",
            dict(key_lengths=[8, 1]),
            ValueError,
            r"key_lengths must lie in \[0, 7\], got 8",
        ),
        (
            "key_lengths shape",
            dict(key_lengths=np.array([1, 2, 3])),
            ValueError,
            r"key_lengths must have shape \(2,\) .*got \(3,\)",
        ),
        (
            "key_lengths float",
            dict(key_lengths=np.array([1.0, 2.0])),
            TypeError,
            r"key_lengths must have an integer dtype, got float64",
        ),
        (
            "key_lengths str",
            dict(key_lengths="12"),
            TypeError,
            r"key_lengths must be an integer array",
        ),
        (
            "query_lengths",
            dict(query_lengths=np.array([6, 0])),
            ValueError,
            r"query_lengths must lie in \[0, 5\], got 6",
        ),
        (
            "bias shape",
            dict(bias=np.zeros((5, 6), np.float32)),
            ValueError,
            r"bias of shape \(5, 6\) does not broadcast to \(2, 3, 5, 7\)",
        ),
        (
            "bias dtype",
            dict(bias=np.zeros((5, 7))),
            TypeError,
            r"bias must have dtype float32 \(the dtype of the inputs\), got float64",
        ),
        ("bias list", dict(bias=[[0.0]]), TypeError, r"bias must be a numpy.ndarray"),
        (
            "mask dtype",
            dict(mask=mask_ok.astype(np.int8)),
            TypeError,
            r"mask must have dtype bool \(True = attend\), got int8",
        ),
        (
            "mask shape",
            dict(mask=np.ones((3, 1, 1, 7), bool)),
            ValueError,
            r"mask of shape \(3, 1, 1, 7\) does not broadcast",
        ),
        (
            "window value",
            dict(window=(-2, 0)),
            ValueError,
            r"window left must be >= -1 \(-1: unbounded\), got -2",
        ),
        ("window right", dict(window=(0, -5)), ValueError, r"window right must be >= -1"),
        ("window length", dict(window=(1,)), TypeError, r"window must be a pair of integers"),
        ("window float", dict(window=(1.5, 2)), TypeError, r"window must be a pair of integers"),
    ]


@pytest.mark.parametrize("case", _options_cases(), ids=lambda c: c[0])
def test_attention_bad_options_leave_out_untouched(case):
    _, kw, exc, match = case
    q, k, v = arrays()
    out = poisoned((2, 3, 5, 6), np.float32)
    lse = poisoned((2, 3, 5), np.float32)
    expect_untouched(
        lambda: numbattn.attention(q, k, v, out=out, lse=lse, **kw), exc, match, out, lse
    )
    if "query_lengths" not in kw:  # scores takes the same options
        sout = poisoned((2, 3, 5, 7), np.float32)
        expect_untouched(lambda: numbattn.scores(q, k, out=sout, **kw), exc, match, sout)


def test_lengths_need_a_batch_dimension():
    q, k, v = arrays(lead=())
    with pytest.raises(ValueError, match=r"key_lengths and query_lengths need a batch dimension"):
        numbattn.attention(q, k, v, key_lengths=np.array([3]))


def test_grouped_query_heads_must_divide():
    q, _, _ = arrays(lead=(2, 8))
    k, v = arrays(lead=(2, 3))[1:]
    out = poisoned((2, 8, 5, 6), np.float32)
    expect_untouched(
        lambda: numbattn.attention(q, k, v, out=out),
        ValueError,
        r"k must have a number of heads \(axis 1\) that divides q's 8 \(grouped-query attention\), got 3",
        out,
    )
    k2, v2 = arrays(lead=(2, 4))[1:]
    expect_untouched(
        lambda: numbattn.attention(q, k2, v2[:, :2], out=out),
        ValueError,
        r"v must have the same leading .*as k: expected \(2, 4\), got \(2, 2\)",
        out,
    )


def _packed(tq=9, tk=11, h=4, hk=2, d=8, dv=5, dtype=np.float32):
    rng = np.random.default_rng(5)
    return (
        rng.standard_normal((tq, h, d)).astype(dtype),
        rng.standard_normal((tk, hk, d)).astype(dtype),
        rng.standard_normal((tk, hk, dv)).astype(dtype),
    )


@pytest.mark.parametrize(
    "cu_q,cu_k,exc,match",
    [
        (
            np.array([1, 4, 9]),
            np.array([0, 5, 11]),
            ValueError,
            r"cu_seqlens_q must start at 0, got 1",
        ),
        (
            np.array([0, 5, 4, 9]),
            np.array([0, 5, 6, 11]),
            ValueError,
            r"cu_seqlens_q must be non-decreasing, got 5 then 4 at index 1",
        ),
        (
            np.array([0, 4, 8]),
            np.array([0, 5, 11]),
            ValueError,
            r"cu_seqlens_q must end at the packed size of q, 9, got 8",
        ),
        (
            np.array([0, 4, 9]),
            np.array([0, 5, 12]),
            ValueError,
            r"cu_seqlens_k must end at the packed size of k, 11, got 12",
        ),
        (
            np.array([0, 4, 9]),
            np.array([0, 11]),
            ValueError,
            r"cu_seqlens_k must have the same length as cu_seqlens_q \(3, B \+ 1\), got 2",
        ),
        (
            np.array([0, 4, 9], np.int16),
            np.array([0, 5, 11]),
            TypeError,
            r"cu_seqlens_q must have dtype int32 or int64, got int16",
        ),
        (
            np.array([0.0, 4, 9]),
            np.array([0, 5, 11]),
            TypeError,
            r"cu_seqlens_q must have an integer dtype, got float64",
        ),
        (
            np.zeros((0,), np.int32),
            np.array([0, 5, 11]),
            ValueError,
            r"cu_seqlens_q must have shape \(B \+ 1,\) with B >= 0, got \(0,\)",
        ),
    ],
)
def test_varlen_bad_cu_seqlens(cu_q, cu_k, exc, match):
    q, k, v = _packed()
    out = poisoned((9, 4, 5), np.float32)
    lse = poisoned((9, 4), np.float32)
    expect_untouched(
        lambda: numbattn.varlen_attention(q, k, v, cu_q, cu_k, out=out, lse=lse),
        exc,
        match,
        out,
        lse,
    )


def test_varlen_bad_shapes():
    q, k, v = _packed()
    cu_q, cu_k = np.array([0, 4, 9], np.int32), np.array([0, 5, 11], np.int32)
    out = poisoned((9, 4, 5), np.float32)
    expect_untouched(
        lambda: numbattn.varlen_attention(q[None], k, v, cu_q, cu_k, out=out),
        ValueError,
        r"q must have 3 dimensions \(Tq, H, d\), got shape \(1, 9, 4, 8\)",
        out,
    )
    expect_untouched(
        lambda: numbattn.varlen_attention(q, k, v[:10], cu_q, cu_k, out=out),
        ValueError,
        r"v must have token count Tk = 11 \(as k\), got 10",
        out,
    )
    expect_untouched(
        lambda: numbattn.varlen_attention(q, k, v, cu_q, cu_k, out=out[:, :3]),
        ValueError,
        r"out must have shape \(9, 4, 5\), got \(9, 3, 5\)",
        out,
    )
    expect_untouched(
        lambda: numbattn.varlen_attention(
            q, k[:, :1].repeat(3, 1), v[:, :1].repeat(3, 1), cu_q, cu_k, out=out
        ),
        ValueError,
        r"k must have a number of heads \(axis 0\) that divides q's 4",
        out,
    )
    expect_untouched(
        lambda: numbattn.varlen_attention(
            q, k, v, cu_q, cu_k, bias=np.zeros((4, 9, 10), np.float32), out=out
        ),
        ValueError,
        r"bias of shape \(4, 9, 10\) does not broadcast to \(4, 9, 11\)",
        out,
    )


def test_merge_bad_input():
    rng = np.random.default_rng(4)
    o = [rng.standard_normal((2, 5, 3)).astype(np.float32) for _ in range(2)]
    lses = [rng.standard_normal((2, 5)).astype(np.float32) for _ in range(2)]
    out = poisoned((2, 5, 3), np.float32)
    expect_untouched(
        lambda: numbattn.merge_attention([], [], out=out),
        ValueError,
        r"outs must hold at least one partial result, got 0",
        out,
    )
    expect_untouched(
        lambda: numbattn.merge_attention(o, lses[:1], out=out),
        ValueError,
        r"lses must hold one lse per partial result: expected 2, got 1",
        out,
    )
    expect_untouched(
        lambda: numbattn.merge_attention([o[0], o[1][:, :4]], lses, out=out),
        ValueError,
        r"outs\[1\] must have shape \(2, 5, 3\) \(as outs\[0\]\), got \(2, 4, 3\)",
        out,
    )
    expect_untouched(
        lambda: numbattn.merge_attention(o, [lses[0], lses[1][:1]], out=out),
        ValueError,
        r"lses\[1\] must have shape \(2, 5\), got \(1, 5\)",
        out,
    )
    expect_untouched(
        lambda: numbattn.merge_attention([o[0], o[1].astype(np.float64)], lses, out=out),
        TypeError,
        r"outs\[1\] must have dtype float32",
        out,
    )
    expect_untouched(
        lambda: numbattn.merge_attention(o, lses, out=o[1]),
        ValueError,
        r"out must not overlap outs\[1\]",
        o[1],
    )
    expect_untouched(
        lambda: numbattn.merge_attention(o, lses, out=out, lse=out[..., 0]),
        ValueError,
        r"lse must not overlap out",
        out,
    )


# CPU tuning knobs are checked at call time, as the CUDA ones are: a float
# would otherwise be truncated silently by the kernels' integer arguments.
_KNOB_CALLS = {
    "attention": lambda q, k, v, out: numbattn.attention(q, k, v, out=out),
    "decode": lambda q, k, v, out: numbattn.attention(q[:, :, :1], k, v, out=out[:, :, :1]),
    "scores": lambda q, k, v, out: numbattn.scores(q, k, out=out),
}


@pytest.mark.parametrize(
    "knob, value, call, message",
    [
        ("CPU_QUERY_TILE", 2.5, "attention", r"CPU_QUERY_TILE must be a positive integer, got 2.5"),
        ("CPU_KEY_TILE", 0, "attention", r"CPU_KEY_TILE must be a positive integer, got 0"),
        (
            "CPU_SCORES_KEY_TILE",
            True,
            "scores",
            r"CPU_SCORES_KEY_TILE must be a positive integer, got True",
        ),
        (
            "CPU_SCORES_QUERY_TILE",
            "8",
            "scores",
            r"CPU_SCORES_QUERY_TILE must be a positive integer, got '8'",
        ),
        ("CPU_STREAM_ROWS", -1, "attention", r"CPU_STREAM_ROWS must be an integer >= 0, got -1"),
        ("CPU_STREAM_WIDE_ROWS", 2.5, "decode", r"CPU_STREAM_WIDE_ROWS must be a positive"),
        ("CPU_STREAM_KEY_TILE", None, "decode", r"CPU_STREAM_KEY_TILE must be a positive"),
        ("CPU_SERIAL_WORK", -1, "decode", r"CPU_SERIAL_WORK must be an integer >= 0, got -1"),
        ("CPU_SERIAL_WORK", 1.5, "attention", r"CPU_SERIAL_WORK must be an integer >= 0"),
    ],
)
def test_bad_cpu_knob(monkeypatch, knob, value, call, message):
    q, k, v = arrays(nq=20)  # more rows than CPU_STREAM_ROWS: the tiled kernel
    if call == "scores":
        out = poisoned(q.shape[:-1] + (k.shape[-2],), q.dtype)
    else:
        out = poisoned(q.shape[:-1] + (v.shape[-1],), q.dtype)
    monkeypatch.setattr(numbattn.config, knob, value)
    expect_untouched(lambda: _KNOB_CALLS[call](q, k, v, out), ValueError, message, out)


@pytest.mark.parametrize(
    "knob, value, message",
    [
        ("CPU_BWD_QUERY_TILE", 1.5, r"CPU_BWD_QUERY_TILE must be a positive integer, got 1.5"),
        ("CPU_BWD_KEY_TILE", 0, r"CPU_BWD_KEY_TILE must be a positive integer, got 0"),
        ("CPU_BWD_SPLIT_BYTES", -1, r"CPU_BWD_SPLIT_BYTES must be an integer >= 0, got -1"),
    ],
)
def test_bad_cpu_backward_knob(monkeypatch, knob, value, message):
    q, k, v = arrays()
    lse = np.empty(q.shape[:-1], q.dtype)
    out = numbattn.attention(q, k, v, lse=lse)
    dout = np.ones_like(out)
    grads = [poisoned(a.shape, a.dtype) for a in (q, k, v)]
    monkeypatch.setattr(numbattn.config, knob, value)

    def call():
        numbattn.attention_backward(q, k, v, out, lse, dout, dq=grads[0], dk=grads[1], dv=grads[2])

    expect_untouched(call, ValueError, message, *grads)


@pytest.mark.parametrize("value", [1, 0, "False", None, 0.5])
def test_bool_knob_rejects_non_bools(value):
    """A bool knob (CUDA_BWD_FAST_LOOP) is True or False, never bool(value)."""
    from numbattn._checks import check_knob_flag

    with pytest.raises(
        ValueError, match=r"numbattn.config.CUDA_BWD_FAST_LOOP must be True or False"
    ):
        check_knob_flag("CUDA_BWD_FAST_LOOP", value)
    assert check_knob_flag("CUDA_BWD_FAST_LOOP", np.bool_(False)) is False
    assert check_knob_flag("CUDA_BWD_FAST_LOOP", True) is True
