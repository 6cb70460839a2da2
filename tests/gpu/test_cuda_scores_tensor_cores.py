"""``scores`` on the tensor cores (numbattn.cuda.tensor.make_scores_tc),
float32 by 3xTF32 (and the opt-in TF32) and float64 by DMMA, against
numbattn.reference.scores on fresh random inputs, outputs poisoned with NaN
first (an unwritten element fails): tails of every tile, GQA, causal,
window, lengths, diagonal, bias with -inf entries, mask, d below one k-step
and over several head chunks, infinite inputs, and the accuracy of 3xTF32
against the FMA kernel on the same inputs.

conftest's small tiles apply (one warp: 16 rows, 8-column tiles, head
chunks of 8), with the tensor cores on; one test runs the production
geometry.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cuda import backend as BE
from tests.helpers import DTYPES, assert_close, poisoned, randn, rel_err

cuda = pytest.importorskip("numba.cuda")

#: numbattn.config's shipped scores geometry, read before the small tiles apply.
PRODUCTION = {
    name: getattr(numbattn.config, name)
    for name in ("CUDA_TC_SCORES_WARPS", "CUDA_TC_SCORES_TILE", "CUDA_TC_SCORES_HEAD_CHUNK")
}


def on_simulator() -> bool:
    from numba.cuda.core import config as ncfg

    return bool(ncfg.ENABLE_CUDASIM)


@pytest.fixture(autouse=True)
def tensor_cores(small_tiles, monkeypatch):
    """conftest's small tiles, with the tensor-core kernels on."""
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", True)


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def _scores(q, k, **options):
    """Scores of (q, k) on the device, written into a poisoned output."""
    out = dev(poisoned(q.shape[:-1] + (k.shape[-2],), q.dtype))
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in options.items()}
    assert numbattn.scores(dev(q), dev(k), out=out, **dev_opts) is out
    got = out.copy_to_host()
    return got


def _reference(q, k, **options):
    kk = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    return reference.scores(q.astype(np.float64), kk.astype(np.float64), **options)


def _check(q, k, what, **options):
    got = _scores(q, k, **options)
    ref = _reference(q, k, **options)
    assert not np.isnan(got).any(), f"{what}: unwritten elements"
    assert np.array_equal(np.isneginf(got), np.isneginf(ref)), f"{what}: masked entries"
    assert_close(got, ref, q.dtype, what)
    return got


def test_the_tensor_core_kernel_is_chosen(monkeypatch):
    for dtype in DTYPES:
        geo = BE.tensor_core_scores_geometry(dtype, BE._device_cc())
        assert geo is not None and (geo.warps, geo.column_tile, geo.head_chunk) == (1, 8, 8)
        kern, launch = BE._scores_kernel(dtype)
        assert kern.py_func.__name__ == "scores_tc_kernel"
        assert (launch.threads, launch.row_tile, launch.column_tile) == (32, 16, 8)
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", False)
    assert BE._scores_kernel(np.float32)[0].py_func.__name__ == "scores_kernel"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b, h, hk, nq, nk, d",
    [
        (1, 2, 2, 19, 21, 12),  # tails of rows, columns and d (two head chunks)
        (2, 4, 2, 33, 17, 8),  # GQA 2:1, three row tiles
        (1, 1, 1, 5, 40, 3),  # d below one k-step
        (1, 1, 1, 9, 12, 27),  # d over four head chunks
    ],
)
@pytest.mark.parametrize("opts", ["none", "causal", "window", "lengths"])
def test_against_the_reference(dtype, b, h, hk, nq, nk, d, opts):
    rng = np.random.default_rng(nq * 7 + nk + d)
    q, k = randn(rng, (b, h, nq, d), dtype), randn(rng, (b, hk, nk, d), dtype)
    options = {
        "none": {},
        "causal": dict(causal=True, scale=0.7),
        "window": dict(window=(4, 2)),
        "lengths": dict(
            causal=True,
            key_lengths=np.array([nk - 3, nk][:b]),
            query_lengths=np.array([nq, max(1, nq - 5)][:b]),
        ),
    }[opts]
    _check(q, k, opts, **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_mask_window_diagonal(dtype):
    """Bias with -inf entries, a mask with a fully masked row, a window
    around explicit diagonals (one pushing every key out of some rows)."""
    rng = np.random.default_rng(3)
    b, h, nq, nk, d = 2, 2, 18, 20, 9
    q, k = randn(rng, (b, h, nq, d), dtype), randn(rng, (b, h, nk, d), dtype)
    bias = randn(rng, (b, h, nq, nk), dtype)
    bias[rng.random(bias.shape) < 0.1] = -np.inf
    mask = rng.random((b, h, nq, nk)) > 0.2
    mask[0, 1, 4] = False
    _check(
        q, k, "bias+mask+window", bias=bias, mask=mask, window=(9, 3),
        diagonal=np.array([5, -12]), scale=0.4,
    )  # fmt: skip
    _check(q, k, "bias only", bias=bias[:1, :1])  # broadcast bias, whole tiles


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_and_nan_inputs(dtype):
    """An inf in q or k gives +-inf scores and a NaN gives NaN rows and
    columns, as the reference (float32 takes the FMA units for such a
    chunk: the TF32 halves of an inf are inf and NaN)."""
    rng = np.random.default_rng(15)
    q, k = randn(rng, (1, 1, 20, 11), dtype), randn(rng, (1, 1, 18, 11), dtype)
    q[0, 0, 7, 10] = np.inf
    k[0, 0, 5, 3] = -np.inf
    q[0, 0, 12, 0] = np.nan
    got = _scores(q, k)
    ref = _reference(q, k)
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    assert np.isinf(got[0, 0, 7, :5]).all() and np.isnan(got[0, 0, 12]).all()
    finite = np.isfinite(ref)
    assert_close(got[finite], ref[finite], dtype, "finite entries")


@pytest.mark.parametrize("dtype", DTYPES)
def test_production_geometry(dtype, monkeypatch):
    """numbattn.config's shipped tiles (64 x 64, head chunks of 32): tails
    of rows, columns and d (a chunk and 8 dims), causal with lengths."""
    for name, value in PRODUCTION.items():
        monkeypatch.setattr(numbattn.config, name, value)
    assert BE._scores_kernel(dtype)[1].row_tile == 16 * PRODUCTION["CUDA_TC_SCORES_WARPS"]
    rng = np.random.default_rng(11)
    q, k = randn(rng, (2, 1, 66, 40), dtype), randn(rng, (2, 1, 70, 40), dtype)
    _check(
        q, k, "production", causal=True, scale=0.3,
        key_lengths=np.array([70, 40]), query_lengths=np.array([66, 33]),
    )  # fmt: skip


def _magnitudes(rng, decades, shape):
    """Log-uniform magnitudes over ``decades`` (powers of ten), random signs,
    so that both TF32 halves of each operand matter."""
    mag = 10.0 ** rng.uniform(*decades, shape)
    return (mag * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


@pytest.mark.parametrize(
    "decades, d",
    [((-3, 3), 8), ((-3, 3), 1), ((-3, -2), 24), ((2, 3), 13)],
)
def test_3xtf32_accuracy_against_the_fma_kernel(monkeypatch, decades, d):
    """float32 on the tensor cores (3xTF32) is within 2x the FMA kernel's
    error on the same inputs, magnitudes 1e-3 .. 1e3."""
    rng = np.random.default_rng(d * 10 + decades[0])
    q, k = _magnitudes(rng, decades, (1, 1, 17, d)), _magnitudes(rng, decades, (1, 1, 19, d))
    ref = _reference(q, k, scale=1.0)
    err_tc = rel_err(_scores(q, k, scale=1.0), ref)
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", False)
    err_fma = rel_err(_scores(q, k, scale=1.0), ref)
    assert err_tc <= 2 * err_fma + 1e-7, (err_tc, err_fma)


def test_tf32_precision_is_opt_in(monkeypatch):
    """CUDA_FLOAT32_PRECISION = "tf32": one TF32 product, about 1e-3."""
    rng = np.random.default_rng(12)
    q, k = _magnitudes(rng, (-1, 1), (1, 1, 16, 16)), _magnitudes(rng, (-1, 1), (1, 1, 16, 16))
    ref = _reference(q, k)
    err_fp32 = rel_err(_scores(q, k), ref)
    monkeypatch.setattr(numbattn.config, "CUDA_FLOAT32_PRECISION", "tf32")
    assert BE.tensor_core_scores_geometry(np.float32, BE._device_cc()).kind == "tf32"
    err_tf32 = rel_err(_scores(q, k), ref)
    assert err_fp32 < 1e-5 and 1e-5 < err_tf32 < 1e-2, (err_fp32, err_tf32)


@pytest.mark.parametrize(
    "knob, value", [("CUDA_TC_SCORES_TILE", 12), ("CUDA_TC_SCORES_HEAD_CHUNK", 4)]
)
def test_bad_tensor_core_tile_raises(monkeypatch, knob, value):
    monkeypatch.setattr(numbattn.config, knob, value)
    q = dev(np.zeros((1, 1, 4, 8), np.float32))
    out = dev(poisoned((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=knob):
        numbattn.scores(q, q, out=out)
    assert np.isnan(out.copy_to_host()).all()


@pytest.mark.skipif(on_simulator(), reason="the inline PTX needs a GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_hardware_steps_match_the_emulation(dtype):
    """On a GPU: the inline-PTX steps and their emulation (compiled for the
    GPU) agree, and both match the reference."""
    rng = np.random.default_rng(13)
    q, k = randn(rng, (2, 2, 45, 24), dtype), randn(rng, (2, 2, 50, 24), dtype)
    ref = _reference(q, k, causal=True)
    res = {}
    launched = BE._scores_kernel(dtype)[0]
    key = next(key for key, val in BE._kernels.items() if val is launched)
    for hw in (True, False):
        saved = BE._kernels[key]
        BE._kernels[key] = BE._scores_kernel(dtype, hw=hw)[0]
        try:
            res[hw] = _scores(q, k, causal=True)
        finally:
            BE._kernels[key] = saved
    assert_close(res[True], res[False].astype(np.float64), dtype, "hardware vs emulation")
    assert_close(res[True], ref, dtype, "hardware")
