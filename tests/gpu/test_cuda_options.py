"""Attention options on GPU arrays (simulator or real GPU), against
numbattn.reference: key/query lengths, packed varlen sequences, bias, mask,
sliding windows, grouped-query attention, merging partial results.

Shapes are tiny but cross tile boundaries (small_tiles fixture in
conftest.py: 8-row query tiles, 8-key key tiles, 4x4 scores tiles, 8-wide
head and value chunks). Outputs are poisoned with NaN first, so a row the
kernels skip fails.
"""

import numpy as np
import pytest

import numbattn
from numbattn import _sequences, reference
from tests.helpers import DTYPES, assert_close, device_transpose, poisoned, randn

cuda = pytest.importorskip("numba.cuda")


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host(x):
    return x.copy_to_host()


def check_attention(dtype, q, k, v, what="", **options):
    """numbattn.attention (out= and lse= poisoned) against the reference."""
    lead, nq, dv = q.shape[:-2], q.shape[-2], v.shape[-1]
    out, lse = dev(poisoned(lead + (nq, dv), dtype)), dev(poisoned(lead + (nq,), dtype))
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in options.items()}
    res = numbattn.attention(dev(q), dev(k), dev(v), out=out, lse=lse, **dev_opts)
    assert res is out
    ro, rl = reference.attention(q, k, v, **options)
    assert_close(host(out), ro, dtype, f"{what} out")
    assert_close(host(lse), rl, dtype, f"{what} lse")
    return host(out), host(lse)


def no_visible_key(ro_lse):
    return np.isneginf(ro_lse)


# ------------------------------------------------------------ key/query lengths


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(dtype, causal):
    """Per-batch key/query lengths (0, 1, partial, full); padding is never read."""
    rng = np.random.default_rng(10 + causal)
    b, h, nq, nk, d, dv = 3, 2, 11, 13, 5, 7
    q, k, v = (randn(rng, (b, h, n, e), dtype) for n, e in ((nq, d), (nk, d), (nk, dv)))
    for kl, ql in (([13, 0, 1], None), ([6, 13, 1], [11, 1, 0]), (None, [4, 9, 11])):
        kl = None if kl is None else np.array(kl)
        ql = None if ql is None else np.array(ql)
        # Padding rows of k, v (and q) hold NaN: the kernels must not read them.
        qn, kn, vn = q.copy(), k.copy(), v.copy()
        for i in range(b):
            if kl is not None:
                kn[i, :, kl[i] :] = np.nan
                vn[i, :, kl[i] :] = np.nan
            if ql is not None:
                qn[i, :, ql[i] :] = np.nan
        out, lse = dev(poisoned((b, h, nq, dv), dtype)), dev(poisoned((b, h, nq), dtype))
        numbattn.attention(
            dev(qn), dev(kn), dev(vn), causal=causal, key_lengths=kl, query_lengths=ql,
            out=out, lse=lse, scale=0.6,
        )  # fmt: skip
        ro, rl = reference.attention(
            q, k, v, causal=causal, key_lengths=kl, query_lengths=ql, scale=0.6
        )
        assert_close(host(out), ro, dtype, f"lengths {kl} {ql} out")
        assert_close(host(lse), rl, dtype, f"lengths {kl} {ql} lse")
        empty = no_visible_key(rl)
        assert np.all(host(out)[empty] == 0) and np.all(host(lse)[empty] == -np.inf)


# ---------------------------------------------------------------------- varlen

CU_Q = np.array([0, 5, 5, 14, 15])  # lengths 5, 0, 9, 1
CU_K = np.array([0, 7, 10, 10, 22])  # lengths 7, 3, 0, 12

VARLEN_CASES = [
    # dtype, d, dv, options (bias/mask: True = generate)
    (np.float32, 6, 5, dict()),
    (np.float64, 6, 5, dict(causal=True)),
    (np.float32, 12, 10, dict(window=(2, 1))),  # d and dv chunked
    (np.float64, 5, 4, dict(causal=True, window=(3, -1), bias=True, mask=True)),
    (np.float32, 4, 3, dict(window=(-1, 0), bias=True)),
]


@pytest.mark.parametrize("dtype,d,dv,opts", VARLEN_CASES)
def test_varlen(dtype, d, dv, opts):
    """Packed sequences of unequal lengths (one with no queries, one with no
    keys), GQA (4 query heads, 2 key heads), per-sequence causal/window."""
    rng = np.random.default_rng(d * 10 + dv)
    h, hk = 4, 2
    tq, tk = int(CU_Q[-1]), int(CU_K[-1])
    q, k, v = randn(rng, (tq, h, d), dtype), randn(rng, (tk, hk, d), dtype), None
    v = randn(rng, (tk, hk, dv), dtype)
    opts = dict(opts)
    if opts.get("bias"):
        bias = randn(rng, (tq, tk), dtype)
        bias[rng.random((tq, tk)) < 0.1] = -np.inf
        bias[3] = -np.inf  # a fully masked row
        opts["bias"] = bias
    if opts.get("mask"):
        mask = rng.random((h, tq, tk)) > 0.25
        mask[1, 7] = False
        opts["mask"] = mask
    out, lse = dev(poisoned((tq, h, dv), dtype)), dev(poisoned((tq, h), dtype))
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in opts.items()}
    res = numbattn.varlen_attention(
        dev(q), dev(k), dev(v), CU_Q, CU_K, scale=0.8, out=out, lse=lse, **dev_opts
    )
    assert res is out
    kk, vv = (np.repeat(x, h // hk, axis=1) for x in (k, v))
    ro, rl = reference.varlen_attention(q, kk, vv, CU_Q, CU_K, scale=0.8, **opts)
    assert_close(host(out), ro, dtype, "varlen out")
    assert_close(host(lse), rl, dtype, "varlen lse")
    assert np.all(host(out)[np.isneginf(rl)] == 0)


# ----------------------------------------------------------------- bias, mask


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_and_mask(dtype):
    rng = np.random.default_rng(20)
    b, h, nq, nk, d = 2, 2, 9, 10, 4
    q, k, v = (randn(rng, (b, h, n, d), dtype) for n in (nq, nk, nk))
    bias = randn(rng, (nq, nk), dtype, scale=2.0)
    bias[rng.random((nq, nk)) < 0.2] = -np.inf
    bias[2] = -np.inf  # fully masked row
    mask = rng.random((h, 1, nk)) > 0.3  # broadcast over rows
    mask[1, 0, :] = False  # head 1: every row fully masked
    mask_rows = rng.random((nq, 1)) > 0.2  # broadcast over keys: some masked rows
    check_attention(dtype, q, k, v, "bias", bias=bias)
    check_attention(dtype, q, k, v, "bias causal", bias=bias[-nq:], causal=True)
    o, l_ = check_attention(dtype, q, k, v, "mask", mask=mask)
    assert np.all(o[:, 1] == 0) and np.all(l_[:, 1] == -np.inf)
    check_attention(dtype, q, k, v, "mask rows", mask=mask_rows, window=(3, 2))
    check_attention(
        dtype, q, k, v, "bias+mask+lengths", bias=bias, mask=mask[:1],
        key_lengths=np.array([7, 10]), query_lengths=np.array([9, 4]), causal=True,
    )  # fmt: skip
    # A full (B, H, Nq, Nk) bias with its own strides (non-contiguous view).
    full = randn(rng, (b, nk, h, nq), dtype).transpose(0, 2, 3, 1)
    out = dev(poisoned((b, h, nq, d), dtype))
    numbattn.attention(
        dev(q), dev(k), dev(v), bias=device_transpose(dev(full.transpose(0, 3, 1, 2)), (0, 2, 3, 1)),
        out=out,
    )  # fmt: skip
    assert_close(host(out), reference.attention(q, k, v, bias=full)[0], dtype, "strided bias")


# -------------------------------------------------------------------- windows

WINDOW_CASES = [
    # nq, nk, window, causal
    (9, 14, (0, 0), False),
    (9, 14, (2, 0), False),
    (14, 9, (0, 3), False),
    (14, 9, (4, -1), False),
    (9, 14, (-1, 2), False),
    (17, 17, (3, 5), True),
    (14, 9, (1, -1), True),
    (9, 20, (2, 2), True),
]


@pytest.mark.parametrize("nq,nk,window,causal", WINDOW_CASES)
def test_window(nq, nk, window, causal):
    dtype = DTYPES[(nq + nk + window[0]) % 2]
    rng = np.random.default_rng(nq * 7 + nk)
    q, k, v = (randn(rng, (1, 2, n, 6), dtype) for n in (nq, nk, nk))
    check_attention(dtype, q, k, v, f"window {window}", window=window, causal=causal)
    # Windows align bottom-right per sequence, with its own lengths.
    kl = np.array([max(1, nk - 5)])
    ql = np.array([nq - 2])
    check_attention(
        dtype, q[:1], k[:1], v[:1], f"window {window} lengths", window=window, causal=causal,
        key_lengths=kl, query_lengths=ql,
    )  # fmt: skip


# ------------------------------------------------------------------------- GQA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk", [2, 1])
def test_gqa(dtype, hk):
    rng = np.random.default_rng(30 + hk)
    b, h, nq, nk, d = 2, 4, 9, 11, 5
    q = randn(rng, (b, h, nq, d), dtype)
    k, v = randn(rng, (b, hk, nk, d), dtype), randn(rng, (b, hk, nk, 6), dtype)
    check_attention(dtype, q, k, v, "gqa", causal=True, key_lengths=np.array([11, 5]))
    # (B, N, H, d) buffers viewed as (B, H, N, d).
    qb, kb, vb = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
    out_buf = dev(poisoned((b, nq, h, 6), dtype))
    numbattn.attention(
        device_transpose(dev(qb), (0, 2, 1, 3)), device_transpose(dev(kb), (0, 2, 1, 3)),
        device_transpose(dev(vb), (0, 2, 1, 3)), out=device_transpose(out_buf, (0, 2, 1, 3)), window=(2, 1),
    )  # fmt: skip
    ref = reference.attention(q, k, v, window=(2, 1))[0]
    assert_close(host(out_buf).transpose(0, 2, 1, 3), ref, dtype, "gqa strided")


# ---------------------------------------------------------------------- scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_options(dtype):
    rng = np.random.default_rng(40)
    b, h, nq, nk, d = 2, 2, 6, 9, 5
    q, k = randn(rng, (b, h, nq, d), dtype), randn(rng, (b, 1, nk, d), dtype)
    bias = randn(rng, (nq, nk), dtype)
    bias[1, 3] = -np.inf
    mask = rng.random((h, nq, nk)) > 0.3
    opts = dict(
        key_lengths=np.array([9, 4]), query_lengths=np.array([5, 6]), bias=bias, mask=mask,
        window=(3, 1), causal=True,
    )  # fmt: skip
    for what, o in (("all", opts), ("lengths", dict(key_lengths=np.array([0, 7])))):
        out = dev(poisoned((b, h, nq, nk), dtype))
        dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in o.items()}
        assert numbattn.scores(dev(q), dev(k), scale=0.9, out=out, **dev_opts) is out
        assert_close(host(out), reference.scores(q, k, scale=0.9, **o), dtype, what)


# ----------------------------------------------------------------------- merge


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge(dtype):
    """Partial results over disjoint key sets merge into attention over the union."""
    rng = np.random.default_rng(50)
    b, h, nq, nk, d = 1, 2, 9, 14, 4
    q, k, v = (randn(rng, (b, h, n, d), dtype) for n in (nq, nk, nk))
    mask = rng.random((nq, nk)) > 0.3
    mask[4] = False  # a row with no key anywhere
    mask[6, 9:] = False  # a row with no key in the last part
    splits = [(0, 5), (5, 9), (9, 14)]
    parts = []
    for lo, hi in splits:
        o, l_ = dev(poisoned((b, h, nq, d), dtype)), dev(poisoned((b, h, nq), dtype))
        numbattn.attention(
            dev(q), dev(k[:, :, lo:hi]), dev(v[:, :, lo:hi]), mask=dev(mask[:, lo:hi]),
            out=o, lse=l_,
        )  # fmt: skip
        parts.append((o, l_))
    full_o, full_l = reference.attention(q, k, v, mask=mask)
    for n in (2, 3):
        os_, ls_ = [p[0] for p in parts[:n]], [p[1] for p in parts[:n]]
        out, lse = dev(poisoned((b, h, nq, d), dtype)), dev(poisoned((b, h, nq), dtype))
        assert numbattn.merge_attention(os_, ls_, out=out, lse=lse) is out
        ro, rl = reference.merge_attention([host(x) for x in os_], [host(x) for x in ls_])
        assert_close(host(out), ro, dtype, f"merge {n}")
        assert_close(host(lse), rl, dtype, f"merge {n} lse")
        if n == 3:
            assert_close(host(out), full_o, dtype, "merge = union")
            assert_close(host(lse), full_l, dtype, "merge = union lse")
            assert np.all(host(out)[:, :, 4] == 0) and np.all(host(lse)[:, :, 4] == -np.inf)
    # In place (the API accumulates pairwise into out/lse): backend level.
    from numbattn.cuda import backend

    o0, l0 = host(parts[0][0]), host(parts[0][1])
    acc_o, acc_l = parts[0]
    for o, l_ in parts[1:]:
        backend.merge(acc_o, acc_l, o, l_, acc_o, acc_l)
    assert_close(host(acc_o), full_o, dtype, "merge in place")
    assert_close(host(acc_l), full_l, dtype, "merge in place lse")
    # A single partial: merged with an empty part, a copy.
    lse1 = dev(poisoned((b, h, nq), dtype))
    one = numbattn.merge_attention([dev(o0)], [dev(l0)], lse=lse1)
    assert_close(host(one), o0, dtype, "merge one")
    assert_close(host(lse1), l0, dtype, "merge one lse")


def test_merge_nan_and_empty_rows():
    dtype = np.float32
    rng = np.random.default_rng(51)
    o1, o2 = randn(rng, (2, 1, 5, 3), dtype), randn(rng, (2, 1, 5, 3), dtype)
    l1, l2 = randn(rng, (2, 1, 5), dtype), randn(rng, (2, 1, 5), dtype)
    l1[0, 0, 1] = np.nan  # NaN lse poisons its row only
    o2[1, 0, 2, 1] = np.nan  # NaN output poisons its row only
    l1[1, 0, 3] = l2[1, 0, 3] = -np.inf  # no key in either part
    o1[1, 0, 3] = o2[1, 0, 3] = 0
    l2[0, 0, 4] = -np.inf  # second part empty for this row
    o2[0, 0, 4] = 0
    lse = dev(poisoned(l1.shape, dtype))
    out = numbattn.merge_attention([dev(o1), dev(o2)], [dev(l1), dev(l2)], lse=lse)
    ro, rl = reference.merge_attention([o1, o2], [l1, l2])
    assert np.isnan(host(out)[0, 0, 1]).all() and np.isnan(host(lse)[0, 0, 1])
    assert np.isnan(host(out)[1, 0, 2, 1])
    with np.errstate(invalid="ignore"):
        assert_close(host(out), ro, dtype, "merge nan")
        assert_close(host(lse), rl, dtype, "merge nan lse")
    assert np.all(host(out)[1, 0, 3] == 0) and host(lse)[1, 0, 3] == -np.inf


# ---------------------------------------------------------- sequence table


def test_sequence_table_upload_and_cache(monkeypatch):
    """Only distinct rows are uploaded; small tables are cached per stream."""
    from numbattn.cuda import backend

    monkeypatch.setattr(backend, "_tables", {})
    dense = _sequences.broadcast(_sequences.dense_table(7, 9), (3, 4), axis0=False)
    t1 = backend._seq_table(dense, 0)
    assert t1.shape == (3, 4, 6) and t1.strides[:2] == (0, 0)
    assert np.array_equal(host(t1), np.broadcast_to([0, 7, 7, 0, 9, 2], (3, 4, 6)))
    again = _sequences.broadcast(_sequences.dense_table(7, 9), (3, 4), axis0=False)
    assert backend._seq_table(again, 0) is t1  # same bytes: cached
    stream = cuda.stream()
    assert backend._seq_table(dense, stream) is not t1  # other stream: own upload
    rows = np.arange(18, dtype=np.int64).reshape(3, 1, 6)
    per_batch = _sequences.broadcast(rows[:, 0], (3, 4), axis0=True)
    t2 = backend._seq_table(per_batch, 0)
    assert t2.strides[1] == 0 and np.array_equal(host(t2), np.broadcast_to(rows, (3, 4, 6)))
    full = np.arange(72, dtype=np.int64).reshape(3, 4, 6)[:, ::-1]  # distinct, strided
    assert np.array_equal(host(backend._seq_table(full, 0)), full)
    assert len(backend._tables) == 4
    monkeypatch.setattr(backend, "_TABLE_CACHE_BYTES", 8)
    assert np.array_equal(host(backend._seq_table(full + 1, 0)), full + 1)
    assert len(backend._tables) == 4  # too large to cache
    # Dense calls through the API reuse one cached table.
    q = dev(np.ones((1, 1, 3, 2), np.float32))
    numbattn.attention(q, q, q)
    n = len(backend._tables)
    numbattn.attention(q, q, q)
    assert len(backend._tables) == n
