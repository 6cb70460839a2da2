"""numbattn.attention_backward / varlen_attention_backward on GPU arrays
(simulator or real GPU) against numbattn.reference's float64 backward.

Tiles are tiny (conftest's small_tiles: 4-row own and streamed tiles of
2 x 2 threads, 8-row forward tiles) so that every shape crosses tile
boundaries with tails. Gradient buffers are poisoned with NaN first, so an
element the kernels skip fails; padding rows of the inputs hold NaN, so a
read past a length fails too. The forward's own out/lse feed the backward.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from tests.helpers import DTYPES, assert_close, poisoned, randn

cuda = pytest.importorskip("numba.cuda")


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host(x):
    return x.copy_to_host()


def _inputs(rng, dtype, b, h, hk, nq, nk, d, dv):
    q = randn(rng, (b, h, nq, d), dtype)
    k = randn(rng, (b, hk, nk, d), dtype)
    v = randn(rng, (b, hk, nk, dv), dtype)
    dout = randn(rng, (b, h, nq, dv), dtype)
    return q, k, v, dout


def check_backward(dtype, q, k, v, dout, what="", ref_inputs=None, **options):
    """Forward (out, lse) then backward into poisoned dq/dk/dv on the device,
    against the reference on ``ref_inputs`` (default: the same inputs)."""
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in options.items()}
    lead, nq = q.shape[:-2], q.shape[-2]
    lse = dev(poisoned(lead + (nq,), dtype))
    out = numbattn.attention(dev(q), dev(k), dev(v), lse=lse, **dev_opts)
    grads = [dev(poisoned(x.shape, dtype)) for x in (q, k, v)]
    res = numbattn.attention_backward(
        dev(q), dev(k), dev(v), out, lse, dev(dout), dq=grads[0], dk=grads[1], dv=grads[2],
        **dev_opts,
    )  # fmt: skip
    assert all(r is g for r, g in zip(res, grads, strict=True))
    rq, rk, rv, rdo = ref_inputs if ref_inputs is not None else (q, k, v, dout)
    ref = reference.attention_backward(rq, rk, rv, rdo, **options)
    got = [host(g) for g in grads]
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        assert np.isfinite(g).all(), f"{what} {name}: non-finite entries"
        assert_close(g, r, dtype, f"{what} {name}")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_dense(dtype, causal):
    """Several own and streamed tiles with tails, d != dv, Nq != Nk both ways
    (causal bottom-right: with Nq > Nk the first rows see no key)."""
    rng = np.random.default_rng(1 + causal)
    for nq, nk, d, dv in ((9, 14, 5, 7), (13, 6, 3, 2), (1, 1, 1, 1)):
        q, k, v, do = _inputs(rng, dtype, 2, 2, 2, nq, nk, d, dv)
        check_backward(dtype, q, k, v, do, f"dense {nq}x{nk}", causal=causal, scale=0.7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lengths(dtype):
    """Key/query lengths (0, 1, partial, full): padding rows hold NaN and are
    never read; dk/dv rows past a key length and dq rows past a query
    length are zeros."""
    rng = np.random.default_rng(3)
    b, h, nq, nk, d, dv = 3, 2, 10, 11, 4, 6
    q, k, v, do = _inputs(rng, dtype, b, h, h, nq, nk, d, dv)
    for kl, ql, causal in (([11, 0, 1], None, False), ([5, 11, 2], [10, 1, 0], True)):
        kl = np.array(kl)
        ql = None if ql is None else np.array(ql)
        qn, kn, vn, don = q.copy(), k.copy(), v.copy(), do.copy()
        for i in range(b):
            kn[i, :, kl[i] :] = np.nan
            vn[i, :, kl[i] :] = np.nan
            if ql is not None:
                qn[i, :, ql[i] :] = np.nan
                don[i, :, ql[i] :] = np.nan
        gq, gk, gv = check_backward(
            dtype, qn, kn, vn, don, f"lengths {kl} {ql}", ref_inputs=(q, k, v, do),
            key_lengths=kl, query_lengths=ql, causal=causal,
        )  # fmt: skip
        for i in range(b):
            assert np.all(gk[i, :, kl[i] :] == 0) and np.all(gv[i, :, kl[i] :] == 0)
            if ql is not None:
                assert np.all(gq[i, :, ql[i] :] == 0)


WINDOW_CASES = [
    # nq, nk, window, causal
    (9, 14, (2, 0), False),
    (14, 9, (0, 3), False),
    (9, 14, (-1, 2), False),
    (11, 11, (3, 5), True),
    (14, 9, (1, -1), True),
]


@pytest.mark.parametrize("nq,nk,window,causal", WINDOW_CASES)
def test_window(nq, nk, window, causal):
    dtype = DTYPES[(nq + window[0]) % 2]
    rng = np.random.default_rng(nq * 7 + nk)
    q, k, v, do = _inputs(rng, dtype, 1, 2, 1, nq, nk, 6, 5)
    check_backward(dtype, q, k, v, do, f"window {window}", window=window, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_and_mask(dtype):
    """A bias with -inf entries and a fully masked row, a mask with a fully
    masked head; masked rows get zero dq and add nothing to dk/dv."""
    rng = np.random.default_rng(5)
    b, h, nq, nk, d = 2, 2, 9, 10, 4
    q, k, v, do = _inputs(rng, dtype, b, h, h, nq, nk, d, d)
    bias = randn(rng, (nq, nk), dtype, scale=2.0)
    bias[rng.random((nq, nk)) < 0.2] = -np.inf
    bias[2] = -np.inf
    mask = rng.random((h, 1, nk)) > 0.3
    mask[1] = False
    gq, _, _ = check_backward(dtype, q, k, v, do, "bias", bias=bias)
    assert np.all(gq[:, :, 2] == 0)
    gq, _, _ = check_backward(dtype, q, k, v, do, "mask", mask=mask, causal=True)
    assert np.all(gq[:, 1] == 0)
    check_backward(
        dtype, q, k, v, do, "bias+mask+lengths+window", bias=bias, mask=mask[:1],
        key_lengths=np.array([7, 10]), query_lengths=np.array([9, 4]), window=(4, 1),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hk", [2, 1])
def test_gqa(dtype, hk):
    """dk/dv of a key head summed over its query heads (4:2 and MQA 4:1)."""
    rng = np.random.default_rng(30 + hk)
    q, k, v, do = _inputs(rng, dtype, 2, 4, hk, 9, 11, 5, 3)
    check_backward(dtype, q, k, v, do, f"gqa {hk}", causal=True)
    check_backward(
        dtype, q, k, v, do, f"gqa {hk} lengths", key_lengths=np.array([11, 4]), window=(3, 2)
    )


def test_deterministic():
    """No atomics: two runs give bitwise identical gradients."""
    rng = np.random.default_rng(7)
    q, k, v, do = (dev(x) for x in _inputs(rng, np.float32, 1, 4, 2, 11, 13, 5, 6))
    lse = dev(poisoned((1, 4, 11), np.float32))
    out = numbattn.attention(q, k, v, lse=lse, causal=True)
    first = [host(g) for g in numbattn.attention_backward(q, k, v, out, lse, do, causal=True)]
    again = [host(g) for g in numbattn.attention_backward(q, k, v, out, lse, do, causal=True)]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)


CU_Q = np.array([0, 5, 5, 14, 15])  # lengths 5, 0, 9, 1
CU_K = np.array([0, 7, 10, 10, 22])  # lengths 7, 3, 0, 12

VARLEN_CASES = [
    (np.float32, 6, 5, dict()),
    (np.float64, 6, 5, dict(causal=True)),
    (np.float32, 5, 4, dict(causal=True, window=(3, -1), bias=True, mask=True)),
]


@pytest.mark.parametrize("dtype,d,dv,opts", VARLEN_CASES)
def test_varlen(dtype, d, dv, opts):
    """Packed sequences (one without queries, one without keys), GQA 4:2:
    each sequence writes only its own dk/dv rows."""
    rng = np.random.default_rng(d * 10 + dv)
    h, hk = 4, 2
    tq, tk = int(CU_Q[-1]), int(CU_K[-1])
    q, k, v = randn(rng, (tq, h, d), dtype), randn(rng, (tk, hk, d), dtype), None
    v = randn(rng, (tk, hk, dv), dtype)
    do = randn(rng, (tq, h, dv), dtype)
    opts = dict(opts)
    if opts.get("bias"):
        bias = randn(rng, (tq, tk), dtype)
        bias[rng.random((tq, tk)) < 0.1] = -np.inf
        bias[3] = -np.inf
        opts["bias"] = bias
    if opts.get("mask"):
        mask = rng.random((h, tq, tk)) > 0.25
        mask[1, 7] = False
        opts["mask"] = mask
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in opts.items()}
    lse = dev(poisoned((tq, h), dtype))
    out = numbattn.varlen_attention(dev(q), dev(k), dev(v), CU_Q, CU_K, lse=lse, **dev_opts)
    grads = [dev(poisoned(x.shape, dtype)) for x in (q, k, v)]
    numbattn.varlen_attention_backward(
        dev(q), dev(k), dev(v), out, lse, dev(do), CU_Q, CU_K,
        dq=grads[0], dk=grads[1], dv=grads[2], **dev_opts,
    )  # fmt: skip
    ref = reference.varlen_attention_backward(q, k, v, do, CU_Q, CU_K, **opts)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref, strict=True):
        assert_close(host(g), r, dtype, f"varlen {name}")


def test_wide_heads_shrink_the_tiles(monkeypatch):
    """Whole head rows must fit 48 KiB of shared memory: the backend halves
    the tiles for wide heads, and refuses (ValueError naming the knobs)
    when even the smallest tiles cannot hold them."""
    from numbattn.cuda import backend

    for name, value in dict(
        CUDA_BWD_ROW_TILE=32, CUDA_BWD_COL_TILE=32,
        CUDA_BWD_ROWS_PER_THREAD=2, CUDA_BWD_COLS_PER_THREAD=4,
    ).items():  # fmt: skip
        monkeypatch.setattr(numbattn.config, name, value)
    assert backend.backward_geometry(np.float32, 64, 64)[:4] == (16, 8, 2, 4)
    tr, tc, rr, rc, dp, dvp = backend.backward_geometry(np.float32, 256, 256)
    assert (tr * rr, tc * rc) < (32, 32) and (dp, dvp) == (256, 256)
    with pytest.raises(ValueError, match=r"CUDA_BWD_ROWS_PER_THREAD.*shared memory"):
        backend.backward_geometry(np.float32, 8192, 64)
    monkeypatch.setattr(numbattn.config, "CUDA_BWD_COL_TILE", 30)
    with pytest.raises(ValueError, match=r"CUDA_BWD_COLS_PER_THREAD must divide"):
        backend.backward_geometry(np.float32, 64, 64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_masked_positions(dtype):
    """NaN in a key no row sees (k, v), in a fully masked query row (q,
    dout) and in keys a window hides from some rows never reach a gradient:
    masked entries are skipped, not multiplied by zero."""
    rng = np.random.default_rng(9)
    b, h, nq, nk, d = 1, 2, 9, 10, 4
    q, k, v, do = _inputs(rng, dtype, b, h, 1, nq, nk, d, d)
    mask = np.ones((h, nq, nk), dtype=bool)
    mask[:, :, 6] = False  # key 6: seen by nobody
    mask[:, 4, :] = False  # query 4: sees nothing
    for x in (k, v):
        x[:, :, 6] = np.nan
    for x in (q, do):
        x[:, :, 4] = np.inf
    gq, gk, gv = check_backward(dtype, q, k, v, do, "nan masked", mask=mask, window=(2, 1))
    assert np.all(gk[:, :, 6] == 0) and np.all(gv[:, :, 6] == 0) and np.all(gq[:, :, 4] == 0)


#: The tensor cores (3xTF32 and DMMA; emulated on the simulator): one warp
#: of 16 own rows, 8-row streamed tiles.
MMA_TILES = dict(
    CUDA_TENSOR_CORES=True,
    CUDA_BWD_TC_WARPS=1,
    CUDA_BWD_TC_COL_TILE=8,
    CUDA_BWD_TC_WARPS_F64=1,
    CUDA_BWD_TC_COL_TILE_F64=8,
)


@pytest.fixture
def mma_tiles(monkeypatch):
    from numbattn.cuda import backend

    for name, value in MMA_TILES.items():
        monkeypatch.setattr(numbattn.config, name, value)
    for dtype in DTYPES:
        geo, kind = backend.backward_plan(dtype, 5, 6)
        assert kind is not None and geo[0] * geo[1] == 32


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_cores(mma_tiles, dtype):
    """The tensor-core kernels (fragment layout, visibility per fragment
    element, outputs as n-tiles) with tails, lengths, window, GQA, bias and
    mask."""
    rng = np.random.default_rng(11)
    q, k, v, do = _inputs(rng, dtype, 2, 4, 2, 11, 19, 5, 6)
    check_backward(dtype, q, k, v, do, "mma", scale=0.6)
    check_backward(
        dtype, q, k, v, do, "mma lengths window", causal=True, window=(4, 1),
        key_lengths=np.array([6, 19]), query_lengths=np.array([11, 2]),
    )  # fmt: skip
    bias = randn(rng, (11, 19), dtype)
    bias[rng.random((11, 19)) < 0.2] = -np.inf
    bias[5] = -np.inf
    mask = rng.random((4, 1, 19)) > 0.3
    check_backward(dtype, q, k, v, do, "mma bias mask", bias=bias, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_cores_nan_in_masked_positions(mma_tiles, dtype):
    test_nan_in_masked_positions(dtype)


def _shipped_backward_knobs() -> dict:
    """The CUDA_BWD_* values numbattn/config.py ships (conftest shrinks them)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_shipped_config", numbattn.config.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {n: getattr(mod, n) for n in dir(mod) if n.startswith("CUDA_BWD_")}


@pytest.mark.parametrize("dtype,d,dv", [(np.float32, 40, 72), (np.float64, 24, 40)])
def test_production_geometry(monkeypatch, dtype, d, dv):
    """The shipped geometry (the tensor-core kernels: float32 2 warps,
    32-row streamed tiles; float64 one warp, 16-row tiles), dv != d both
    padded, own tiles with tails, causal with Nq < Nk, lengths and GQA
    (small: the simulator runs one Python thread per CUDA thread). On a GPU
    this runs the hardware paths (launch bounds, inline PTX)."""
    from numbattn.cuda import backend

    for name, value in _shipped_backward_knobs().items():
        monkeypatch.setattr(numbattn.config, name, value)
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", True)
    geo, kind = backend.backward_plan(dtype, d, dv)
    assert kind is not None and geo[0] * geo[1] == (64 if dtype == np.float32 else 32)
    rng = np.random.default_rng(12)
    nq, nk = (33, 38) if dtype == np.float32 else (17, 21)
    q, k, v, do = _inputs(rng, dtype, 1, 2, 1, nq, nk, d, dv)
    check_backward(
        dtype, q, k, v, do, "production", causal=True,
        key_lengths=np.array([nk - 3]), query_lengths=np.array([nq - 1]),
    )  # fmt: skip


@pytest.mark.parametrize("tiles", ["fma", "mma"])
def test_diagonal(monkeypatch, tiles):
    """An explicit diagonal (the table's ALIGN column): one for the batch and
    one per batch element, with causal and a window, past either end."""
    if tiles == "mma":
        for name, value in MMA_TILES.items():
            monkeypatch.setattr(numbattn.config, name, value)
    dtype = np.float64 if tiles == "mma" else np.float32
    rng = np.random.default_rng(13)
    q, k, v, do = _inputs(rng, dtype, 2, 2, 1, 10, 13, 5, 4)
    check_backward(dtype, q, k, v, do, "diagonal -2 causal", diagonal=-2, causal=True)
    check_backward(
        dtype, q, k, v, do, "diagonal per batch, window", diagonal=np.array([5, -12]),
        window=(2, 3),
    )  # fmt: skip
