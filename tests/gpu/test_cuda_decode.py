"""The streaming split-K kernel (numbattn/cuda/decode.py) on GPU arrays
(simulator or real GPU), against numbattn.reference: every split count from
1 to more than the key steps, GQA groups 1, 4 and 8, lengths 0 and 1, causal
with several queries, windows, bias, mask, paged caches with shuffled block
tables, determinism, and launch safety.

Geometry (conftest.py's small tiles): 2 teams of 4 lanes, 2 rows and 2 keys
a step per team, so a block takes 4 keys a step and head dimensions up to 4
per lane element. Outputs are poisoned with NaN first.

The existing option tests of test_cuda_options.py / test_cuda_semantics.py /
test_cuda_api.py run here a second time with the streaming kernel switched
on in ``attention`` and the split heuristic made to split (fixture
``streaming``).
"""

import functools

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cuda import backend as BE
from tests.helpers import DTYPES, assert_close, poisoned, randn

cuda = pytest.importorskip("numba.cuda")

# The existing tests, collected again here under the streaming fixture below.
from tests.gpu import test_cuda_api as _api  # noqa: E402
from tests.gpu import test_cuda_diagonal as _diag  # noqa: E402
from tests.gpu import test_cuda_options as _opt  # noqa: E402
from tests.gpu import test_cuda_semantics as _sem  # noqa: E402

test_api_attention_streaming = _api.test_attention
test_lengths_streaming = _opt.test_lengths
test_varlen_streaming = _opt.test_varlen
test_bias_and_mask_streaming = _opt.test_bias_and_mask
test_window_streaming = _opt.test_window
test_gqa_streaming = _opt.test_gqa
test_huge_windows_streaming = _sem.test_huge_windows
test_masked_keys_streaming = _sem.test_masked_keys_are_never_read
test_diagonal_streaming = _diag.test_matches_reference

#: numbattn.config's shipped values of the streaming kernel's knobs (read at
#: import, before any fixture patches them).
DEFAULTS = {
    name: getattr(numbattn.config, name)
    for name in ("CUDA_DECODE_LANES", "CUDA_DECODE_TEAMS", "CUDA_DECODE_ROWS",
                 "CUDA_DECODE_KEYS", "CUDA_DECODE_KEYS_F64", "CUDA_SPLIT_MERGE_THREADS")
}  # fmt: skip


@pytest.fixture(autouse=True)
def streaming(monkeypatch):
    """attention() streams up to 64 rows per KV head, and num_splits=None
    splits down to 2 keys a chunk (a pretend 16-SM device)."""
    monkeypatch.setattr(numbattn.config, "CUDA_STREAM_ROWS", 64)
    monkeypatch.setattr(numbattn.config, "CUDA_MIN_SPLIT_KEYS", 2)
    monkeypatch.setitem(BE._state, "sms", 16)


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host(x):
    return x.copy_to_host()


def _run(fn, lead, nq, dv, dtype, **kw):
    out, lse = dev(poisoned(lead + (nq, dv), dtype)), dev(poisoned(lead + (nq,), dtype))
    res = fn(out=out, lse=lse, **kw)
    assert res is out
    return host(out), host(lse)


# ------------------------------------------------------------------ splits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 1), (8, 1)])  # GQA groups 1, 4, 8
def test_every_split_count(dtype, hq, hk):
    """num_splits 1 .. more than the key steps (19 keys, 4 a step: 5 steps;
    the API caps at the longest length), lengths 19, 0 and 1, two causal
    queries (bottom-right per sequence), Nk not a multiple of anything."""
    rng = np.random.default_rng(hq * 10 + hk)
    b, nq, nk, d, dv = 3, 2, 19, 5, 6
    q = randn(rng, (b, hq, nq, d), dtype)
    k, v = randn(rng, (b, hk, nk, d), dtype), randn(rng, (b, hk, nk, dv), dtype)
    kl = np.array([19, 0, 1])
    ro, rl = reference.attention(q, k, v, causal=True, key_lengths=kl)
    dq, dk, dv_ = dev(q), dev(k), dev(v)
    for splits in (1, 2, 5, 7, 40):
        out, lse = _run(
            lambda **kw: numbattn.attention(dq, dk, dv_, causal=True, key_lengths=kl, **kw),
            (b, hq), nq, dv, dtype, num_splits=splits,
        )  # fmt: skip
        assert_close(out, ro, dtype, f"splits={splits} out")
        assert_close(lse, rl, dtype, f"splits={splits} lse")
        assert np.all(out[1] == 0) and np.all(lse[1] == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_options(dtype):
    """Window, bias (with -inf entries), mask, query lengths and lse with
    splits and GQA, a NaN in a value row that the mask hides from one head
    of the group but not the other."""
    rng = np.random.default_rng(5)
    b, hq, hk, nq, nk, d, dv = 2, 4, 2, 3, 23, 7, 4
    q = randn(rng, (b, hq, nq, d), dtype)
    k, v = randn(rng, (b, hk, nk, d), dtype), randn(rng, (b, hk, nk, dv), dtype)
    bias = randn(rng, (1, hq, nq, nk), dtype)
    bias[0, 1, 0, 3:9] = -np.inf
    mask = rng.random((b, hq, 1, nk)) > 0.2
    v[:, 0, 11] = np.nan  # KV head 0 serves query heads 0 and 1
    mask[:, 0, :, 11] = False
    mask[:, 1, :, 11] = False
    opts = dict(
        window=(9, 2), bias=bias, mask=mask, key_lengths=np.array([23, 14]),
        query_lengths=np.array([3, 2]),
    )  # fmt: skip
    ro, rl = reference.attention(q, k, v, **opts)
    assert np.isfinite(ro).all()
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in opts.items()}
    for splits in (1, 3, 8):
        out, lse = _run(
            lambda **kw: numbattn.attention(dev(q), dev(k), dev(v), **dev_opts, **kw),
            (b, hq), nq, dv, dtype, num_splits=splits,
        )  # fmt: skip
        assert_close(out, ro, dtype, f"splits={splits} out")
        assert_close(lse, rl, dtype, f"splits={splits} lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_splits(dtype):
    """Packed sequences (one without queries, one without keys), GQA, causal, splits."""
    rng = np.random.default_rng(7)
    cu_q, cu_k = np.array([0, 2, 2, 3, 4]), np.array([0, 9, 16, 16, 29])
    h, hk, d, dv = 4, 1, 6, 5
    q = randn(rng, (4, h, d), dtype)
    k, v = randn(rng, (29, hk, d), dtype), randn(rng, (29, hk, dv), dtype)
    ro, rl = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    for splits in (1, 4, 29):
        out, lse = _run(
            lambda **kw: numbattn.varlen_attention(
                dev(q), dev(k), dev(v), cu_q, cu_k, causal=True, **kw
            ),
            (4,), h, dv, dtype, num_splits=splits,
        )  # fmt: skip
        assert_close(out, ro, dtype, f"splits={splits} out")
        assert_close(lse, rl, dtype, f"splits={splits} lse")


def test_deterministic_and_default_splits():
    """Bitwise equal run to run for a given split count; num_splits=None
    equals an explicit count (the heuristic's) bitwise."""
    rng = np.random.default_rng(8)
    q, k, v = (dev(randn(rng, (1, 2, 1 if n == "q" else 41, 8), np.float32)) for n in "qkv")
    runs = [host(numbattn.attention(q, k, v, num_splits=5)) for _ in range(2)]
    assert runs[0].tobytes() == runs[1].tobytes()
    n = BE.default_splits(1, 2, 1, 1, 41)
    assert n > 1
    a = host(numbattn.attention(q, k, v))
    b = host(numbattn.attention(q, k, v, num_splits=n))
    assert a.tobytes() == b.tobytes()


def test_default_splits_heuristic(monkeypatch):
    """Two blocks per SM: (1, 32, 1, 32768) MHA on 132 SMs takes 9 splits,
    GQA 32/8 takes ceil(264 / units); big grids, many rows: 1."""
    monkeypatch.setitem(BE._state, "sms", 132)
    monkeypatch.setattr(numbattn.config, "CUDA_MIN_SPLIT_KEYS", 256)
    monkeypatch.setattr(numbattn.config, "CUDA_STREAM_ROWS", 16)
    monkeypatch.setattr(numbattn.config, "CUDA_DECODE_ROWS", 4)
    assert BE.default_splits(1, 32, 1, 1, 32768) == 9
    assert BE.default_splits(1, 32, 4, 1, 32768) == 33  # 8 blocks of 4 rows
    assert BE.default_splits(64, 32, 1, 1, 32768) == 1
    assert BE.default_splits(1, 32, 1, 1, 600) == 2  # chunks >= 256 keys
    assert BE.default_splits(1, 32, 1, 17, 32768) == 1  # the fused kernel
    assert BE.default_splits(1, 32, 1, 1, 0) == 1


# ------------------------------------------------------------------ paged


def _paged(rng, lengths, block_size, hk, d, dv, dtype, spare=3):
    """A paged cache holding the sequences' keys in shuffled blocks (the
    unused blocks and slots hold NaN: never read), with the dense k, v."""
    b = len(lengths)
    nblk = [-(-int(n) // block_size) for n in lengths]
    max_blocks = max(max(nblk), 1) + 1
    num_blocks = sum(nblk) + spare
    kc = np.full((num_blocks, block_size, hk, d), np.nan, dtype)
    vc = np.full((num_blocks, block_size, hk, dv), np.nan, dtype)
    table = np.full((b, max_blocks), -7, np.int32)  # past the length: never read
    perm = rng.permutation(num_blocks)
    nk = max_blocks * block_size
    k = np.full((b, hk, nk, d), np.nan, dtype)
    v = np.full((b, hk, nk, dv), np.nan, dtype)
    used = 0
    for s, n in enumerate(lengths):
        k[s, :, :n] = randn(rng, (hk, n, d), dtype)
        v[s, :, :n] = randn(rng, (hk, n, dv), dtype)
        for j in range(nblk[s]):
            blk = perm[used]
            used += 1
            table[s, j] = blk
            m = min(block_size, n - j * block_size)
            kc[blk, :m] = k[s, :, j * block_size : j * block_size + m].swapaxes(0, 1)
            vc[blk, :m] = v[s, :, j * block_size : j * block_size + m].swapaxes(0, 1)
    return kc, vc, table, k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("hq,hk", [(2, 2), (8, 1)])
def test_paged(dtype, block_size, hq, hk):
    """Paged caches with shuffled block tables against the dense reference
    and numbattn.reference.paged_attention; lengths 0, 1 and ragged; causal
    with two queries; splits 1, 3 and more than the blocks."""
    rng = np.random.default_rng(block_size * 100 + hq)
    lengths = np.array([13, 0, 1, 6])
    d, dv, nq = 5, 4, 2
    kc, vc, table, k, v = _paged(rng, lengths, block_size, hk, d, dv, dtype)
    q = randn(rng, (len(lengths), hq, nq, d), dtype)
    ro, rl = reference.attention(q, k, v, causal=True, key_lengths=lengths)
    po, _ = reference.paged_attention(q, kc, vc, table, lengths, causal=True)
    assert_close(po, ro, np.float64, "reference.paged_attention")
    for splits in (1, 3, 20):
        out, lse = _run(
            lambda **kw: numbattn.paged_attention(
                dev(q), dev(kc), dev(vc), dev(table), lengths, causal=True, **kw
            ),
            (len(lengths), hq), nq, dv, dtype, num_splits=splits,
        )  # fmt: skip
        assert_close(out, ro, dtype, f"block_size={block_size} splits={splits} out")
        assert_close(lse, rl, dtype, f"block_size={block_size} splits={splits} lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_options(dtype):
    """Paged with a window, bias and mask on logical positions, query
    lengths, and a strided (non-contiguous) cache view."""
    rng = np.random.default_rng(11)
    lengths = np.array([11, 7])
    hq, hk, d, dv, nq, bs = 4, 2, 6, 3, 3, 4
    kc, vc, table, k, v = _paged(rng, lengths, bs, hk, d, dv, dtype)
    nk = table.shape[1] * bs
    q = randn(rng, (2, hq, nq, d), dtype)
    bias = randn(rng, (2, 1, nq, nk), dtype)
    mask = rng.random((1, hq, nq, nk)) > 0.25
    opts = dict(window=(4, 1), bias=bias, mask=mask, query_lengths=np.array([3, 1]))
    ro, rl = reference.attention(q, k, v, key_lengths=lengths, **opts)
    # The caches as views of wider arrays (padding columns between heads).
    kw_ = np.full(kc.shape[:3] + (d + 2,), np.nan, dtype)
    kw_[..., :d] = kc
    dkc = dev(kw_)[:, :, :, :d]
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in opts.items()}
    for splits in (1, 4):
        out, lse = _run(
            lambda **kw: numbattn.paged_attention(
                dev(q), dkc, dev(vc), dev(table), lengths, **dev_opts, **kw
            ),
            (2, hq), nq, dv, dtype, num_splits=splits,
        )  # fmt: skip
        assert_close(out, ro, dtype, f"splits={splits} out")
        assert_close(lse, rl, dtype, f"splits={splits} lse")


# ------------------------------------------------------------------ fast steps, vector loads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["dense", "paged4", "paged3", "offset"])
def test_fast_steps_and_vector_loads(monkeypatch, dtype, layout):
    """Head dimensions that are multiples of the vector width (d = 12, dv =
    16 on 4 lanes: 4 elements a lane, 16-byte chunks for float32, two
    16-byte chunks of 2 for float64; the fourth lane's K chunk is
    past d), long enough sequences for fast steps (no mask or bias; every
    key of a step visible) with general keys before and after them (causal
    with 3 queries, a window, lengths), MHA and GQA, splits 1 and 3, an odd
    and an even number of fast steps (the prefetch loop runs two at a time),
    paged caches with power-of-two and other block sizes; "offset": K and V
    one element past an aligned address, so rows are read element by
    element (``vector_ok`` False), with the same results."""
    from numbattn.cuda.decode import vector_width

    vecs = []
    build = BE._decode_kernel
    monkeypatch.setattr(
        BE, "_decode_kernel", lambda *a, **kw: vecs.append(kw.get("vec")) or build(*a, **kw)
    )
    rng = np.random.default_rng(21)
    lengths = np.array([37, 52])
    d, dv = 12, 16
    for hq, hk, nq, window in ((2, 2, 1, None), (4, 2, 3, (20, 0))):
        q = randn(rng, (2, hq, nq, d), dtype)
        opts = dict(causal=window is None and nq > 1, window=window)
        if layout.startswith("paged"):
            bs = int(layout[5:])
            kc, vc, table, k, v = _paged(rng, lengths, bs, hk, d, dv, dtype)
            dk, dvc = dev(kc), dev(vc)
            assert BE.vector_ok((dk, dvc), vector_width(dtype, 4))
            call = functools.partial(
                numbattn.paged_attention, dev(q), dk, dvc, dev(table), lengths, **opts
            )
        else:
            nk = 52
            k, v = randn(rng, (2, hk, nk, d), dtype), randn(rng, (2, hk, nk, dv), dtype)
            if layout == "offset":  # the same values one element further on
                kb, vb = np.empty(k.size + 1, dtype), np.empty(v.size + 1, dtype)
                kb[1:], vb[1:] = k.ravel(), v.ravel()
                dk = dev(kb)[1:].reshape(k.shape)
                dvc = dev(vb)[1:].reshape(v.shape)
            else:
                dk, dvc = dev(k), dev(v)
            call = functools.partial(
                numbattn.attention, dev(q), dk, dvc, key_lengths=lengths, **opts
            )
        ro, rl = reference.attention(q, k, v, key_lengths=lengths, **opts)
        for splits in (1, 3):
            out, lse = _run(call, (2, hq), nq, dv, dtype, num_splits=splits)
            msg = f"hq={hq} splits={splits}"
            assert_close(out, ro, dtype, msg + " out")
            assert_close(lse, rl, dtype, msg + " lse")
    assert vecs and all(x is (layout != "offset") for x in vecs)


def test_vector_ok():
    """Row reads go 16 bytes at a time only when every chunk is aligned:
    unit last stride, d a multiple of the width, aligned strides and start."""
    from numbattn.cuda.decode import vector_width

    assert vector_width(np.float32, 4) == 4 and vector_width(np.float64, 4) == 2
    assert vector_width(np.float32, 2) == 2 and vector_width(np.float32, 1) == 1
    a = dev(np.zeros((2, 5, 3, 8), np.float32))
    assert BE.vector_ok((a, a), 4)
    assert not BE.vector_ok((a, a), 1)
    assert not BE.vector_ok((a[:, :, :, :6], a), 4)  # d = 6
    assert BE.vector_ok((a[:, :, :, :4], a), 4)  # row stride 32 bytes, d = 4
    assert not BE.vector_ok((a[:, :, :, 1:5], a), 4)  # starts 4 bytes in
    assert not BE.vector_ok((a[:, :, :, ::2], a), 4)  # last stride 8 bytes
    b = dev(np.zeros((2, 5, 3, 6), np.float32))[:, :, :, :4]  # row stride 24 bytes
    assert not BE.vector_ok((b, a), 4) and BE.vector_ok((b, b), 2)


# ------------------------------------------------------------------ launch safety


@pytest.mark.parametrize(
    "knobs,message,d",
    [
        ({"CUDA_DECODE_LANES": 3}, r"CUDA_DECODE_LANES must be a power of two between 1 and 32", 4),
        ({"CUDA_DECODE_LANES": 64}, r"CUDA_DECODE_LANES must be a power of two", 4),
        ({"CUDA_DECODE_TEAMS": 0}, r"CUDA_DECODE_TEAMS must be a positive integer", 4),
        ({"CUDA_DECODE_TEAMS": 512}, r"2048 threads per block.*CUDA_DECODE_TEAMS", 4),
        # 32 teams x 512 columns of team accumulators: 64 KiB of shared memory
        ({"CUDA_DECODE_LANES": 32, "CUDA_DECODE_TEAMS": 32},
         r"bytes of static shared memory.*CUDA_DECODE_TEAMS", 512),
        ({"CUDA_SPLIT_MERGE_THREADS": 6}, r"CUDA_SPLIT_MERGE_THREADS must be a power of two", 4),
        ({"CUDA_STREAM_ROWS": -1}, r"CUDA_STREAM_ROWS must be an integer >= 0", 4),
    ],
)  # fmt: skip
def test_bad_geometry_refused(monkeypatch, knobs, message, d):
    """A geometry that cannot launch raises ValueError naming the knob, and
    nothing is written."""
    for name, value in knobs.items():
        monkeypatch.setattr(numbattn.config, name, value)
    rng = np.random.default_rng(0)
    q = dev(randn(rng, (1, 2, 1, d), np.float32))
    k, v = (dev(randn(rng, (1, 2, 9, d), np.float32)) for _ in range(2))
    out = dev(poisoned((1, 2, 1, d), np.float32))
    with pytest.raises(ValueError, match=message):
        numbattn.attention(q, k, v, out=out)  # streaming, split by the heuristic
    assert np.isnan(host(out)).all()


def test_wide_heads_compile_wider_lanes():
    """d and dv past LANES * EPL pick a larger power of two per lane (here
    d = 11, dv = 13 on 4 lanes: 4 elements a lane), with KB scaled down."""
    assert BE.decode_geometry(np.float32, 11, 13)[4] == 4  # (4, 2, 2, 1, 4)
    rng = np.random.default_rng(3)
    q = randn(rng, (1, 2, 1, 11), np.float64)
    k, v = randn(rng, (1, 1, 10, 11), np.float64), randn(rng, (1, 1, 10, 13), np.float64)
    out, lse = _run(
        lambda **kw: numbattn.attention(dev(q), dev(k), dev(v), **kw),
        (1, 2), 1, 13, np.float64, num_splits=2,
    )  # fmt: skip
    ro, rl = reference.attention(q, k, v)
    assert_close(out, ro, np.float64, "out")
    assert_close(lse, rl, np.float64, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_production_geometry(monkeypatch, dtype):
    """The default geometry (4 warps of 32 lanes; on a GPU, the warp-shuffle
    path): GQA 4 query heads per KV head, d = 40 (two elements a lane, the
    second partly past d), dv = 33, lengths, causal, splits, paged."""
    from numbattn import config

    for name in ("CUDA_DECODE_LANES", "CUDA_DECODE_TEAMS", "CUDA_DECODE_ROWS",
                 "CUDA_DECODE_KEYS", "CUDA_DECODE_KEYS_F64", "CUDA_SPLIT_MERGE_THREADS"):  # fmt: skip
        monkeypatch.setattr(config, name, DEFAULTS[name])
    rng = np.random.default_rng(12)
    lengths = np.array([37, 5])
    kc, vc, table, k, v = _paged(rng, lengths, 8, 1, 40, 33, dtype)
    q = randn(rng, (2, 4, 2, 40), dtype)
    ro, rl = reference.attention(q, k, v, causal=True, key_lengths=lengths)
    for paged in (False, True):
        if paged:
            call = lambda **kw: numbattn.paged_attention(  # noqa: E731
                dev(q), dev(kc), dev(vc), dev(table), lengths, causal=True, **kw
            )
        else:
            call = lambda **kw: numbattn.attention(  # noqa: E731
                dev(q), dev(k), dev(v), causal=True, key_lengths=lengths, **kw
            )
        out, lse = _run(call, (2, 4), 2, 33, dtype, num_splits=3)
        assert_close(out, ro, dtype, f"paged={paged} out")
        assert_close(lse, rl, dtype, f"paged={paged} lse")
