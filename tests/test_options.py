"""Attention options on the CPU through the public API, against numbattn.reference.

Lengths (key_lengths / query_lengths), packed varlen sequences, bias, mask,
sliding windows, grouped-query attention and merging of partial results,
alone and combined. Outputs are NaN-poisoned, so an element a kernel skips
fails; every test runs with both dtypes, and most with tiny tiles too.
"""

import itertools

import numpy as np
import pytest

import numbattn
from numbattn import reference

from .helpers import DTYPES, assert_close, poisoned, randn

B, H = 3, 2


def run_attention(q, k, v, dtype, **kw):
    out = poisoned(q.shape[:-1] + (v.shape[-1],), dtype)
    lse = poisoned(q.shape[:-1], dtype)
    got = numbattn.attention(q, k, v, out=out, lse=lse, **kw)
    assert got is out
    return out, lse


def check_all(q, k, v, dtype, what, **kw):
    """attention (with and without lse) and scores against the reference."""
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    out, lse = run_attention(q, k, v, dtype, **kw)
    assert_close(out, ref_out, dtype, f"{what} out")
    assert_close(lse, ref_lse, dtype, f"{what} lse")
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert_close(numbattn.attention(q, k, v, **kw), ref_out, dtype, f"{what} out, no lse")
    s = poisoned(q.shape[:-1] + (k.shape[-2],), dtype)
    assert numbattn.scores(q, k, out=s, **kw) is s
    assert_close(s, reference.scores(q, k, **kw), dtype, f"{what} scores")


def _options(rng, case, nq, nk, dtype):
    """Keyword arguments for one named option case on (B, H, nq, nk)."""
    kw = {}
    if "klen" in case:
        kw["key_lengths"] = np.array([0, 1, nk])
    if "qlen" in case:
        kw["query_lengths"] = np.array([nq, 0, 1])
        kw["key_lengths"] = np.array([nk - 2, 5, 0])
    if "bias" in case:  # (Nq, Nk), broadcast; some -inf entries, one all -inf row
        bias = randn(rng, (nq, nk), dtype)
        bias[rng.random((nq, nk)) < 0.2] = -np.inf
        bias[1, :] = -np.inf
        kw["bias"] = bias
    if "keymask" in case:  # (B, 1, 1, Nk); batch element 1 sees nothing
        mask = rng.random((B, 1, 1, nk)) < 0.7
        mask[1] = False
        kw["mask"] = mask
    if "mask" in case and "keymask" not in case:  # (Nq, Nk) with fully masked rows
        mask = rng.random((nq, nk)) < 0.6
        mask[0, :] = False
        mask[-1, :] = False
        kw["mask"] = mask
    for name, window in (("w32", (3, 2)), ("w00", (0, 0)), ("w4_", (4, -1)), ("w_3", (-1, 3))):
        if name in case:
            kw["window"] = window
    if "causal" in case:
        kw["causal"] = True
    return kw


CASES = [
    "klen",
    "qlen",
    "qlen-causal",
    "bias",
    "keymask",
    "mask",
    "w32",
    "w00",
    "w4_",
    "w_3",
    "w32-causal",
    "w4_-causal",
    "qlen-bias-mask-w32-causal",
    "klen-keymask-bias-w_3",
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq, nk", [(13, 17), (19, 11)], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_options_match_reference(rng, tiles, dtype, nq, nk, case):
    d, dv = 8, 6
    q = randn(rng, (B, H, nq, d), dtype)
    k = randn(rng, (B, H, nk, d), dtype)
    v = randn(rng, (B, H, nk, dv), dtype)
    kw = _options(rng, case, nq, nk, dtype)
    check_all(q, k, v, dtype, case, scale=0.4, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lengths_zero_one_full_larger(rng, dtype):
    """Default tiles, more than one query and key tile, lengths 0, 1, full."""
    nq, nk = 150, 300
    q = randn(rng, (4, H, nq, 16), dtype)
    k = randn(rng, (4, H, nk, 16), dtype)
    v = randn(rng, (4, H, nk, 16), dtype)
    for causal in (False, True):
        kw = dict(
            causal=causal,
            key_lengths=np.array([0, 1, nk, 200]),
            query_lengths=np.array([nq, 1, 0, 129]),
        )
        check_all(q, k, v, dtype, f"causal={causal}", **kw)
    check_all(q, k, v, dtype, "window", window=(70, 5), key_lengths=np.array([0, 1, nk, 200]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk", [2, 1])
@pytest.mark.parametrize("layout", ["contiguous", "swapped"])
def test_grouped_query(rng, tiles, dtype, hk, layout):
    hq, nq, nk, d, dv = 4, 11, 14, 8, 5
    if layout == "contiguous":
        q = randn(rng, (B, hq, nq, d), dtype)
        k = randn(rng, (B, hk, nk, d), dtype)
        v = randn(rng, (B, hk, nk, dv), dtype)
    else:  # (B, N, H, d) storage, v also strided along d
        q = randn(rng, (B, nq, hq, d), dtype).swapaxes(1, 2)
        k = randn(rng, (B, nk, hk, d), dtype).swapaxes(1, 2)
        v = randn(rng, (B, nk, hk, 2 * dv), dtype)[..., ::2].swapaxes(1, 2)
    check_all(q, k, v, dtype, "plain")
    check_all(q, k, v, dtype, "causal", causal=True)
    mask = rng.random((B, hq, nq, nk)) < 0.7
    check_all(
        q, k, v, dtype, "combined", window=(5, 1), key_lengths=np.array([nk, 3, 9]), mask=mask
    )


def _varlen_inputs(rng, dtype, q_lens, k_lens, h, hk, d=8, dv=6):
    cu_q = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum(k_lens)]).astype(np.int32)
    q = randn(rng, (int(cu_q[-1]), h, d), dtype)
    k = randn(rng, (int(cu_k[-1]), hk, d), dtype)
    v = randn(rng, (int(cu_k[-1]), hk, dv), dtype)
    return q, k, v, cu_q, cu_k


def run_varlen(q, k, v, cu_q, cu_k, dtype, **kw):
    out = poisoned(q.shape[:2] + (v.shape[-1],), dtype)
    lse = poisoned(q.shape[:2], dtype)
    got = numbattn.varlen_attention(q, k, v, cu_q, cu_k, out=out, lse=lse, **kw)
    assert got is out
    return out, lse


# Unequal sequences, incl. an empty one and ones with no keys or one query.
Q_LENS = [5, 0, 9, 1, 13, 4]
K_LENS = [7, 3, 9, 1, 13, 0]


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
    ref_out, ref_lse = reference.varlen_attention(q, k, v, cu_q, cu_k, **kw)
    out, lse = run_varlen(q, k, v, cu_q, cu_k, dtype, **kw)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    got = numbattn.varlen_attention(q, k, v, cu_q, cu_k, **kw)
    assert_close(got, ref_out, dtype, "out, no lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_window_gqa(rng, tiles, dtype):
    q, k, v, cu_q, cu_k = _varlen_inputs(rng, dtype, Q_LENS, K_LENS, 4, 2)
    for kw in ({"window": (3, 0)}, {"window": (-1, 2), "causal": True}, {"window": (4, 4)}):
        ref_out, ref_lse = reference.varlen_attention(q, k, v, cu_q, cu_k, **kw)
        out, lse = run_varlen(q, k, v, cu_q, cu_k, dtype, **kw)
        assert_close(out, ref_out, dtype, f"{kw} out")
        assert_close(lse, ref_lse, dtype, f"{kw} lse")
    # Strided packed inputs and outputs: (T, H, d) with H and d interleaved.
    qs = np.ascontiguousarray(q.swapaxes(1, 2)).swapaxes(1, 2)
    out = poisoned((q.shape[0], v.shape[-1], 4), dtype).swapaxes(1, 2)
    lse = poisoned((4, q.shape[0]), dtype).T
    numbattn.varlen_attention(qs, k, v, cu_q, cu_k, window=(2, 3), out=out, lse=lse)
    ref_out, ref_lse = reference.varlen_attention(q, k, v, cu_q, cu_k, window=(2, 3))
    assert_close(out, ref_out, dtype, "strided out")
    assert_close(lse, ref_lse, dtype, "strided lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_padded_equals_varlen(rng, tiles, dtype, causal):
    """attention with key/query lengths on a padded batch == varlen on the packed one."""
    q_lens, k_lens = [5, 0, 9, 13, 2], [7, 3, 9, 13, 0]
    q, k, v, cu_q, cu_k = _varlen_inputs(rng, dtype, q_lens, k_lens, 4, 2)
    nb, nq, nk = len(q_lens), max(q_lens), max(k_lens)
    pq = np.zeros((nb, 4, nq, q.shape[-1]), dtype)
    pk = np.zeros((nb, 2, nk, k.shape[-1]), dtype)
    pv = np.zeros((nb, 2, nk, v.shape[-1]), dtype)
    for b in range(nb):
        pq[b, :, : q_lens[b]] = q[cu_q[b] : cu_q[b + 1]].swapaxes(0, 1)
        pk[b, :, : k_lens[b]] = k[cu_k[b] : cu_k[b + 1]].swapaxes(0, 1)
        pv[b, :, : k_lens[b]] = v[cu_k[b] : cu_k[b + 1]].swapaxes(0, 1)
    kw = dict(causal=causal, window=(4, -1))
    out, lse = run_varlen(q, k, v, cu_q, cu_k, dtype, **kw)
    pout, plse = run_attention(
        pq, pk, pv, dtype, key_lengths=np.array(k_lens), query_lengths=np.array(q_lens), **kw
    )
    for b in range(nb):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        assert_close(out[rows], pout[b, :, : q_lens[b]].swapaxes(0, 1), dtype, "out")
        assert_close(lse[rows], plse[b, :, : q_lens[b]].swapaxes(0, 1), dtype, "lse")
        assert not pout[b, :, q_lens[b] :].any()
        assert np.all(plse[b, :, q_lens[b] :] == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_one_partial_is_a_copy(rng, dtype):
    o = randn(rng, (2, 3, 7, 5), dtype)
    lse = randn(rng, (2, 3, 7), dtype)
    lse[0, 1, 2] = -np.inf
    o[0, 1, 2] = 0
    lse[1, 2, 3] = np.nan
    out, got_lse = poisoned(o.shape, dtype), poisoned(lse.shape, dtype)
    assert numbattn.merge_attention([o], [lse], out=out, lse=got_lse) is out
    np.testing.assert_array_equal(out[~np.isnan(lse)], o[~np.isnan(lse)])
    np.testing.assert_array_equal(got_lse, lse)
    assert np.isnan(out[1, 2, 3]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("split", ["slices", "masks-causal"])
def test_merge_equals_attention_over_union(rng, tiles, dtype, parts, split):
    nq, nk, d, dv = 9, 14, 8, 6
    q = randn(rng, (2, 3, nq, d), dtype)
    k = randn(rng, (2, 3, nk, d), dtype)
    v = randn(rng, (2, 3, nk, dv), dtype)
    outs, lses = [], []
    if split == "slices":
        kw = {}
        edges = [0, 4, 11, nk] if parts == 3 else [0, 6, nk]
        for lo, hi in itertools.pairwise(edges):
            lse = np.empty(q.shape[:-1], dtype)
            o = numbattn.attention(q, k[..., lo:hi, :], v[..., lo:hi, :], lse=lse)
            outs.append(o)
            lses.append(lse)
    else:  # random key sets; with causal some rows see nothing in some parts
        kw = {"causal": True}
        owner = rng.integers(0, parts, nk)
        owner[:6] = 0  # query row 0 sees keys 0..5 only: no key in the other parts
        for p in range(parts):
            lse = np.empty(q.shape[:-1], dtype)
            o = numbattn.attention(q, k, v, causal=True, mask=owner == p, lse=lse)
            outs.append(o)
            lses.append(lse)
        assert np.isneginf(np.stack(lses)).any()
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    out, lse = poisoned(ref_out.shape, dtype), poisoned(ref_lse.shape, dtype)
    assert numbattn.merge_attention(outs, lses, out=out, lse=lse) is out
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    m_out, m_lse = reference.merge_attention(outs, lses)
    assert_close(out, m_out, dtype, "out vs reference merge")
    assert_close(lse, m_lse, dtype, "lse vs reference merge")
    assert_close(numbattn.merge_attention(outs, lses), ref_out, dtype, "allocated out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_empty_rows_and_nan(rng, dtype):
    o1, o2 = randn(rng, (1, 2, 5, 3), dtype), randn(rng, (1, 2, 5, 3), dtype)
    l1, l2 = randn(rng, (1, 2, 5), dtype), randn(rng, (1, 2, 5), dtype)
    l1[0, 0, 0] = l2[0, 0, 0] = -np.inf  # no key anywhere: zeros, -inf
    o1[0, 0, 0] = o2[0, 0, 0] = 0
    l1[0, 1, 1] = -np.inf  # only part 2
    o1[0, 1, 1] = 0
    l2[0, 1, 2] = np.nan  # NaN stays in its row
    out, lse = poisoned(o1.shape, dtype), poisoned(l1.shape, dtype)
    numbattn.merge_attention([o1, o2], [l1, l2], out=out, lse=lse)
    ref_out, ref_lse = reference.merge_attention([o1, o2], [l1, l2])
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, dtype, "lse")
    np.testing.assert_array_equal(out[0, 0, 0], 0)
    assert lse[0, 0, 0] == -np.inf
    assert np.isnan(out[0, 1, 2]).all() and np.isnan(lse[0, 1, 2])
