"""A NaN beside -inf entries: the case in which the kernels' NaN-propagating
maximum (``numbattn.cuda.kernels._nanmax``) decides the result. A NaN among
finite values poisons its row through the exponentials whatever the maximum
does; a NaN whose row or partner is otherwise -inf (masked keys, an empty
part, lanes or teams that saw no key) gives a NaN row only if the maximum
keeps the NaN (a plain ``>`` keeps -inf, and the row comes out as an empty
row: zeros). Softmax, the fused attention kernel (FMA and, at the production
float64 geometry, tensor-core), the two-part merge and the streaming kernel
with its split merge, against numbattn.reference; outputs poisoned first.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cuda import backend as BE
from tests.helpers import DTYPES, assert_close, poisoned, randn

cuda = pytest.importorskip("numba.cuda")

#: numbattn.config's shipped float64 tiles (read at import, before conftest's
#: small_tiles fixture patches them): a tensor-core geometry.
#: The tensor-core forward at its smallest geometry (one warp, 8-key tiles).
TC_TILES = dict(
    CUDA_TENSOR_CORES=True,
    CUDA_TC_WARPS=1,
    CUDA_TC_WARPS_F64=1,
    CUDA_TC_KEY_TILE=8,
    CUDA_TC_KEY_TILE_F64=8,
    CUDA_HEAD_CHUNK=8,
    CUDA_VALUE_CHUNK=8,
)


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def host(x):
    return x.copy_to_host()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_nan_among_neg_inf(dtype):
    x = np.full((1, 2, 21), -np.inf, dtype)
    x[0, 0, 13] = np.nan  # one thread's NaN, the other threads' -inf
    x[0, 1, :3] = randn(np.random.default_rng(1), (3,), dtype)  # a finite row
    out = dev(poisoned(x.shape, dtype))
    numbattn.softmax(dev(x), out=out)
    assert np.isnan(host(out)[0, 0]).all()
    with np.errstate(invalid="ignore"):
        assert_close(host(out), reference.softmax(x), dtype, "softmax nan row")


def _case(dtype, nq, nk, d=4, nan="q"):
    """(q, k, v) of 2 heads; ``nan="q"``: every score of row 4 of head 1 NaN;
    ``"k"``: key 0 of head 1 NaN (with causal, row 0's only visible key)."""
    rng = np.random.default_rng(7)
    q = randn(rng, (1, 2, nq, d), dtype)
    k, v = (randn(rng, (1, 2, nk, d), dtype) for _ in range(2))
    if nan == "q":
        q[0, 1, 4] = np.nan
    else:
        k[0, 1, 0] = np.nan
    return q, k, v


def _check(dtype, q, k, v, causal=False, **kw):
    out = dev(poisoned(q.shape[:3] + (v.shape[3],), dtype))
    lse = dev(poisoned(q.shape[:3], dtype))
    numbattn.attention(dev(q), dev(k), dev(v), out=out, lse=lse, causal=causal, **kw)
    ro, rl = reference.attention(q, k, v, causal=causal)
    assert np.isnan(rl).any()
    assert np.array_equal(np.isnan(host(out)), np.isnan(ro))
    assert np.array_equal(np.isnan(host(lse)), np.isnan(rl))
    with np.errstate(invalid="ignore"):
        assert_close(host(out), ro, dtype, "nan out")
        assert_close(host(lse), rl, dtype, "nan lse")


#: (nq, nk, nan, causal): a NaN query row over boundary tiles, over one
#: interior tile only (the fused kernel's fast loop), and a NaN key that is
#: causal row 0's only key (the other lanes of the row see -inf).
CASES = [(9, 11, "q", False), (8, 8, "q", False), (9, 9, "k", True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk,nan,causal", CASES)
def test_attention_nan(dtype, nq, nk, nan, causal):
    _check(dtype, *_case(dtype, nq, nk, nan=nan), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk,nan,causal", CASES)
def test_attention_nan_tensor_cores(monkeypatch, dtype, nq, nk, nan, causal):
    """The tensor-core kernel (its mma.sync emulated on the simulator)."""
    for name, value in TC_TILES.items():
        monkeypatch.setattr(numbattn.config, name, value)
    assert BE.tensor_core_geometry(dtype, BE._device_cc()) is not None
    _check(dtype, *_case(dtype, nq, nk, d=8, nan=nan), causal=causal)


def test_merge_nan_lse_beside_empty_part():
    """Row 0: the first part empty (-inf), the second's lse NaN; row 1 the
    other way round; row 2 finite."""
    dtype = np.float32
    rng = np.random.default_rng(52)
    o1, o2 = randn(rng, (1, 1, 3, 3), dtype), randn(rng, (1, 1, 3, 3), dtype)
    l1, l2 = randn(rng, (1, 1, 3), dtype), randn(rng, (1, 1, 3), dtype)
    l1[0, 0, 0] = l2[0, 0, 1] = -np.inf
    o1[0, 0, 0] = o2[0, 0, 1] = 0
    l2[0, 0, 0] = l1[0, 0, 1] = np.nan
    lse = dev(poisoned(l1.shape, dtype))
    out = numbattn.merge_attention([dev(o1), dev(o2)], [dev(l1), dev(l2)], lse=lse)
    ro, rl = reference.merge_attention([o1, o2], [l1, l2])
    assert np.isnan(host(out)[0, 0, :2]).all() and np.isnan(host(lse)[0, 0, :2]).all()
    with np.errstate(invalid="ignore"):
        assert_close(host(out), ro, dtype, "merge nan beside empty")
        assert_close(host(lse), rl, dtype, "merge nan beside empty lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk,nan,causal", CASES + [(9, 3, "q", False)])
def test_streaming_nan(dtype, monkeypatch, nq, nk, nan, causal):
    """The streaming kernel (its fast steps: 8 keys; its general loop: 3
    keys; teams that see only -inf beside a team's NaN) and, split, its
    split merge."""
    monkeypatch.setattr(numbattn.config, "CUDA_STREAM_ROWS", 64)
    for splits in (1, 3):
        _check(dtype, *_case(dtype, nq, nk, nan=nan), causal=causal, num_splits=splits)
