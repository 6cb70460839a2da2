"""numbattn's public API on GPU arrays (Numba device arrays), against
numbattn.reference. Shapes are tiny but cross tile boundaries (see the
small_tiles fixture in conftest.py)."""

import importlib.util

import numpy as np
import pytest

import numbattn
from numbattn import reference
from tests.helpers import DTYPES, RTOL, assert_close, device_transpose, poisoned, randn, rel_err

cuda = pytest.importorskip("numba.cuda")


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host(x):
    return x.copy_to_host()


def is_numba_device_array(obj):
    """Numba's own device-array type (the simulator's fake one there)."""
    return type(obj) is type(cuda.device_array(1))


# ---------------------------------------------------------------- availability


def test_available():
    from numbattn.cuda import backend

    assert numbattn.cuda_available()
    assert backend.cuda_problem() is None
    backend.require_cuda()


def test_problem_wrong_implementation(monkeypatch):
    from numba import cuda as ncuda

    from numbattn.cuda import backend

    monkeypatch.setattr(ncuda, "implementation", "Built-in", raising=False)
    monkeypatch.setattr(backend, "_ok", False)
    reason = backend.cuda_problem()
    assert "implementation='Built-in'" in reason and "numba-cuda" in reason
    assert not numbattn.cuda_available()
    with pytest.raises(RuntimeError, match="numba-cuda"):
        backend.require_cuda()


def test_problem_missing_numba_cuda(monkeypatch):
    from numbattn.cuda import backend

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "numba_cuda" else real(n, *a)
    )
    assert 'pip install "numbattn[cuda]"' in backend.cuda_problem()


def test_problem_no_gpu_and_new_numpy(monkeypatch):
    from numba import cuda as ncuda

    from numbattn.cuda import backend

    monkeypatch.setattr(ncuda, "is_available", lambda: False)
    assert "is_available() is False" in backend.cuda_problem()
    monkeypatch.setattr(np, "__version__", "2.5.0")
    assert "row_stack" in backend.cuda_problem()


# ------------------------------------------------------------------- attention

ATTN_CASES = [
    # nq, nk, d, dv, causal
    (11, 13, 5, 7, False),  # partial tiles everywhere
    (13, 9, 12, 17, True),  # causal Nq > Nk (fully masked rows), d and dv chunked
    (9, 14, 8, 3, True),  # causal Nq < Nk, dv != d
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk,d,dv,causal", ATTN_CASES)
def test_attention(dtype, nq, nk, d, dv, causal):
    rng = np.random.default_rng(nq * 100 + nk)
    q, k, v = (randn(rng, (2, 2, n, e), dtype) for n, e in ((nq, d), (nk, d), (nk, dv)))
    out, lse = dev(poisoned((2, 2, nq, dv), dtype)), dev(poisoned((2, 2, nq), dtype))
    res = numbattn.attention(dev(q), dev(k), dev(v), causal=causal, out=out, lse=lse, scale=0.7)
    assert res is out
    ro, rl = reference.attention(q, k, v, causal=causal, scale=0.7)
    assert_close(host(out), ro, dtype, "out")
    assert_close(host(lse), rl, dtype, "lse")
    if causal and nq > nk:
        assert np.all(host(out)[:, :, : nq - nk] == 0)
        assert np.all(host(lse)[:, :, : nq - nk] == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_noncontiguous_views(dtype):
    """(B, N, H, d) buffers viewed as (B, H, N, d), out too; 3 leading dims."""
    rng = np.random.default_rng(1)
    b, n, h, d = 2, 10, 3, 6
    x = [randn(rng, (b, n, h, d), dtype) for _ in range(3)]
    q, k, v = (device_transpose(dev(a), (0, 2, 1, 3)) for a in x)
    out_buf = dev(poisoned((b, n, h, d), dtype))
    out = device_transpose(out_buf, (0, 2, 1, 3))
    res = numbattn.attention(q, k, v, out=out)
    assert res is out
    ref, _ = reference.attention(*(a.transpose(0, 2, 1, 3) for a in x))
    assert_close(host(out_buf).transpose(0, 2, 1, 3), ref, dtype, "out view")
    # Three leading dims that cannot be merged: one launch per outer index.
    y = [randn(rng, (2, 5, 2, 3, 4), dtype) for _ in range(3)]
    views = [device_transpose(dev(a), (0, 2, 3, 1, 4)) for a in y]  # (2, 2, 3, 5, 4)
    o = numbattn.attention(*views, causal=True)
    ref, _ = reference.attention(*(a.transpose(0, 2, 3, 1, 4) for a in y), causal=True)
    assert is_numba_device_array(o)
    assert_close(host(o), ref, dtype, "5-d")


def test_attention_empty_keys_and_default_allocation():
    dtype = np.float64
    rng = np.random.default_rng(2)
    q, k, v = (
        randn(rng, (1, 2, 5, 3), dtype),
        np.zeros((1, 2, 0, 3), dtype),
        np.zeros((1, 2, 0, 4), dtype),
    )
    lse = dev(poisoned((1, 2, 5), dtype))
    out = numbattn.attention(dev(q), dev(k), dev(v), lse=lse)
    assert is_numba_device_array(out) and out.shape == (1, 2, 5, 4) and out.dtype == dtype
    assert np.all(host(out) == 0) and np.all(host(lse) == -np.inf)
    # d = 0: all scores 0, uniform weights.
    q0, k0 = np.zeros((1, 1, 3, 0), dtype), np.zeros((1, 1, 4, 0), dtype)
    v0 = randn(rng, (1, 1, 4, 2), dtype)
    o0 = numbattn.attention(dev(q0), dev(k0), dev(v0))
    assert_close(host(o0), reference.attention(q0, k0, v0)[0], dtype, "d=0")


def test_attention_nan_row_and_foreign_interface_and_stream():
    """A NaN poisons its row only; any __cuda_array_interface__ object works."""
    dtype = np.float32
    rng = np.random.default_rng(3)
    q, k, v = (randn(rng, (1, 1, 9, 4), dtype) for _ in range(3))
    q[0, 0, 4, 1] = np.nan

    class Foreign:  # a GPU array from "another library"
        def __init__(self, arr):
            self._arr = arr

        @property
        def __cuda_array_interface__(self):
            return self._arr.__cuda_array_interface__

    lse = dev(poisoned((1, 1, 9), dtype))
    stream = cuda.stream()
    out = numbattn.attention(
        Foreign(dev(q)), Foreign(dev(k)), Foreign(dev(v)), lse=lse, stream=stream
    )
    stream.synchronize()
    assert is_numba_device_array(out)
    ro, _ = reference.attention(q, k, v)
    assert_close(host(out), ro, dtype, "nan row")
    assert np.isnan(host(out)[0, 0, 4]).all() and np.isnan(host(lse)[0, 0, 4])
    with pytest.raises(TypeError, match="stream"):
        numbattn.attention(dev(q), dev(k), dev(v), stream="not a stream")


def test_attention_default_geometry():
    """The production tile sizes (one block per dtype; slow on the simulator)."""
    import numbattn.config as cfg
    from tests.gpu.conftest import SMALL_TILES

    rng = np.random.default_rng(4)
    saved = {n: getattr(cfg, n) for n in SMALL_TILES}
    try:
        import importlib

        defaults = importlib.reload(importlib.import_module("numbattn.config"))
        assert defaults is cfg
        for dtype in DTYPES:
            q, k, v = (randn(rng, (1, 1, 5, 3), dtype) for _ in range(3))
            o = numbattn.attention(dev(q), dev(k), dev(v), causal=True)
            assert_close(host(o), reference.attention(q, k, v, causal=True)[0], dtype, "default")
    finally:
        for n, val in saved.items():
            setattr(cfg, n, val)


def test_bare_attention_launch():
    """The public bare-launch baseline (scripts/gpu_check.py's host time per
    call) computes dense attention with the typed arguments, lse included."""
    from numbattn.cuda import backend

    rng = np.random.default_rng(5)
    for dtype in DTYPES:
        q, k = randn(rng, (1, 2, 9, 3), dtype), randn(rng, (1, 2, 11, 3), dtype)
        v = randn(rng, (1, 2, 11, 5), dtype)
        out, lse = cuda.device_array((1, 2, 9, 5), dtype), cuda.device_array((1, 2, 9), dtype)
        launch = backend.bare_attention_launch(dev(q), dev(k), dev(v), out, lse)
        launch()
        ro, rl = reference.attention(q, k, v)
        assert_close(host(out), ro, dtype, "bare out")
        assert_close(host(lse), rl, dtype, "bare lse")
    wide = dev(randn(rng, (1, 2, 11, 9), np.float32))
    with pytest.raises(ValueError, match="one launch"):
        backend.bare_attention_launch(dev(q), dev(k), wide, None, None)


# ---------------------------------------------------------------------- scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores(dtype):
    rng = np.random.default_rng(5)
    for nq, nk, d, causal in ((6, 9, 5, True), (9, 6, 7, True), (5, 7, 3, False)):
        q, k = randn(rng, (2, 1, nq, d), dtype), randn(rng, (2, 1, nk, d), dtype)
        out_buf = dev(poisoned((2, nk, 1, nq), dtype))  # non-contiguous out
        out = device_transpose(out_buf, (0, 2, 3, 1))
        res = numbattn.scores(dev(q), dev(k), causal=causal, out=out)
        assert res is out
        ref = reference.scores(q, k, causal=causal)
        assert rel_err(host(out_buf).transpose(0, 2, 3, 1), ref) <= RTOL[np.dtype(dtype)]
    s = numbattn.scores(dev(q), dev(k), scale=2.0)
    assert is_numba_device_array(s)
    assert_close(host(s), reference.scores(q, k, scale=2.0), dtype, "scores")


# --------------------------------------------------------------------- softmax


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_bytes", [16384, 32])
def test_softmax(dtype, cache_bytes, monkeypatch):
    monkeypatch.setattr(numbattn.config, "CUDA_SOFTMAX_CACHE_BYTES", cache_bytes)
    rng = np.random.default_rng(6)
    x = randn(rng, (2, 3, 21), dtype, scale=5)
    x[0, 1] = -np.inf
    x[1, 0, 7] = np.nan
    x[1, 2, :20] = -np.inf
    ref = reference.softmax(x)
    out = dev(poisoned(x.shape, dtype))
    assert numbattn.softmax(dev(x), out=out) is out
    assert_close(host(out), ref, dtype, "softmax")
    assert np.all(host(out)[0, 1] == 0) and np.isnan(host(out)[1, 0]).all()
    assert not np.isnan(host(out)[1, 1]).any()
    dx = dev(x)
    assert numbattn.softmax(dx, out=dx) is dx  # in place
    assert_close(host(dx), ref, dtype, "in place")
    y = numbattn.softmax(dev(x[0]))  # 2-d input
    assert is_numba_device_array(y)
    assert_close(host(y), ref[0], dtype, "2-d")


# ---------------------------------------------------------------------- errors


def _message(fn, *args, **kw):
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args, **kw)
    return info.type, str(info.value)


def test_mixed_host_and_device():
    q = np.zeros((1, 1, 3, 2), np.float32)
    with pytest.raises(TypeError, match=r"^k is a host \(NumPy\) array but q is a GPU array"):
        numbattn.attention(dev(q), q, dev(q))
    with pytest.raises(TypeError, match=r"^out is a GPU array"):
        numbattn.softmax(q, out=dev(q))


def test_errors_match_cpu():
    rng = np.random.default_rng(7)
    q = randn(rng, (1, 2, 3, 4), np.float32)
    cases = [
        (numbattn.attention, (q, q, q), dict(out=np.zeros((1, 2, 3, 4), np.float64))),
        (numbattn.attention, (q, q, q), dict(out=np.zeros((1, 2, 3, 5), np.float32))),
        (numbattn.attention, (q, q, q), dict(lse=np.zeros((1, 2, 4), np.float32))),
        (numbattn.attention, (q, q, q.astype(np.float64)), {}),
        (numbattn.scores, (q, q[..., :3]), {}),
        (numbattn.softmax, (q,), dict(out=np.zeros((1, 2, 3), np.float32))),
    ]
    for fn, args, kw in cases:
        cpu = _message(fn, *args, **kw)
        gpu = _message(fn, *(dev(a) for a in args), **{n: dev(a) for n, a in kw.items()})
        assert gpu == cpu
