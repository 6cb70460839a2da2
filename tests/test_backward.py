"""attention_backward / varlen_attention_backward on the CPU.

Gradients against the float64 reference (numbattn.reference.attention_backward)
and, in float64, against central finite differences of the forward; both
dtypes, the forward tests' options and combinations (tests/test_options.py),
with shipped and tiny tiles (tails, multi-tile and multi-slice paths).
Gradient buffers are NaN-poisoned, so an element the kernels skip fails.
Bad input raises before any buffer is touched.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cpu import backend as cpu_backend
from numbattn.cpu.kernels import attention_backward_kernel

from .helpers import DTYPES, poisoned, randn, rel_err
from .test_options import CASES, K_LENS, Q_LENS, B, H, _options, _varlen_inputs

#: ||grad - ref|| / ||ref||: float32 gradients sum products of float32 terms
#: over both sequence axes (dk over Nq, dq over Nk), so they carry more
#: rounding than the forward's output.
GRAD_RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}


@pytest.fixture(params=["default-tiles", "tiny-tiles"])
def tiles(request, monkeypatch):
    """Shipped tile sizes, and tiny ones for the forward and the backward."""
    if request.param == "tiny-tiles":
        monkeypatch.setattr(numbattn.config, "CPU_QUERY_TILE", 3)
        monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", 5)
        monkeypatch.setattr(numbattn.config, "CPU_BWD_QUERY_TILE", 3)
        monkeypatch.setattr(numbattn.config, "CPU_BWD_KEY_TILE", 5)
    return request.param


def assert_grads(got, ref, dtype, what):
    tol = GRAD_RTOL[np.dtype(dtype)]
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert g.dtype == np.dtype(dtype), f"{what} {name} dtype"
        assert not np.isnan(g).any(), f"{what}: {name} has NaN"
        err = rel_err(g, r)
        assert err <= tol, f"{what} {name}: relative error {err:.3e} > {tol:.0e}"


def forward(q, k, v, dtype, **kw):
    lse = poisoned(q.shape[:-1], dtype)
    out = numbattn.attention(q, k, v, lse=lse, **kw)
    return out, lse


def backward(q, k, v, out, lse, dout, dtype, **kw):
    """The public backward into poisoned buffers (checked to be returned)."""
    bufs = tuple(poisoned(x.shape, dtype) for x in (q, k, v))
    got = numbattn.attention_backward(
        q, k, v, out, lse, dout, dq=bufs[0], dk=bufs[1], dv=bufs[2], **kw
    )
    assert all(g is b for g, b in zip(got, bufs))
    return got


def check(q, k, v, dtype, what, rng, **kw):
    dout = randn(rng, q.shape[:-1] + (v.shape[-1],), dtype)
    out, lse = forward(q, k, v, dtype, **kw)
    ref = reference.attention_backward(q, k, v, dout, **kw)
    assert_grads(backward(q, k, v, out, lse, dout, dtype, **kw), ref, dtype, what)
    # New arrays when no buffers are given.
    got = numbattn.attention_backward(q, k, v, out, lse, dout, **kw)
    assert_grads(got, ref, dtype, f"{what}, new buffers")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq, nk", [(13, 17), (19, 11)], ids=str)
@pytest.mark.parametrize("case", CASES + ["plain", "causal"])
def test_options_match_reference(rng, tiles, dtype, nq, nk, case):
    d, dv = 8, 6
    q = randn(rng, (B, H, nq, d), dtype)
    k = randn(rng, (B, H, nk, d), dtype)
    v = randn(rng, (B, H, nk, dv), dtype)
    kw = _options(rng, case, nq, nk, dtype)
    check(q, k, v, dtype, case, rng, scale=0.4, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_tile_default_tiles(rng, dtype):
    """More than one query and key tile at the shipped sizes; lengths 0, 1, full."""
    nq, nk = 150, 300
    q = randn(rng, (4, H, nq, 16), dtype)
    k = randn(rng, (4, H, nk, 16), dtype)
    v = randn(rng, (4, H, nk, 16), dtype)
    lengths = dict(key_lengths=np.array([0, 1, nk, 200]), query_lengths=np.array([nq, 1, 0, 129]))
    for causal in (False, True):
        check(q, k, v, dtype, f"causal={causal}", rng, causal=causal, **lengths)
    check(q, k, v, dtype, "window", rng, window=(70, 5), key_lengths=lengths["key_lengths"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_one_head_many_slices(rng, tiles, dtype, causal):
    """One head: the key tiles are dealt to several slices, each with its own
    dQ accumulator, summed at the end."""
    q = randn(rng, (1, 1, 150, 8), dtype)
    k = randn(rng, (1, 1, 170, 8), dtype)
    v = randn(rng, (1, 1, 170, 5), dtype)
    check(q, k, v, dtype, "one head", rng, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk", [2, 1])
@pytest.mark.parametrize("layout", ["contiguous", "swapped"])
def test_grouped_query(rng, tiles, dtype, hk, layout):
    """dk and dv summed over each group of query heads; strided layouts."""
    hq, nq, nk, d, dv = 4, 11, 14, 8, 5
    if layout == "contiguous":
        q = randn(rng, (B, hq, nq, d), dtype)
        k = randn(rng, (B, hk, nk, d), dtype)
        v = randn(rng, (B, hk, nk, dv), dtype)
    else:  # (B, N, H, d) storage, v also strided along d
        q = randn(rng, (B, nq, hq, d), dtype).swapaxes(1, 2)
        k = randn(rng, (B, nk, hk, d), dtype).swapaxes(1, 2)
        v = randn(rng, (B, nk, hk, 2 * dv), dtype)[..., ::2].swapaxes(1, 2)
    check(q, k, v, dtype, "plain", rng)
    check(q, k, v, dtype, "causal", rng, causal=True)
    mask = rng.random((B, hq, nq, nk)) < 0.7
    check(
        q, k, v, dtype, "combined", rng, window=(5, 1), key_lengths=np.array([nk, 3, 9]), mask=mask
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dimensions(rng, dtype):
    """No, one and three leading dimensions (several launches), strided gradients."""
    for lead in [(), (5,), (2, 3, 2)]:
        q = randn(rng, lead + (7, 4), dtype)
        k = randn(rng, lead + (9, 4), dtype)
        v = randn(rng, lead + (9, 3), dtype)
        check(q, k, v, dtype, f"leading {lead}", rng, causal=True)
    q = randn(rng, (2, 3, 2, 7, 4), dtype)
    k = randn(rng, (2, 3, 2, 9, 4), dtype)
    v = randn(rng, (2, 3, 2, 9, 3), dtype)
    dout = randn(rng, (2, 3, 2, 7, 3), dtype)
    out, lse = forward(q, k, v, dtype)
    bufs = [
        poisoned(x.shape[:-2] + (x.shape[-1], x.shape[-2]), dtype).swapaxes(-1, -2)
        for x in (q, k, v)
    ]
    got = numbattn.attention_backward(q, k, v, out, lse, dout, dq=bufs[0], dk=bufs[1], dv=bufs[2])
    assert_grads(got, reference.attention_backward(q, k, v, dout), dtype, "strided buffers")


def run_varlen(q, k, v, cu_q, cu_k, dtype, rng, **kw):
    lse = poisoned(q.shape[:2], dtype)
    out = numbattn.varlen_attention(q, k, v, cu_q, cu_k, lse=lse, **kw)
    dout = randn(rng, out.shape, dtype)
    bufs = tuple(poisoned(x.shape, dtype) for x in (q, k, v))
    got = numbattn.varlen_attention_backward(
        q, k, v, out, lse, dout, cu_q, cu_k, dq=bufs[0], dk=bufs[1], dv=bufs[2], **kw
    )
    assert all(g is b for g, b in zip(got, bufs))
    ref = reference.varlen_attention_backward(q, k, v, dout, cu_q, cu_k, **kw)
    assert_grads(got, ref, dtype, str(kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"causal": True},
        {"window": (2, 1)},
        {"window": (3, 4), "causal": True},
        {"bias": "tq-tk"},
        {"mask": "h-tq-tk", "causal": True},
    ],
    ids=str,
)
def test_varlen(rng, tiles, dtype, opts):
    q, k, v, cu_q, cu_k = _varlen_inputs(rng, dtype, Q_LENS, K_LENS, 3, 3)
    tq, tk = q.shape[0], k.shape[0]
    kw = dict(opts, scale=0.3)
    if kw.get("bias") == "tq-tk":
        bias = randn(rng, (tq, tk), dtype)
        bias[rng.random((tq, tk)) < 0.2] = -np.inf
        kw["bias"] = bias
    if kw.get("mask") == "h-tq-tk":
        kw["mask"] = rng.random((3, tq, tk)) < 0.6
    run_varlen(q, k, v, cu_q, cu_k, dtype, rng, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_gqa(rng, tiles, dtype):
    q, k, v, cu_q, cu_k = _varlen_inputs(rng, dtype, Q_LENS, K_LENS, 4, 2)
    for kw in ({}, {"window": (3, 0)}, {"window": (-1, 2), "causal": True}):
        run_varlen(q, k, v, cu_q, cu_k, dtype, rng, **kw)


def _loss(q, k, v, dout, **kw):
    out, _ = reference.attention(q, k, v, **kw)
    return float((out * dout).sum())


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": True},
        {"window": (2, 1), "scale": 0.7},
        {"key_lengths": np.array([5, 2]), "query_lengths": np.array([3, 6])},
        {"bias": "bias", "mask": "mask"},
        {"gqa": True, "causal": True},
    ],
    ids=str,
)
def test_finite_differences(rng, kw):
    """float64 gradients against central differences of sum(out * dout)."""
    kw = dict(kw)
    hk = 1 if kw.pop("gqa", False) else 2
    nq, nk, d, dv = 6, 7, 4, 3
    q = rng.standard_normal((2, 2, nq, d))
    k = rng.standard_normal((2, hk, nk, d))
    v = rng.standard_normal((2, hk, nk, dv))
    if kw.get("bias") == "bias":
        kw["bias"] = rng.standard_normal((nq, nk))
        kw["mask"] = rng.random((2, 2, nq, nk)) < 0.7
    dout = rng.standard_normal((2, 2, nq, dv))
    out, lse = forward(q, k, v, np.float64, **kw)
    grads = numbattn.attention_backward(q, k, v, out, lse, dout, **kw)
    h = 1e-6
    for name, x, g in zip("qkv", (q, k, v), grads):
        for _ in range(12):
            idx = tuple(rng.integers(0, n) for n in x.shape)
            orig = x[idx]
            x[idx] = orig + h
            up = _loss(q, k, v, dout, **kw)
            x[idx] = orig - h
            down = _loss(q, k, v, dout, **kw)
            x[idx] = orig
            fd = (up - down) / (2 * h)
            assert abs(g[idx] - fd) <= 1e-6 * (1 + abs(fd)), f"d{name}{idx}: {g[idx]} vs {fd}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_positions_never_read(rng, tiles, dtype):
    """NaN in keys, values, queries and dout at positions no pair uses (past
    the lengths, masked keys) never reaches a gradient; fully masked rows
    give dq = 0."""
    nq, nk, d, dv = 9, 12, 4, 3
    q = randn(rng, (B, H, nq, d), dtype)
    k = randn(rng, (B, H, nk, d), dtype)
    v = randn(rng, (B, H, nk, dv), dtype)
    dout = randn(rng, (B, H, nq, dv), dtype)
    klen, qlen = np.array([nk, 7, 0]), np.array([nq, 5, 4])
    mask = np.ones((nq, nk), bool)
    mask[:, 3] = False  # key 3 masked for every row
    mask[2, :] = False  # row 2 sees nothing
    kw = dict(key_lengths=klen, query_lengths=qlen, mask=mask, causal=True)
    out, lse = forward(q, k, v, dtype, **kw)
    k[1, :, 7:] = np.nan
    v[1, :, 7:] = np.nan
    k[:, :, 3] = np.nan
    v[:, :, 3] = np.inf
    q[1, :, 5:] = np.nan
    dout[1, :, 5:] = np.nan
    out[1, :, 5:] = np.nan
    q[:, :, 2] = np.nan  # a row with no visible key
    dout[:, :, 2] = np.nan
    ref = reference.attention_backward(q, k, v, dout, **kw)
    got = backward(q, k, v, out, lse, dout, dtype, **kw)
    assert_grads(got, ref, dtype, "NaN at unused positions")
    dq, dk, dv_ = got
    assert (dq[:, :, 2] == 0).all() and (dq[1, :, 5:] == 0).all() and (dq[2] == 0).all()
    assert (dk[1, :, 7:] == 0).all() and (dv_[:, :, 3] == 0).all() and (dk[2] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_degenerate(rng, dtype):
    """Nq = 0 (dk = dv = 0), Nk = 0 (dq = 0), d = 0, dv = 0, no batch."""
    for nq, nk, d, dv in [(0, 5, 4, 3), (4, 0, 4, 3), (4, 5, 0, 3), (4, 5, 4, 0), (0, 0, 4, 3)]:
        q = randn(rng, (2, 2, nq, d), dtype)
        k = randn(rng, (2, 2, nk, d), dtype)
        v = randn(rng, (2, 2, nk, dv), dtype)
        check(q, k, v, dtype, f"{(nq, nk, d, dv)}", rng, causal=True)
    q, k, v = (randn(rng, (0, 2, 4, 4), dtype) for _ in range(3))
    check(q, k, v, dtype, "B = 0", rng)


def test_deterministic_and_splits_agree(rng):
    """Bitwise reproducible calls; any number of dQ slices gives the same
    gradients up to rounding (the kernel called directly)."""
    dtype = np.float32
    q = randn(rng, (1, 2, 70, 8), dtype)
    k = randn(rng, (1, 1, 90, 8), dtype)
    v = randn(rng, (1, 1, 90, 4), dtype)
    dout = randn(rng, (1, 2, 70, 4), dtype)
    out, lse = forward(q, k, v, dtype, causal=True)
    first = numbattn.attention_backward(q, k, v, out, lse, dout, causal=True)
    again = numbattn.attention_backward(q, k, v, out, lse, dout, causal=True)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    ref = reference.attention_backward(q, k, v, dout, causal=True)
    seq = np.broadcast_to(np.array([0, 70, 70, 0, 90, 20]), (1, 2, 6))
    for splits in (1, 2, 3, 7):
        grads = [poisoned(x.shape, dtype) for x in (q, k, v)]
        args = cpu_backend.attention_backward_args(
            q, k, v, out, lse, dout, np.empty(lse.shape, dtype), *grads, seq, 70, 90, 90,
            None, None, 1 / np.sqrt(8), -1, 0, q_tile=8, k_tile=8,
        )  # fmt: skip
        attention_backward_kernel(*args._replace(splits=splits))
        assert_grads(grads, ref, dtype, f"splits={splits}")


@pytest.fixture(params=[1, 2], ids=["one-loop", "three-loops"])
def forced_splits(request, monkeypatch):
    """Force the dQ slice count: 1 runs loops 1 and 3 inside loop 2's work
    items (one parallel loop per call), 2 the three separate loops."""
    orig = cpu_backend.attention_backward_args

    def args(*a, **kw):
        return orig(*a, **kw)._replace(splits=request.param)

    monkeypatch.setattr(cpu_backend, "attention_backward_args", args)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_and_three_loops(rng, tiles, forced_splits, dtype):
    """Both loop structures on what makes loops 1 and 3 differ: GQA groups,
    query rows past Q_LEN (zeros), sequences with no query or no key, varlen
    (a zero-stride batch axis), causal with Nq != Nk, and strided dout / dq /
    out (the strided delta and dq loops), into poisoned buffers."""
    hq, hk, nq, nk, d, dv = 4, 2, 13, 17, 8, 5
    q = randn(rng, (3, hq, nq, d), dtype)
    k = randn(rng, (3, hk, nk, d), dtype)
    v = randn(rng, (3, hk, nk, dv), dtype)
    kw = dict(causal=True, query_lengths=np.array([13, 6, 0]), key_lengths=np.array([17, 0, 9]))
    check(q, k, v, dtype, "lengths", rng, **kw)
    check(q, k, v, dtype, "Nq > Nk", rng, causal=True, key_lengths=np.array([5, 9, 1]))
    dout = randn(rng, (3, hq, nq, 2 * dv), dtype)[..., ::2]
    out, lse = forward(q, k, v, dtype, **kw)
    out_s = np.empty((3, hq, nq, 2 * dv), dtype)[..., ::2]
    out_s[...] = out
    bufs = [poisoned((3, hq, nq, 2 * d), dtype)[..., ::2]] + [
        poisoned(x.shape, dtype) for x in (k, v)
    ]
    numbattn.attention_backward(q, k, v, out_s, lse, dout, dq=bufs[0], dk=bufs[1], dv=bufs[2], **kw)
    ref = reference.attention_backward(q, k, v, dout, **kw)
    assert_grads(bufs, ref, dtype, "strided dout, out, dq")
    q, k, v, cu_q, cu_k = _varlen_inputs(rng, dtype, Q_LENS, K_LENS, 4, 2)
    run_varlen(q, k, v, cu_q, cu_k, dtype, rng, causal=True)


# --- validation: errors before any buffer is touched ------------------------


def _valid(rng, dtype=np.float64):
    q = randn(rng, (2, 4, 5, 3), dtype)
    k = randn(rng, (2, 2, 6, 3), dtype)
    v = randn(rng, (2, 2, 6, 2), dtype)
    out, lse = forward(q, k, v, dtype)
    dout = randn(rng, out.shape, dtype)
    return dict(q=q, k=k, v=v, out=out, lse=lse, dout=dout)


def _bad_cases(a):
    f32 = {n: x.astype(np.float32) for n, x in a.items()}
    big = np.zeros((2, 4, 6, 8))
    return [
        ("lse", dict(lse=a["lse"][..., :4]), ValueError, "lse must have shape"),
        ("lse", dict(lse=f32["lse"]), TypeError, "lse must have dtype float64"),
        ("lse", dict(lse=a["lse"][..., None]), ValueError, "lse must have shape"),
        ("out", dict(out=a["out"][..., :1]), ValueError, "out must have shape"),
        ("out", dict(out=f32["out"]), TypeError, "out must have dtype float64"),
        ("dout", dict(dout=a["dout"][:, :2]), ValueError, "dout must have shape"),
        ("dout", dict(dout=f32["dout"]), TypeError, "dout must have dtype float64"),
        ("dout", dict(dout=[1.0]), TypeError, "dout must be a numpy.ndarray"),
        ("dq", dict(dq=np.zeros((2, 4, 5, 2))), ValueError, "dq must have shape"),
        ("dk", dict(dk=np.zeros((2, 4, 6, 3))), ValueError, "dk must have shape"),
        ("dv", dict(dv=np.zeros((2, 2, 6, 2), np.float32)), TypeError, "dv must have dtype"),
        ("dq", dict(dq=a["q"]), ValueError, "dq must not overlap q"),
        ("dk", dict(dk=np.broadcast_to(np.zeros(3), (2, 2, 6, 3))), ValueError, "read-only"),
        (
            "dq,dk",
            dict(dq=big[:, :, :5, :3], dk=big[:, :2, :, 2:5]),
            ValueError,
            "dk must not overlap dq",
        ),
        (
            "dv",
            dict(dv=a["out"].reshape(-1)[: 2 * 2 * 6 * 2].reshape(2, 2, 6, 2)),
            ValueError,
            "dv must not overlap out",
        ),
    ]


def test_bad_input_leaves_buffers_untouched(rng):
    base = _valid(rng)
    for what, change, exc, match in _bad_cases(base):
        args = dict(base)
        grads = {n: np.full(args[n[1:]].shape, 7.0) for n in ("dq", "dk", "dv")}
        for name in ("dq", "dk", "dv"):
            if name in change:
                grads[name] = change.pop(name)
        args.update(change)
        before = {n: np.array(g, copy=True) for n, g in grads.items()}
        with pytest.raises(exc, match=match):
            numbattn.attention_backward(
                args["q"], args["k"], args["v"], args["out"], args["lse"], args["dout"], **grads
            )
        for n, g in grads.items():
            np.testing.assert_array_equal(g, before[n], err_msg=f"{what}: {n} written")


def test_bad_options_leave_buffers_untouched(rng):
    a = _valid(rng)
    grads = {n: np.full(a[n[1:]].shape, 7.0) for n in ("dq", "dk", "dv")}
    bad = [
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(window=(-2, 0)), ValueError, "window left"),
        (dict(key_lengths=np.array([7, 1])), ValueError, "key_lengths must lie in"),
        (dict(mask=np.ones((5, 7), bool)), ValueError, "mask of shape"),
        (dict(bias=np.ones((5, 6), np.float32)), TypeError, "bias must have dtype"),
        (dict(scale=np.inf), ValueError, "scale must be finite"),
    ]
    args = [a[n] for n in ("q", "k", "v", "out", "lse", "dout")]
    for kw, exc, match in bad:
        with pytest.raises(exc, match=match):
            numbattn.attention_backward(*args, **kw, **grads)
        for g in grads.values():
            assert (g == 7.0).all()
    # The gradient buffer must not overlap the mask / bias either.
    bias = np.zeros((2, 4, 5, 6))
    with pytest.raises(ValueError, match="dq must not overlap bias"):
        numbattn.attention_backward(*args, bias=bias, dq=bias[..., :3])


def test_varlen_bad_input(rng):
    q, k, v, cu_q, cu_k = _varlen_inputs(rng, np.float64, [3, 4], [2, 5], 2, 2)
    lse = np.empty(q.shape[:2])
    out = numbattn.varlen_attention(q, k, v, cu_q, cu_k, lse=lse)
    dq = np.full(q.shape, 7.0)
    with pytest.raises(ValueError, match="lse must have shape"):
        numbattn.varlen_attention_backward(q, k, v, out, lse.T, out, cu_q, cu_k, dq=dq)
    with pytest.raises(ValueError, match="cu_seqlens_q must end"):
        numbattn.varlen_attention_backward(q, k, v, out, lse, out, cu_q[:-1], cu_k, dq=dq)
    with pytest.raises(ValueError, match="dq must not overlap dout"):
        dout = np.zeros(q.shape)
        numbattn.varlen_attention_backward(q, k, v, out, lse, dout[..., :6], cu_q, cu_k, dq=dout)
    assert (dq == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("diagonal", [0, -3, 5, "per-batch"])
def test_diagonal(rng, tiles, dtype, diagonal):
    """The forward's ``diagonal`` alignment, with causal and a window."""
    q = randn(rng, (B, H, 9, 4), dtype)
    k = randn(rng, (B, H, 12, 4), dtype)
    v = randn(rng, (B, H, 12, 3), dtype)
    if diagonal == "per-batch":
        diagonal = np.array([-2, 0, 7])
    check(q, k, v, dtype, f"diagonal={diagonal}", rng, causal=True, diagonal=diagonal)
    check(q, k, v, dtype, "window", rng, window=(2, 1), diagonal=diagonal)


# --- the register-blocked micro-kernel (issue 14) ----------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_gemm_matches_numpy(rng, dtype):
    """_gemm / _gemm_tn against float64 NumPy at widths that take
    every path of a row (4-vector blocks, 3 / 2 / 1 vectors, the scalar
    tail), with causal trimming, accumulating and overwriting (C poisoned:
    the overwritten part must not read it)."""
    from numbattn.cpu import kernels as K

    tol = 1e-5 if dtype == np.float32 else 1e-13
    for m, n, kk in [(4, 120, 9), (8, 72, 16), (12, 40, 33), (4, 3, 5), (8, 16, 0), (64, 128, 64)]:
        a = randn(rng, (m, kk), dtype)
        b = randn(rng, (kk, n), dtype)
        for ntri, ktri in [(n, kk), (0, kk), (5, kk), (n, 0), (n, 6), (-8, -8)]:
            want = np.zeros((m, n))
            for i in range(0, m, 4):  # the rows of block i see columns < ntri + i + 4
                nlim, klim = max(0, min(n, ntri + i + 4)), max(0, min(kk, ktri + i + 4))
                want[i : i + 4, :nlim] = a[i : i + 4, :klim].astype(np.float64) @ b[:klim, :nlim]
            c0 = randn(rng, (m, n), dtype)
            got = c0.copy()
            K._gemm(a, b, got, m, n, kk, ntri, ktri, False)
            ow = poisoned((m, n), dtype)
            K._gemm(a, b, ow, m, n, kk, ntri, ktri, True)
            for i in range(0, m, 4):
                nlim = max(0, min(n, ntri + i + 4))
                rows = slice(i, i + 4)
                ref = want[rows, :nlim] + c0[rows, :nlim]
                assert rel_err(got[rows, :nlim], ref) <= tol, (m, n, kk, ntri, ktri, i)
                assert rel_err(ow[rows, :nlim], want[rows, :nlim]) <= tol, (m, n, kk, ntri, i)
                # Columns past the trimmed ones are never written when accumulating.
                np.testing.assert_array_equal(
                    got[rows, min(n, nlim + 16) :], c0[rows, min(n, nlim + 16) :]
                )
        # Transposed A (P^T dO, dS^T Q): A is (K, M), rows of block i use p >= i - tri.
        at = randn(rng, (kk, m), dtype)
        for tri in (m, 0, 5):
            at_t = at.copy()
            for i in range(0, m, 4):  # zeros where the kernel may skip
                p0 = max(0, i - tri)
                at_t[: p0 - p0 % 4, i : i + 4] = 0
            c0 = randn(rng, (m, n), dtype)
            got = c0.copy()
            K._gemm_tn(at_t, b, got, m, n, kk, tri)
            ref = at_t.T.astype(np.float64) @ b + c0
            assert rel_err(got, ref) <= tol, ("tn", m, n, kk, tri)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_wide_heads_default_tiles(rng, dtype, layout):
    """d = 120, dv = 40 at the shipped tiles (every micro-kernel width and
    tail), causal with Nq != Nk and key lengths (NaN keys and values past
    them, where S and dP of earlier tiles leave stale values), and a window;
    unit-stride rows (packed through row views) and strided ones."""
    nq, nk, d, dv = 150, 270, 120, 40
    if layout == "contiguous":
        q = randn(rng, (2, 2, nq, d), dtype)
        k = randn(rng, (2, 2, nk, d), dtype)
        v = randn(rng, (2, 2, nk, dv), dtype)
    else:
        q = randn(rng, (2, nq, 2, 2 * d), dtype)[..., ::2].swapaxes(1, 2)
        k = randn(rng, (2, nk, 2, d), dtype).swapaxes(1, 2)
        v = randn(rng, (2, nk, 2, 2 * dv), dtype)[..., ::2].swapaxes(1, 2)
    klen = np.array([nk, 201])
    dout = randn(rng, (2, 2, nq, dv), dtype)
    for kw in (dict(causal=True, key_lengths=klen), dict(window=(90, 20))):
        out, lse = forward(q, k, v, dtype, **kw)
        kn, vn = k.copy(), v.copy()
        if "key_lengths" in kw:
            kn[1, :, 201:] = np.nan
            vn[1, :, 201:] = np.nan
        ref = reference.attention_backward(q, k, v, dout, **kw)
        got = backward(q, kn, vn, out, lse, dout, dtype, **kw)
        assert_grads(got, ref, dtype, f"{layout} {kw}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_tile, k_tile", [(20, 36), (36, 20), (64, 48)], ids=str)
def test_trimmed_diagonal_tiles(rng, monkeypatch, dtype, q_tile, k_tile):
    """Diagonal tiles wider than a vector, at offsets that are not multiples
    of 4 (causal with Nq != Nk, key lengths, a window): the exponentials run
    over whole vectors past a row's last visible key and dS only as far as
    the trimmed products read it, so stale S / dP columns of earlier tiles
    must never reach a gradient. d = 40 packs K through 16 x 16 register
    transposes (float32) with a tail; K rows of unit stride (read in place
    by dS K) and of stride 2 (packed)."""
    monkeypatch.setattr(numbattn.config, "CPU_BWD_QUERY_TILE", q_tile)
    monkeypatch.setattr(numbattn.config, "CPU_BWD_KEY_TILE", k_tile)
    nq, nk, d, dv = 90, 117, 40, 24
    q = randn(rng, (2, 2, nq, d), dtype)
    k = randn(rng, (2, nk, 2, d), dtype).swapaxes(1, 2)  # rows of stride 2 d
    v = randn(rng, (2, 2, nk, dv), dtype)
    klen = np.array([nk, 97])
    cases = [
        dict(causal=True),
        dict(causal=True, key_lengths=klen),
        dict(window=(33, 5), key_lengths=klen),
    ]
    for kw in cases:
        check(q, k, v, dtype, f"{(q_tile, k_tile)} {kw}", rng, **kw)
    # K rows of non-unit stride: dS K from a packed copy, not in place.
    k3 = randn(rng, (2, 2, nk, 2 * d), dtype)[..., ::2]
    check(q, k3, v, dtype, f"{(q_tile, k_tile)} strided K", rng, causal=True, key_lengths=klen)
    # Nq > Nk: the first rows see no key (zero gradients).
    q2 = randn(rng, (2, 2, nk, d), dtype)
    k2, v2 = q[:, :, :nq], v[:, :, :nq]
    check(q2, k2, v2, dtype, f"{(q_tile, k_tile)} Nq > Nk", rng, causal=True)
