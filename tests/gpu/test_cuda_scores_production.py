"""The CUDA FMA ``scores`` kernel (tensor cores off: what runs before sm_80;
tests/gpu/test_cuda_scores_tensor_cores.py has the tensor-core one) at the
production geometry of numbattn.config (no small_tiles): 64 x 64 output tiles, 4 x 4 outputs per thread (256
threads, 8 warps), d staged in chunks of 16 (whole chunks with the next one
prefetched into registers, then a zero-padded tail chunk), with tails (no
length a multiple of the tile or the chunk), both dtypes and every option:
causal with Nq != Nk, lengths, GQA, window, bias with -inf entries, mask
with a fully masked row, diagonal, strided q/k/out, infinite inputs in the
zero-padded tail chunk. Outputs are poisoned
beforehand, so an unwritten element fails.

Then two odd geometries that take the kernel's other staging plans: a chunk
that the block's threads cannot split into equal runs of one row (element
by element, the last trip past the tile) and a thread count that is not a
whole warp. Few, well-chosen shapes: the simulator runs one Python thread
per CUDA thread.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from tests.helpers import assert_close, poisoned, randn

cuda = pytest.importorskip("numba.cuda")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Overrides conftest's fixture: the production geometry, tensor cores off."""
    monkeypatch.setattr(numbattn.config, "CUDA_TENSOR_CORES", False)


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def _run(q, k, what, out=None, **options):
    """Scores of (q, k) on the device into a poisoned ``out`` against the reference."""
    dtype = q.dtype
    shape = q.shape[:-1] + (k.shape[-2],)
    out = dev(poisoned(shape, dtype)) if out is None else out
    dev_opts = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in options.items()}
    assert numbattn.scores(dev(q), dev(k), out=out, **dev_opts) is out
    kk = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    got = out.copy_to_host()
    assert not np.isnan(got).any(), f"{what}: unwritten elements"
    assert_close(got, reference.scores(q, kk, **options), dtype, what)
    return got


def test_geometry_is_the_production_one():
    from numbattn.cuda import backend

    for dt in (np.float32, np.float64):
        assert backend.scores_geometry(dt) == (64, 4, 16)
        kern, launch = backend._scores_kernel(dt)
        assert kern.geometry["threads"] == launch.threads == 256


def test_float32_causal_lengths_gqa():
    """float32, d = 72 (4 whole chunks, the last three prefetched, and an
    8-dim tail), causal with Nq < Nk (bottom-right), per-batch key and query
    lengths (a tile of padding rows and one of padding keys), GQA 2:1."""
    rng = np.random.default_rng(11)
    q = randn(rng, (2, 2, 70, 72), np.float32)
    k = randn(rng, (2, 1, 83, 72), np.float32)
    _run(
        q, k, "f32 causal lengths", causal=True, scale=0.3,
        key_lengths=np.array([83, 40]), query_lengths=np.array([70, 33]),
    )  # fmt: skip


def test_float64_window_bias_mask():
    """float64, d = 1 (the tail chunk only: 15 of its 16 dims padding), a
    sliding window, bias with -inf entries, a mask with a fully masked row,
    Nq > Nk; the window leaves whole 64 x 64 tiles unseen (written -inf
    without products)."""
    rng = np.random.default_rng(12)
    nq, nk = 150, 133
    q = randn(rng, (1, 2, nq, 1), np.float64)
    k = randn(rng, (1, 2, nk, 1), np.float64)
    bias = randn(rng, (1, 2, nq, nk), np.float64)
    bias[rng.random(bias.shape) < 0.1] = -np.inf
    mask = rng.random((1, 2, nq, nk)) > 0.2
    mask[0, 1, 5] = False
    got = _run(q, k, "f64 window", window=(9, 4), bias=bias, mask=mask, scale=0.5)
    assert np.isneginf(got[0, 0, :40, 100:]).all()


def test_float64_bias_gqa_whole_tiles():
    """float64, d = 64 (whole chunks only), no mask: the tiles every row
    sees whole take the untested write (bias with -inf entries still
    masks), the tails the tested one; GQA 3:1."""
    rng = np.random.default_rng(16)
    q = randn(rng, (1, 3, 130, 64), np.float64)
    k = randn(rng, (1, 1, 70, 64), np.float64)
    bias = randn(rng, (1, 3, 130, 70), np.float64)
    bias[rng.random(bias.shape) < 0.05] = -np.inf
    _run(q, k, "f64 bias whole tiles", bias=bias)


def test_infinite_inputs_in_the_tail_chunk():
    """The tail chunk's padding dims stage zeros in both operands (they read
    dim d - 1, clamped): an inf in the last dim of q or k gives +-inf
    scores, as the reference, never NaN from 0 * inf."""
    rng = np.random.default_rng(15)
    q = randn(rng, (1, 1, 70, 20), np.float32)
    k = randn(rng, (1, 1, 66, 20), np.float32)
    q[0, 0, 7, 19] = np.inf
    k[0, 0, 5, 19] = -np.inf
    k[0, 0, 40, 19] = np.inf
    got = _run(q, k, "inf in the last dim")
    assert np.isinf(got[0, 0, 7]).all() and np.isinf(got[0, 0, :, 5]).all()


@pytest.mark.parametrize("dtype,d", [(np.float64, 64), (np.float32, 20)])
def test_diagonal_and_strides(dtype, d):
    """An explicit diagonal per batch element with a window, on strided q, k
    and out (every stride of the kernel's arrays used): d = 64 (whole chunks
    only) and d = 20 (one chunk and a 4-dim tail)."""
    rng = np.random.default_rng(13)
    nq, nk = 67, 71
    qb = randn(rng, (2, 2, nq, 2 * d), dtype)
    kb = randn(rng, (2, 2, 2 * nk, d), dtype)
    q, k = qb[..., ::2], kb[:, :, ::2]
    # Device views by shape and strides (a real GPU's DeviceNDArray neither
    # steps nor transposes 4-d arrays): out (2, 2, nq, nk) inside a
    # transposed, wider buffer whose extra rows must stay NaN.
    from numbattn.cuda.backend import restride

    base = dev(poisoned((2, 2, nk + 5, nq), dtype))
    st = base.strides
    out = restride(base, (2, 2, nq, nk), (st[0], st[1], st[3], st[2]))
    dq, dk = restride(dev(qb), q.shape, q.strides), restride(dev(kb), k.shape, k.strides)
    kw = dict(diagonal=np.array([30, -20]), window=(25, 3))
    assert numbattn.scores(dq, dk, out=out, **kw) is out
    got = base.copy_to_host()
    assert np.isnan(got[:, :, nk:]).all(), "written outside out"
    got = got[:, :, :nk].transpose(0, 1, 3, 2)
    assert not np.isnan(got).any()
    assert_close(got, reference.scores(q, k, **kw), dtype, "diagonal strided")


ODD = [
    # 9 threads (not a whole warp), one per row of a 5-dim chunk (runs of 5;
    # 1-element shared reads: 5 is no multiple of 2 or 4).
    (dict(CUDA_SCORES_TILE=9, CUDA_SCORES_PER_THREAD=3, CUDA_SCORES_HEAD_CHUNK=5), "9-3-5"),
    # 16 threads, 40 elements a chunk: element by element, 3 trips, the last
    # partly past the tile.
    (dict(CUDA_SCORES_TILE=8, CUDA_SCORES_PER_THREAD=2, CUDA_SCORES_HEAD_CHUNK=5), "8-2-5"),
    # 16 threads, 48 elements: 3 each, but 3 does not divide the 4-dim rows:
    # element by element, no trip past the tile.
    (dict(CUDA_SCORES_TILE=12, CUDA_SCORES_PER_THREAD=3, CUDA_SCORES_HEAD_CHUNK=4), "12-3-4"),
    # 64 threads, 4 per row of a 12-dim chunk (runs of 3).
    (dict(CUDA_SCORES_TILE=16, CUDA_SCORES_PER_THREAD=2, CUDA_SCORES_HEAD_CHUNK=12), "16-2-12"),
]


@pytest.mark.parametrize("knobs, name", ODD, ids=[x[1] for x in ODD])
def test_odd_geometries(knobs, name, monkeypatch):
    """Other staging plans and block shapes, both dtypes, with tails in rows,
    columns and d, causal with lengths and a mask."""
    for key, value in knobs.items():
        monkeypatch.setattr(numbattn.config, key, value)
    rng = np.random.default_rng(14)
    for dtype, d in ((np.float32, 13), (np.float64, 3)):
        q = randn(rng, (2, 1, 19, d), dtype)
        k = randn(rng, (2, 1, 23, d), dtype)
        mask = rng.random((2, 1, 19, 23)) > 0.3
        _run(
            q, k, f"{name} {np.dtype(dtype).name}", causal=True, mask=mask,
            key_lengths=np.array([23, 11]), query_lengths=np.array([19, 8]),
        )  # fmt: skip
