"""Few queries over many keys (issue 11): split-K, the streaming kernel and
paged KV caches on the CPU, against numbattn.reference.

Every num_splits from 1 to more than the number of key tiles (the streaming
key tile is patched small), key lengths 0 and 1, keys not a multiple of the
split size, causal with Nq > 1, windows, bias, masks, GQA groups 1 / 4 / 8,
paged caches with shuffled block tables; outputs NaN-poisoned first.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cpu import backend as cpu_backend

from .helpers import assert_close, poisoned, randn

F32 = np.float32
F64 = np.float64


@pytest.fixture
def tiny_stream(monkeypatch):
    """Streaming key tile of 5 keys: a 37-key sequence has 8 tiles."""
    monkeypatch.setattr(numbattn.config, "CPU_STREAM_KEY_TILE", 5)
    return 5


def _qkv(rng, b, h, hk, nq, nk, d, dtype, dv=None):
    dv = d if dv is None else dv
    return (
        randn(rng, (b, h, nq, d), dtype),
        randn(rng, (b, hk, nk, d), dtype),
        randn(rng, (b, hk, nk, dv), dtype),
    )


def _run(fn, q, dv, dtype, *args, **kw):
    out = poisoned(q.shape[:-1] + (dv,), dtype)
    lse = poisoned(q.shape[:-1], dtype)
    assert fn(*args, out=out, lse=lse, **kw) is out
    return out, lse


def _check(q, k, v, dtype, what, **kw):
    splits = kw.pop("num_splits", None)
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    out, lse = _run(numbattn.attention, q, v.shape[-1], dtype, q, k, v, num_splits=splits, **kw)
    assert_close(out, ref_out, dtype, f"{what} out")
    assert_close(lse, ref_lse, dtype, f"{what} lse")
    return out, lse


# 37 keys in tiles of 5: 8 tiles; 10 splits is more than the tiles (and some
# splits of the visible ranges are empty).
@pytest.mark.parametrize("splits", range(1, 11))
@pytest.mark.parametrize("group", [1, 4, 8])
def test_splits_gqa_lengths(rng, tiny_stream, splits, group):
    b, hk, nq, nk, d = 4, 2, 1, 37, 16
    q, k, v = _qkv(rng, b, hk * group, hk, nq, nk, d, F32, dv=12)
    lengths = np.array([0, 1, 23, nk])
    _check(q, k, v, F32, f"splits={splits}", num_splits=splits, key_lengths=lengths)


@pytest.mark.parametrize("splits", [1, 2, 3, 9])
@pytest.mark.parametrize(
    "case", ["causal", "window", "causal-window", "qlen", "bias", "mask", "bias-mask"]
)
def test_splits_options(rng, tiny_stream, splits, case):
    b, h, hk, nq, nk, d = 3, 4, 2, 6, 37, 8
    q, k, v = _qkv(rng, b, h, hk, nq, nk, d, F32)
    kw = {"key_lengths": np.array([nk, 17, 1])}
    if "causal" in case:
        kw["causal"] = True
    if "window" in case:
        kw["window"] = (7, 2)
    if case == "qlen":
        kw["query_lengths"] = np.array([nq, 0, 3])
        kw["key_lengths"] = np.array([nk, 5, 0])
        kw["causal"] = True
    if "bias" in case:
        bias = randn(rng, (b, 1, nq, nk), F32)
        bias[rng.random(bias.shape) < 0.2] = -np.inf
        bias[0, 0, 1, :] = -np.inf  # a row with no visible key
        kw["bias"] = bias
    if "mask" in case:
        kw["mask"] = rng.random((nq, nk)) < 0.6
    _check(q, k, v, F32, case, num_splits=splits, **kw)


@pytest.mark.parametrize("splits", [1, 4])
def test_float64_and_causal_prefix(rng, tiny_stream, splits):
    # Nq > Nk with causal: the first rows see no key.
    q, k, v = _qkv(rng, 2, 8, 2, 5, 3, 8, F64)
    _check(q, k, v, F64, "causal Nq > Nk", num_splits=splits, causal=True)
    q, k, v = _qkv(rng, 2, 4, 4, 2, 41, 8, F64)
    _check(q, k, v, F64, "float64", num_splits=splits, window=(3, 0))


def test_deterministic_and_split_invariant(rng, tiny_stream):
    q, k, v = _qkv(rng, 1, 4, 1, 1, 200, 16, F32)
    first = numbattn.attention(q, k, v, num_splits=7)
    for _ in range(3):
        np.testing.assert_array_equal(numbattn.attention(q, k, v, num_splits=7), first)
    ref, _ = reference.attention(q, k, v)
    for n in (1, 2, 5, 7, 40, 10**9):
        assert_close(numbattn.attention(q, k, v, num_splits=n), ref, F32, f"n={n}")


def test_masked_values_never_read(rng, tiny_stream):
    """NaN / inf values past the lengths or under a mask do not reach a row."""
    q, k, v = _qkv(rng, 2, 2, 2, 3, 30, 8, F32)
    v[0, :, 20:] = np.nan
    k[0, :, 20:] = np.inf
    v[1, :, 4] = np.inf
    mask = np.ones((3, 30), bool)
    mask[:, 4] = False
    for splits in (1, 3):
        _check(
            q, k, v, F32, "masked NaN", num_splits=splits, key_lengths=np.array([20, 30]),
            mask=mask,
        )  # fmt: skip


def test_strided_inputs_and_outputs(rng, tiny_stream):
    """(B, N, H, d) inputs viewed as (B, H, N, d), a non-unit last stride, and
    out / lse buffers that are strided views."""
    b, h, hk, nq, nk, d = 2, 4, 2, 2, 23, 8
    qn = randn(rng, (b, nq, h, d), F32)
    kn = randn(rng, (b, nk, hk, 2 * d), F32)[..., ::2]  # last-axis stride 2
    vn = randn(rng, (b, nk, hk, d), F32)
    q, k, v = (x.swapaxes(1, 2) for x in (qn, kn, vn))
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    for splits in (1, 3):
        out_store = poisoned((b, nq, h, d), F32)
        lse_store = poisoned((b, nq, h), F32)
        out, lse = out_store.swapaxes(1, 2), lse_store.swapaxes(1, 2)
        numbattn.attention(q, k, v, causal=True, num_splits=splits, out=out, lse=lse)
        assert_close(out, ref_out, F32, "strided out")
        assert_close(lse, ref_lse, F32, "strided lse")


@pytest.mark.parametrize("splits", [None, 1, 4])
def test_varlen_splits(rng, tiny_stream, splits):
    cu_q = np.array([0, 1, 1, 4, 6])
    cu_k = np.array([0, 30, 31, 31, 60])
    h, hk, d = 4, 1, 8
    q = randn(rng, (6, h, d), F32)
    k = randn(rng, (60, hk, d), F32)
    v = randn(rng, (60, hk, d), F32)
    ref_out, ref_lse = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    out, lse = _run(
        numbattn.varlen_attention, q, d, F32, q, k, v, cu_q, cu_k, causal=True, num_splits=splits
    )
    assert_close(out, ref_out, F32, "varlen out")
    assert_close(lse, ref_lse, F32, "varlen lse")


@pytest.mark.parametrize("splits", [3, 4])
def test_many_rows_parallel_merge(rng, tiny_stream, splits):
    """More partials than the kernel merges on one thread (rows x splits x dv
    above numbattn.cpu.kernels._SERIAL_MERGE): the merge's parallel loop,
    with causal Nq > 1, key lengths 0 and 1, GQA."""
    from numbattn.cpu.kernels import _SERIAL_MERGE

    q, k, v = _qkv(rng, 8, 16, 4, 16, 40, 16, F32)
    assert 8 * 16 * 16 * splits * 16 > _SERIAL_MERGE
    lens = np.array([40, 0, 1, 7, 40, 33, 12, 5])
    _check(q, k, v, F32, "parallel merge", num_splits=splits, causal=True, key_lengths=lens)


def test_default_splits_heuristic(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_threads", lambda: 2)
    # One sequence, one key head, one query over many keys: split.
    assert cpu_backend.default_splits(1, 8, 8, 1, 32768) > 1
    # Enough work items (or a multiple of the threads): no split.
    assert cpu_backend.default_splits(1, 8, 1, 1, 32768) == 1
    assert cpu_backend.default_splits(4, 8, 1, 1, 8192) == 1
    # Short keys: chunks would be shorter than CPU_MIN_SPLIT_KEYS.
    assert cpu_backend.default_splits(1, 1, 1, 1, 100) == 1
    # Many queries: the tiled kernel, never split.
    assert cpu_backend.default_splits(1, 1, 1, 1000, 32768) == 1
    # A paged cache: threads read whole rows (all key heads), so the key
    # heads do not count; one sequence is split over the two threads.
    assert cpu_backend.default_splits(1, 8, 1, 1, 32768, paged=True) == 2
    assert cpu_backend.default_splits(4, 8, 1, 1, 8192, paged=True) == 1
    assert cpu_backend.default_splits(1, 8, 1, 1, 100, paged=True) == 1


# --- paged KV cache ------------------------------------------------------------


def _paged(rng, lengths, block_size, hk, d, dtype, extra_blocks=3):
    """A shuffled paged cache holding sequences of ``lengths``; unused table
    entries hold garbage (never read)."""
    b = len(lengths)
    max_blocks = max(1, max(-(-n // block_size) for n in lengths))
    need = sum(-(-n // block_size) for n in lengths)
    num_blocks = need + extra_blocks
    k_cache = randn(rng, (num_blocks, block_size, hk, d), dtype)
    v_cache = randn(rng, (num_blocks, block_size, hk, d), dtype)
    perm = rng.permutation(num_blocks)
    table = np.full((b, max_blocks + 1), -7, dtype=np.int32)  # garbage past the lengths
    used = 0
    for s, n in enumerate(lengths):
        nb = -(-n // block_size)
        table[s, :nb] = perm[used : used + nb]
        used += nb
    # Free blocks hold NaN: a read of an unused block would show.
    free = perm[used:]
    k_cache[free] = np.nan
    v_cache[free] = np.nan
    return k_cache, v_cache, table


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("splits", [1, 2, 5, 12])
@pytest.mark.parametrize("group", [1, 4])
def test_paged_matches_reference(rng, tiny_stream, block_size, splits, group):
    lengths = [0, 1, 29, 16, 45]
    hk, nq, d = 2, 1, 8
    k_cache, v_cache, table = _paged(rng, lengths, block_size, hk, d, F32)
    q = randn(rng, (len(lengths), hk * group, nq, d), F32)
    lens = np.array(lengths)
    ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens)
    out, lse = _run(
        numbattn.paged_attention, q, d, F32, q, k_cache, v_cache, table, lens, num_splits=splits
    )
    assert_close(out, ref_out, F32, "paged out")
    assert_close(lse, ref_lse, F32, "paged lse")


@pytest.mark.parametrize("case", ["causal", "window", "bias-mask", "qlen", "float64"])
def test_paged_options(rng, tiny_stream, case):
    dtype = F64 if case == "float64" else F32
    lengths = [33, 7, 1]
    b, h, hk, nq, d, bs = 3, 8, 2, 4, 8, 4
    k_cache, v_cache, table = _paged(rng, lengths, bs, hk, d, dtype)
    nk = table.shape[1] * bs
    q = randn(rng, (b, h, nq, d), dtype)
    kw = {}
    if case in ("causal", "float64"):
        kw["causal"] = True
    if case == "window":
        kw["window"] = (5, 1)
    if case == "bias-mask":
        kw["bias"] = randn(rng, (b, 1, nq, nk), dtype)
        kw["mask"] = rng.random((nq, nk)) < 0.7
    if case == "qlen":
        kw["query_lengths"] = np.array([4, 0, 1])
        kw["causal"] = True
    lens = np.array(lengths)
    ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens, **kw)
    for splits in (1, 3):
        out, lse = _run(
            numbattn.paged_attention, q, d, dtype, q, k_cache, v_cache, table, lens,
            num_splits=splits, **kw,
        )  # fmt: skip
        assert_close(out, ref_out, dtype, f"paged {case} out")
        assert_close(lse, ref_lse, dtype, f"paged {case} lse")


def test_paged_equals_dense(rng):
    """The same keys, contiguous or paged: the same result (1 split: same order)."""
    lengths = [40, 17]
    hk, d, bs = 2, 16, 8
    k_cache, v_cache, table = _paged(rng, lengths, bs, hk, d, F32, extra_blocks=0)
    nk = table.shape[1] * bs
    k = np.zeros((2, hk, nk, d), F32)
    v = np.zeros((2, hk, nk, d), F32)
    for s, n in enumerate(lengths):
        for p in range(n):
            k[s, :, p] = k_cache[table[s, p // bs], p % bs]
            v[s, :, p] = v_cache[table[s, p // bs], p % bs]
    q = randn(rng, (2, 4, 1, d), F32)
    lens = np.array(lengths)
    dense = numbattn.attention(q, k, v, key_lengths=lens, num_splits=3)
    paged = numbattn.paged_attention(q, k_cache, v_cache, table, lens, num_splits=3)
    assert_close(paged, dense, F32, "paged vs dense")


# --- bad input -------------------------------------------------------------------


def _paged_args(rng):
    k_cache, v_cache, table = _paged(rng, [9, 4], 4, 2, 8, F32)
    q = randn(rng, (2, 2, 1, 8), F32)
    return q, k_cache, v_cache, table, np.array([9, 4])


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: a.update(block_table=a["block_table"].astype(np.int64)), TypeError, "int32"),
        (
            lambda a: a.update(block_table=a["block_table"][:1]),
            ValueError,
            "block_table must have shape",
        ),
        (lambda a: a.update(block_table=a["block_table"][:, :1]), ValueError, "too few blocks"),
        (lambda a: a["block_table"].__setitem__((0, 2), 999), ValueError, r"block_table\[0, 2\]"),
        (lambda a: a["block_table"].__setitem__((1, 0), -1), ValueError, r"block_table\[1, 0\]"),
        (lambda a: a.update(key_lengths=np.array([9, -1])), ValueError, "key_lengths"),
        (lambda a: a.update(key_lengths=np.array([9.0, 4.0])), TypeError, "key_lengths"),
        (lambda a: a.update(key_lengths=np.array([9])), ValueError, "key_lengths"),
        (lambda a: a.update(key_lengths=None), TypeError, "key_lengths"),
        (lambda a: a.update(num_splits=0), ValueError, "num_splits"),
        (lambda a: a.update(num_splits=2.0), TypeError, "num_splits"),
        (lambda a: a.update(num_splits=True), TypeError, "num_splits"),
        (lambda a: a.update(k_cache=a["k_cache"][:, :, :1].copy()), ValueError, "v_cache"),
        (lambda a: a.update(q=a["q"][0]), ValueError, "q must have 4"),
    ],
)
def test_paged_bad_input_writes_nothing(rng, change, exc, match):
    q, k_cache, v_cache, table, lens = _paged_args(rng)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, key_lengths=lens)
    change(args)
    out = poisoned((2, 2, 1, 8), F32)
    with pytest.raises(exc, match=match):
        numbattn.paged_attention(**args, out=out)
    assert np.isnan(out).all()


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                      (True, TypeError), ("2", TypeError)])  # fmt: skip
def test_num_splits_bad(rng, bad, exc):
    q, k, v = _qkv(rng, 1, 2, 2, 1, 8, 4, F32)
    out = poisoned((1, 2, 1, 4), F32)
    with pytest.raises(exc, match="num_splits"):
        numbattn.attention(q, k, v, num_splits=bad, out=out)
    assert np.isnan(out).all()
    cu = np.array([0, 1])
    with pytest.raises(exc, match="num_splits"):
        numbattn.varlen_attention(q[0].swapaxes(0, 1), k[0].swapaxes(0, 1),
                                  v[0].swapaxes(0, 1), cu, np.array([0, 8]), num_splits=bad)  # fmt: skip


@pytest.mark.parametrize("splits", [1, 3])
def test_splits_with_diagonal(rng, tiny_stream, splits):
    """The ALIGN column (diagonal=) reaches the streaming kernel."""
    q, k, v = _qkv(rng, 2, 4, 2, 3, 29, 8, F32)
    for diagonal in (0, 5, np.array([-1, 30])):
        _check(q, k, v, F32, f"diagonal={diagonal}", num_splits=splits, causal=True,
               diagonal=diagonal, window=(4, 0))  # fmt: skip


@pytest.mark.parametrize("splits", [1, 2])
def test_lengths_along_the_heads_axis(rng, splits):
    """One leading axis, both batch (lengths) and heads (GQA): the table
    differs between the query heads of a key head."""
    q = randn(rng, (4, 2, 8), F32)
    k = randn(rng, (2, 9, 8), F32)
    v = randn(rng, (2, 9, 8), F32)
    kw = {"query_lengths": np.array([0, 2, 1, 2]), "key_lengths": np.array([9, 0, 4, 1])}
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    out, lse = _run(numbattn.attention, q, 8, F32, q, k, v, num_splits=splits, **kw)
    assert_close(out, ref_out, F32, "out")
    assert_close(lse, ref_lse, F32, "lse")


# --- the streaming kernel's register blocks ---------------------------------------


@pytest.fixture(params=[1, 4, 10**6], ids=["wide1", "wide4", "narrow"])
def wide_rows(request, monkeypatch):
    """CPU_STREAM_WIDE_ROWS: 1 (P @ V of every item through the 4 x 4 register
    block when its rows are a multiple of 4 and its value rows contiguous,
    else four value rows per pass), 4, or never (two value rows per pass)."""
    monkeypatch.setattr(numbattn.config, "CPU_STREAM_WIDE_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(
    "group, nq, causal", [(1, 1, False), (4, 1, False), (1, 3, True), (2, 6, True), (8, 2, False)]
)
def test_stream_register_blocks(rng, tiny_stream, wide_rows, splits, group, nq, causal):
    """Rows per key head (group x nq) of 1, 3, 4, 12 and 16, under each
    register block; 37 keys in tiles of 5 (odd blocks: the remainder loops)."""
    b, hk, nk, d = 4, 2, 37, 16
    q, k, v = _qkv(rng, b, hk * group, hk, nq, nk, d, F32, dv=12)
    lengths = np.array([0, 1, 23, nk])
    _check(q, k, v, F32, f"wide_rows={wide_rows}", num_splits=splits, causal=causal,
           key_lengths=lengths)  # fmt: skip


@pytest.mark.parametrize("layout", ["paged", "strided", "float64"])
def test_stream_register_blocks_layouts(rng, tiny_stream, wide_rows, layout):
    """Value rows that are not contiguous (a paged cache's interleaved heads),
    packed (last-axis stride 2), and float64."""
    group, nq, hk, d = 4, 2, 2, 8
    if layout == "paged":
        lengths = [33, 7, 1]
        k_cache, v_cache, table = _paged(rng, lengths, 4, hk, d, F32)
        q = randn(rng, (3, hk * group, nq, d), F32)
        lens = np.array(lengths)
        ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens)
        for splits in (1, 3):
            out, lse = _run(
                numbattn.paged_attention, q, d, F32, q, k_cache, v_cache, table, lens,
                num_splits=splits,
            )  # fmt: skip
            assert_close(out, ref_out, F32, "paged out")
            assert_close(lse, ref_lse, F32, "paged lse")
        return
    dtype = F64 if layout == "float64" else F32
    q, k, v = _qkv(rng, 2, hk * group, hk, nq, 29, d, dtype)
    if layout == "strided":
        k = np.repeat(k, 2, axis=-1)[..., ::2]
        v = np.repeat(v, 2, axis=-1)[..., ::2]
    for splits in (1, 3):
        _check(q, k, v, dtype, layout, num_splits=splits, window=(9, 0))


# --- several blocks (or halves of one) read at once -----------------------------


@pytest.fixture(params=[17, 24])
def stream_tile(request, monkeypatch):
    """Key tiles of 17 (one segment: two halves of 8 and a last row) and 24
    (four whole blocks of 1, 3 or 6; two of 8, 12 or 4 and a shorter one;
    halves of 12)."""
    monkeypatch.setattr(numbattn.config, "CPU_STREAM_KEY_TILE", request.param)
    return request.param


@pytest.mark.parametrize("block_size", [1, 3, 4, 6, 8, 12, 64])
@pytest.mark.parametrize(
    "group, nq, causal", [(1, 1, False), (3, 1, False), (4, 1, False), (2, 3, True)]
)
def test_paged_block_streams(rng, stream_tile, wide_rows, block_size, group, nq, causal):
    """K and V read four or two cache blocks at a time, or a segment as two
    halves (with the last odd row), for 1, 3 (odd: the last-row loop), 4 and
    6 query rows per key head, under each P @ V register block; split
    boundaries inside blocks (3 splits); the result depends on the logical
    keys only, not on where the table puts the blocks (bitwise)."""
    lengths = [0, 1, 50, 77, 100]
    hk, d = 2, 8
    k_cache, v_cache, table = _paged(rng, lengths, block_size, hk, d, F32)
    q = randn(rng, (len(lengths), hk * group, nq, d), F32)
    lens = np.array(lengths)
    ref_out, ref_lse = reference.paged_attention(q, k_cache, v_cache, table, lens, causal=causal)
    # The same logical cache, the blocks moved (another permutation).
    perm = rng.permutation(k_cache.shape[0])
    inv = np.argsort(perm).astype(np.int32)
    table2 = np.where(table >= 0, inv[np.clip(table, 0, None)], table).astype(np.int32)
    for splits in (1, 3):
        out, lse = _run(
            numbattn.paged_attention, q, d, F32, q, k_cache, v_cache, table, lens,
            num_splits=splits, causal=causal,
        )  # fmt: skip
        assert_close(out, ref_out, F32, f"paged blocks of {block_size} out")
        assert_close(lse, ref_lse, F32, f"paged blocks of {block_size} lse")
        out2, lse2 = _run(
            numbattn.paged_attention, q, d, F32, q, k_cache[perm], v_cache[perm], table2, lens,
            num_splits=splits, causal=causal,
        )  # fmt: skip
        np.testing.assert_array_equal(out2, out)
        np.testing.assert_array_equal(lse2, lse)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_dense_segment_halves(rng, stream_tile, wide_rows, dtype):
    """A contiguous cache: each key tile one segment, read as two halves."""
    q, k, v = _qkv(rng, 3, 4, 2, 2, 61, 8, dtype)
    for splits in (1, 2):
        _check(q, k, v, dtype, "halves", num_splits=splits, key_lengths=np.array([61, 18, 5]))
        _check(q, k, v, dtype, "halves causal", num_splits=splits, causal=True)
