"""The fused forward on the tensor cores (numbattn.cuda.tensor), float32 by
3xTF32 (and the opt-in TF32) and float64 by DMMA, against the float64
reference: every option, tails of every tile, nonfinite values, and the
accuracy of 3xTF32 against the FMA kernel on the same inputs.

On the simulator each mma.sync is emulated with the hardware's fragment
layout (numbattn.cuda.steps), so a wrong fragment index fails here; on a
GPU the inline PTX runs, and the hardware test compares it with the
emulation compiled for the GPU.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cuda import backend as BE
from tests.helpers import DTYPES, assert_close, poisoned, randn, rel_err

cuda = pytest.importorskip("numba.cuda")


def on_simulator() -> bool:
    from numba.cuda.core import config as ncfg

    return bool(ncfg.ENABLE_CUDASIM)


@pytest.fixture(autouse=True)
def tensor_cores(small_tiles, monkeypatch):
    """conftest's small tiles, with the tensor-core kernel on (one warp:
    16 query rows, 8-key tiles, head and value chunks of 8)."""
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", True)


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def _run(q, k, v, **options):
    dtype = q.dtype
    lead, nq, dv = q.shape[:-2], q.shape[-2], v.shape[-1]
    out, lse = dev(poisoned(lead + (nq, dv), dtype)), dev(poisoned(lead + (nq,), dtype))
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in options.items()}
    numbattn.attention(dev(q), dev(k), dev(v), out=out, lse=lse, **dev_opts)
    return out.copy_to_host(), lse.copy_to_host()


def _reference(q, k, v, **options):
    h = q.shape[1]
    kk, vv = (np.repeat(x, h // x.shape[1], axis=1) for x in (k, v))
    return reference.attention(
        q.astype(np.float64), kk.astype(np.float64), vv.astype(np.float64), **options
    )


def _check(q, k, v, what, **options):
    out, lse = _run(q, k, v, **options)
    ro, rl = _reference(q, k, v, **options)
    assert_close(out, ro, q.dtype, f"{what} out")
    assert_close(lse, rl, q.dtype, f"{what} lse")


def test_the_tensor_core_kernel_is_chosen():
    for dtype in DTYPES:
        geo = BE.tensor_core_geometry(dtype, BE._device_cc())
        assert geo is not None and geo.warps == 1 and geo.key_tile == 8
        kern, fused = BE._attention_kernel(dtype)
        assert kern.py_func.__name__ == "attention_tc_kernel"
        assert (fused.threads, fused.query_tile) == (32, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b, h, hk, nq, nk, d, dv",
    [
        (1, 2, 2, 19, 21, 12, 10),  # tails; d over two head chunks; dv over two launches
        (2, 4, 2, 33, 17, 8, 8),  # GQA, three query tiles
        (1, 1, 1, 5, 40, 3, 5),  # d and dv below one k-step
    ],
)
@pytest.mark.parametrize("opts", ["none", "causal", "window", "lengths"])
def test_against_the_reference(dtype, b, h, hk, nq, nk, d, dv, opts):
    rng = np.random.default_rng(nq * 7 + nk)
    q, k, v = (
        randn(rng, (b, h, nq, d), dtype),
        randn(rng, (b, hk, nk, d), dtype),
        randn(rng, (b, hk, nk, dv), dtype),
    )
    options = {
        "none": {},
        "causal": dict(causal=True),
        "window": dict(window=(4, 2)),
        "lengths": dict(
            causal=True,
            key_lengths=np.array([nk - 3, nk][:b]),
            query_lengths=np.array([nq, max(1, nq - 5)][:b]),
        ),
    }[opts]
    _check(q, k, v, opts, **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_production_geometry(monkeypatch, dtype):
    """The shipped tile sizes (several warps; 32 or 16-key tiles; head and
    value chunks of 64): d = 72 over two head chunks, dv = 65 over two
    launches, causal with Nq < Nk, key lengths, GQA 2:1 (small: the
    simulator runs a Python thread per CUDA thread)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_shipped", numbattn.config.__file__)
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)
    for name in ("CUDA_TC_WARPS", "CUDA_TC_WARPS_F64", "CUDA_TC_KEY_TILE", "CUDA_TC_KEY_TILE_F64",
                 "CUDA_HEAD_CHUNK", "CUDA_VALUE_CHUNK"):  # fmt: skip
        monkeypatch.setattr(numbattn.config, name, getattr(shipped, name))
    assert BE._attention_kernel(dtype)[1].threads >= 64
    rng = np.random.default_rng(17)
    q, k, v = (randn(rng, (1, 2, 20, 72), dtype), randn(rng, (1, 1, 36, 72), dtype),
               randn(rng, (1, 1, 36, 65), dtype))  # fmt: skip
    _check(q, k, v, "production", causal=True, key_lengths=np.array([30]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_mask_and_window(dtype):
    rng = np.random.default_rng(3)
    b, h, nq, nk, d, dv = 1, 2, 18, 20, 8, 8
    q, k, v = (randn(rng, (b, h, n, x), dtype) for n, x in ((nq, d), (nk, d), (nk, dv)))
    bias = randn(rng, (b, h, nq, nk), dtype)
    bias[0, 0, 3, :5] = -np.inf  # a -inf bias masks
    mask = rng.random((b, h, nq, nk)) > 0.2
    mask[0, 1, 4] = False  # a row with no key: zeros, lse -inf
    _check(q, k, v, "bias+mask+window", bias=bias, mask=mask, window=(9, 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen(dtype):
    """Packed sequences (one of them empty), GQA 2:1, causal."""
    rng = np.random.default_rng(5)
    cu_q, cu_k = np.array([0, 7, 7, 30]), np.array([0, 11, 15, 24])
    d, dv, h, hk = 8, 16, 2, 1
    q = randn(rng, (cu_q[-1], h, d), dtype)
    k = randn(rng, (cu_k[-1], hk, d), dtype)
    v = randn(rng, (cu_k[-1], hk, dv), dtype)
    out, lse = dev(poisoned((cu_q[-1], h, dv), dtype)), dev(poisoned((cu_q[-1], h), dtype))
    numbattn.varlen_attention(dev(q), dev(k), dev(v), cu_q, cu_k, causal=True, out=out, lse=lse)
    kk, vv = (np.repeat(x, h // hk, axis=1) for x in (k, v))
    ro, rl = reference.varlen_attention(q, kk, vv, cu_q, cu_k, causal=True)
    assert_close(out.copy_to_host(), ro, dtype, "varlen out")
    assert_close(lse.copy_to_host(), rl, dtype, "varlen lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_values(dtype):
    """inf in V at a masked key is never read; inf at a visible key and NaN
    in Q propagate as in the reference."""
    rng = np.random.default_rng(9)
    q, k, v = (randn(rng, (1, 1, 12, 8), dtype) for _ in range(3))
    v[0, 0, 10, 2] = np.inf  # masked by causality for rows < 10
    q[0, 0, 11, 0] = np.nan
    out, lse = _run(q, k, v, causal=True)
    ro, rl = _reference(q, k, v, causal=True)
    assert np.array_equal(np.isnan(out), np.isnan(ro))
    assert np.isfinite(out[0, 0, :10]).all()
    with np.errstate(invalid="ignore"):
        assert_close(out, ro, dtype, "nonfinite out")
        assert_close(lse, rl, dtype, "nonfinite lse")


def _accuracy_case(rng, decades, d, nk, dtype=np.float32):
    """Inputs whose magnitudes are log-uniform over ``decades`` (powers of
    ten), with random signs, so that both TF32 halves of each operand matter."""

    def x(shape):
        mag = 10.0 ** rng.uniform(*decades, shape)
        return (mag * rng.choice([-1.0, 1.0], shape)).astype(dtype)

    return x((1, 1, 16, d)), x((1, 1, nk, d)), x((1, 1, nk, d))


@pytest.mark.parametrize(
    "decades, d, nk, scale",
    [
        ((-3, -2), 8, 24, 1e3),  # small entries, a large scale factor
        ((-3, 3), 8, 24, 1e-3),  # 1e-3 .. 1e3 in one row
        ((2, 3), 8, 24, 1e-5),  # large entries
        ((-1, 1), 1, 24, None),  # d = 1
        ((-1, 1), 24, 96, None),  # a long row over three head chunks
        ((-1, 0), 16, 24, 40.0),  # a large scale factor: peaked rows
    ],
)
def test_3xtf32_accuracy_against_the_fma_kernel(monkeypatch, decades, d, nk, scale):
    """float32 on the tensor cores (3xTF32) is within 2x the FMA kernel's
    error on the same inputs, for small and large magnitudes, d = 1, long
    rows and large scale factors."""
    rng = np.random.default_rng(d * 100 + nk)
    q, k, v = _accuracy_case(rng, decades, d, nk)
    opts = {} if scale is None else dict(scale=scale)
    ro, _ = _reference(q, k, v, **opts)
    err_tc = rel_err(_run(q, k, v, **opts)[0], ro)
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", False)
    err_fma = rel_err(_run(q, k, v, **opts)[0], ro)
    assert err_tc <= 2 * err_fma + 1e-7, (err_tc, err_fma)


def test_tf32_precision_is_opt_in(monkeypatch):
    """CUDA_FLOAT32_PRECISION = "tf32": one TF32 product, about 1e-3; the
    default stays at float32 accuracy."""
    rng = np.random.default_rng(11)
    q, k, v = _accuracy_case(rng, (-1, 1), 16, 24)
    ro, _ = _reference(q, k, v)
    err_fp32 = rel_err(_run(q, k, v)[0], ro)
    monkeypatch.setattr(numbattn.config, "CUDA_FLOAT32_PRECISION", "tf32")
    assert BE.tensor_core_geometry(np.float32, BE._device_cc()).kind == "tf32"
    err_tf32 = rel_err(_run(q, k, v)[0], ro)
    assert err_fp32 < 1e-5
    assert 1e-5 < err_tf32 < 1e-2, err_tf32


@pytest.mark.parametrize("value", ["bf16", 32, None])
def test_bad_precision_raises(monkeypatch, value):
    monkeypatch.setattr(numbattn.config, "CUDA_FLOAT32_PRECISION", value)
    q = dev(np.zeros((1, 1, 4, 8), np.float32))
    out = dev(poisoned((1, 1, 4, 8), np.float32))
    with pytest.raises(ValueError, match="CUDA_FLOAT32_PRECISION"):
        numbattn.attention(q, q, q, out=out)
    assert np.isnan(out.copy_to_host()).all()


def test_bad_tensor_core_tile_raises(monkeypatch):
    monkeypatch.setattr(numbattn.config, "CUDA_TC_KEY_TILE", 12)
    q = dev(np.zeros((1, 1, 4, 8), np.float32))
    out = dev(poisoned((1, 1, 4, 8), np.float32))
    with pytest.raises(ValueError, match="CUDA_TC_KEY_TILE"):
        numbattn.attention(q, q, q, out=out)
    assert np.isnan(out.copy_to_host()).all()


@pytest.mark.skipif(on_simulator(), reason="the inline PTX needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_hardware_steps_match_the_emulation(dtype):
    """On a GPU: the inline-PTX steps and their emulation (compiled for the
    GPU) agree, and 3xTF32 stays within 2x the FMA kernel's error."""
    rng = np.random.default_rng(13)
    q, k, v = (randn(rng, (2, 2, 45, 24), dtype) for _ in range(3))
    ro, _ = _reference(q, k, v, causal=True)
    res = {}
    launched = BE._attention_kernel(dtype)[0]
    key = next(key for key, val in BE._kernels.items() if val is launched)
    for hw in (True, False):
        kern = BE._attention_kernel(dtype, hw=hw)[0]
        saved = BE._kernels[key]
        BE._kernels[key] = kern
        try:
            res[hw] = _run(q, k, v, causal=True)[0]
        finally:
            BE._kernels[key] = saved
    assert_close(res[True], res[False].astype(np.float64), dtype, "hardware vs emulation")
    assert_close(res[True], ro, dtype, "hardware")


def _gradients(q, k, v, dout, **options):
    """dq, dk, dv on the device (forward, then backward into poisoned arrays)."""
    dtype = q.dtype
    lse = dev(poisoned(q.shape[:-1], dtype))
    out = numbattn.attention(dev(q), dev(k), dev(v), lse=lse, **options)
    grads = [dev(poisoned(x.shape, dtype)) for x in (q, k, v)]
    numbattn.attention_backward(
        dev(q), dev(k), dev(v), out, lse, dev(dout), dq=grads[0], dk=grads[1], dv=grads[2],
        **options,
    )  # fmt: skip
    return [g.copy_to_host() for g in grads]


@pytest.mark.parametrize("decades, d", [((-3, 3), 8), ((-1, 1), 1), ((-2, 0), 24)])
def test_3xtf32_backward_accuracy_against_the_fma_kernels(monkeypatch, decades, d):
    """float32 gradients on the tensor cores (3xTF32) are within 2x the FMA
    kernels' error on the same inputs."""
    monkeypatch.setattr(numbattn.config, "CUDA_BWD_TC_WARPS", 1)
    monkeypatch.setattr(numbattn.config, "CUDA_BWD_TC_COL_TILE", 8)
    rng = np.random.default_rng(d + 7)
    q, k, v = _accuracy_case(rng, decades, d, 20)
    dout = _accuracy_case(rng, decades, d, 16)[0]
    scale = 1.0 / (np.abs(q).max() * np.abs(k).max() * d)  # keeps exp() in range
    ref = reference.attention_backward(
        *(x.astype(np.float64) for x in (q, k, v, dout)), scale=scale, causal=True
    )
    assert BE.backward_plan(np.float32, d, d)[1] == "tf32x3"
    tc = _gradients(q, k, v, dout, scale=scale, causal=True)
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", False)
    assert BE.backward_plan(np.float32, d, d)[1] is None
    fma = _gradients(q, k, v, dout, scale=scale, causal=True)
    for name, a, b, r in zip(("dq", "dk", "dv"), tc, fma, ref, strict=True):
        err_tc, err_fma = rel_err(a, r), rel_err(b, r)
        assert err_tc <= 2 * err_fma + 1e-7, (name, err_tc, err_fma)
