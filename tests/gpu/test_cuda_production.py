"""The fused attention kernel at the production geometry of numbattn.config
(no small_tiles): multi-warp blocks (256 float32 / 128 float64 threads),
64 x 32 (float32) and 32 x 16 (float64) tiles, with tails (no length a
multiple of any tile), d in {1, 64, 72, 128} with dv != d (d > 64 re-stages
Q per chunk, dv > 64 splits the value columns over launches), and every
option: lengths, varlen, mask, bias, window, GQA, lse, causal with Nq != Nk.

On the simulator these run the portable path (shared-memory reductions);
on a GPU the hardware path (warp shuffles, launch bounds, aligned shared
memory), and :func:`test_hardware_path_matches_portable_path` compares the
two directly. Few, well-chosen shapes: the simulator runs one Python
thread per CUDA thread.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from tests.helpers import assert_close, poisoned, randn

cuda = pytest.importorskip("numba.cuda")


def on_simulator() -> bool:
    from numba.cuda.core import config as ncfg

    return bool(ncfg.ENABLE_CUDASIM)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Overrides conftest's fixture: the production geometry of the FMA
    kernel (what runs before sm_80, and the float32 fast loop); the
    tensor-core kernel's is in test_cuda_tensor_cores.py."""
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", False)
    yield


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host(x):
    return x.copy_to_host()


def _case(rng, dtype, b, h, hk, nq, nk, d, dv):
    q = randn(rng, (b, h, nq, d), dtype)
    k = randn(rng, (b, hk, nk, d), dtype)
    v = randn(rng, (b, hk, nk, dv), dtype)
    return q, k, v


def _run(dtype, q, k, v, what, **options):
    lead, nq, dv = q.shape[:-2], q.shape[-2], v.shape[-1]
    out, lse = dev(poisoned(lead + (nq, dv), dtype)), dev(poisoned(lead + (nq,), dtype))
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in options.items()}
    numbattn.attention(dev(q), dev(k), dev(v), out=out, lse=lse, **dev_opts)
    h = q.shape[1]
    kk, vv = (np.repeat(x, h // x.shape[1], axis=1) for x in (k, v))
    ro, rl = reference.attention(q, kk, vv, **options)
    assert_close(host(out), ro, dtype, f"{what} out")
    assert_close(host(lse), rl, dtype, f"{what} lse")
    assert np.all(host(out)[np.isneginf(rl)] == 0)
    return host(out), host(lse)


def test_float32_causal_lengths_gqa():
    """float32, d = 72 (two d-chunks), dv = 65 (two launches), causal with
    Nq < Nk (bottom-right), per-batch key and query lengths, GQA 2:1."""
    rng = np.random.default_rng(1)
    q, k, v = _case(rng, np.float32, 2, 2, 1, 70, 83, 72, 65)
    _run(
        np.float32, q, k, v, "f32 causal lengths", causal=True, scale=0.3,
        key_lengths=np.array([83, 40]), query_lengths=np.array([70, 33]),
    )  # fmt: skip


@pytest.mark.parametrize("dtype,d,dv", [(np.float64, 1, 128), (np.float32, 64, 40)])
def test_window_bias_mask(dtype, d, dv):
    """Sliding window, bias with -inf entries, mask with a fully masked row,
    Nq > Nk: float64 with d = 1 and dv = 128 (two launches), float32 with
    d = 64 (Q resident: K/V tiles prefetched into registers)."""
    rng = np.random.default_rng(2)
    q, k, v = _case(rng, dtype, 1, 2, 2, 45, 37, d, dv)
    bias = randn(rng, (1, 2, 45, 37), dtype)
    bias[rng.random(bias.shape) < 0.1] = -np.inf
    mask = rng.random((1, 2, 45, 37)) > 0.2
    mask[0, 1, 5] = False
    _run(dtype, q, k, v, "window", window=(9, 4), bias=bias, mask=mask, scale=0.5)


INTERIOR_CASES = [
    # b, h, hk, nq, nk, d, dv, options: every case has full query tiles with
    # interior key tiles (the fast loop) and boundary tiles (the general loop)
    (1, 2, 1, 64, 100, 64, 48, dict()),  # 3 interior tiles, then the tail
    (1, 1, 1, 128, 200, 40, 64, dict(window=(150, 100), scale=0.2)),  # leading + trailing
    (2, 2, 2, 128, 170, 1, 8, dict(causal=True, key_lengths=np.array([170, 120]))),
]


@pytest.mark.parametrize("b,h,hk,nq,nk,d,dv,opts", INTERIOR_CASES)
def test_float32_interior_tiles(b, h, hk, nq, nk, d, dv, opts):
    """float32 with Q resident (d <= 64, zero-padded to the chunk), no mask
    or bias: the interior key tiles of full query tiles run the fast loop,
    visited first, then the leading (window) and trailing tiles."""
    rng = np.random.default_rng(5 + d)
    q, k, v = _case(rng, np.float32, b, h, hk, nq, nk, d, dv)
    _run(np.float32, q, k, v, f"interior {opts}", **opts)


def test_float32_nonfinite_v_leaves_the_fast_loop():
    """NaN and inf in V in an interior tile: the fast loop hands the tile
    (and the rest) to the general loop, whose P @ V skips masked keys; here
    every row sees them, so their columns are NaN/inf, as the reference."""
    rng = np.random.default_rng(6)
    q, k, v = _case(rng, np.float32, 1, 2, 2, 64, 130, 64, 16)
    v[0, 0, 40, 3] = np.nan  # the second tile of head 0
    v[0, 1, 100, 5] = np.inf  # the fourth (last interior) tile of head 1
    v[0, 1, 101, 6] = -np.inf
    out, _ = _run(np.float32, q, k, v, "non-finite v")
    assert np.isnan(out[0, 0, :, 3]).all() and np.isfinite(np.delete(out[0, 0], 3, 1)).all()
    assert np.isposinf(out[0, 1, :, 5]).all() and np.isneginf(out[0, 1, :, 6]).all()


VARLEN_CASES = [
    # dtype, d, dv, cu_seqlens_q, cu_seqlens_k (one sequence without queries,
    # one without keys)
    (np.float32, 64, 48, [0, 40, 40, 107], [0, 70, 75, 75]),
    (np.float32, 128, 64, [0, 9, 9, 40], [0, 20, 26, 26]),
    (np.float64, 72, 24, [0, 20, 20, 53], [0, 30, 35, 35]),
]


@pytest.mark.parametrize("dtype,d,dv,cu_q,cu_k", VARLEN_CASES)
def test_varlen(dtype, d, dv, cu_q, cu_k):
    """Packed sequences, GQA 4:2, causal: d = 64 (Q resident), 72 and 128
    (re-staged per chunk); float64 on the tensor cores (emulated on the
    simulator)."""
    cu_q, cu_k = np.array(cu_q), np.array(cu_k)
    rng = np.random.default_rng(3)
    h, hk = 4, 2
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = randn(rng, (tq, h, d), dtype), randn(rng, (tk, hk, d), dtype), None
    v = randn(rng, (tk, hk, dv), dtype)
    out, lse = dev(poisoned((tq, h, dv), dtype)), dev(poisoned((tq, h), dtype))
    numbattn.varlen_attention(dev(q), dev(k), dev(v), cu_q, cu_k, causal=True, out=out, lse=lse)
    kk, vv = (np.repeat(x, h // hk, axis=1) for x in (k, v))
    ro, rl = reference.varlen_attention(q, kk, vv, cu_q, cu_k, causal=True)
    assert_close(host(out), ro, dtype, "varlen out")
    assert_close(host(lse), rl, dtype, "varlen lse")


@pytest.mark.skipif(on_simulator(), reason="the hardware path needs a GPU")
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_hardware_path_matches_portable_path(dtype, fast):
    """On a GPU: the hardware path (the one the backend launches) and the
    portable path (the simulator's code, compiled for the GPU) agree, on a
    shape with every option, and (``fast``) on one without mask and bias,
    whose interior key tiles run the float32 fast loop."""
    from numbattn.cuda import backend

    rng = np.random.default_rng(4)
    b, h, hk, nq, nk, d, dv = 2, 4, 2, 150, 133, 64, 64
    if fast:
        nq, nk = 300, 333
    q, k, v = _case(rng, dtype, b, h, hk, nq, nk, d, dv)
    if fast:
        opts = dict(
            causal=True, window=(250, -1), key_lengths=np.array([333, 290]),
            query_lengths=np.array([300, 171]),
        )  # fmt: skip
    else:
        bias = randn(rng, (b, h, nq, nk), dtype)
        mask = rng.random((b, h, nq, nk)) > 0.1
        opts = dict(
            causal=True, window=(50, -1), key_lengths=np.array([133, 90]),
            query_lengths=np.array([150, 71]), bias=bias, mask=mask,
        )  # fmt: skip
    res = {}
    for hw in (True, False):
        kern, geo = backend._attention_kernel(dtype, hw=hw)
        key = ("attention", np.dtype(dtype), geo, True)
        saved = backend._kernels[key]
        backend._kernels[key] = kern
        try:
            res[hw] = _run(dtype, q, k, v, f"hw={hw}", **opts)
        finally:
            backend._kernels[key] = saved
    for a, b_ in zip(res[True], res[False]):
        assert_close(a, b_.astype(np.float64), dtype, "hardware vs portable")
