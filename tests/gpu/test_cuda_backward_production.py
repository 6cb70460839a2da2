"""The float32 backward kernels' fast loop at the production geometry of
numbattn.config (no small tiles): 128 threads, 32-row own and streamed
tiles, head rows zero-padded to 32 or 64 dims.

The fast loop runs the *interior* tiles (whole tiles of real rows, every
(query, key) pair visible, no mask, no bias, d and dv padded to at most 64)
with unrolled products and no visibility tests; every other tile runs the
general loop after it. Each case below has both kinds in both kernels
(the geometry of each is worked out in its docstring). On the simulator
these run the portable path; on a GPU the hardware path (launch bounds,
LDS.128). Few, small shapes: the simulator runs one Python thread per CUDA
thread.

The gradients are checked against the float64 reference, and against the
same kernels with the fast loop switched off (``CUDA_BWD_FAST_LOOP``),
which run every tile in the general loop.
"""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from tests.gpu import test_cuda_backward as _bwd
from tests.helpers import assert_close, poisoned, randn

cuda = pytest.importorskip("numba.cuda")

dev, host = _bwd.dev, _bwd.host
F32 = np.float32


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Overrides conftest's fixture: the shipped backward geometry (the
    forward keeps conftest's small tiles: it only feeds out and lse)."""
    from tests.gpu.conftest import SMALL_TILES

    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(numbattn.config, name, value)
    for name, value in _bwd._shipped_backward_knobs().items():
        monkeypatch.setattr(numbattn.config, name, value)
    yield


def _grads(q, k, v, dout, fast=True, monkeypatch=None, **options):
    """(dq, dk, dv) on the device into poisoned buffers, the forward's own
    out/lse feeding the backward."""
    if monkeypatch is not None:
        monkeypatch.setattr(numbattn.config, "CUDA_BWD_FAST_LOOP", fast)
    lead, nq = q.shape[:-2], q.shape[-2]
    lse = dev(poisoned(lead + (nq,), F32))
    out = numbattn.attention(dev(q), dev(k), dev(v), lse=lse, **options)
    grads = [dev(poisoned(x.shape, F32)) for x in (q, k, v)]
    numbattn.attention_backward(
        dev(q), dev(k), dev(v), out, lse, dev(dout), dq=grads[0], dk=grads[1], dv=grads[2],
        **options,
    )  # fmt: skip
    return [host(g) for g in grads]


def test_geometry_takes_the_fast_loop():
    """The shipped float32 geometry builds both kernels with the fast loop
    for head dims up to 64 (and without it past 64, or when switched off)."""
    from numbattn.cuda import backend

    for d, dv, want in ((64, 64, True), (16, 40, True), (40, 72, False)):
        geo = backend.backward_geometry(F32, d, dv)
        assert geo[:4] == ((16, 8, 2, 4) if want else (16, 4, 2, 4))  # 72: a narrower tile
        for kv in (False, True):
            kern = backend._backward_kernel(F32, kv, geo)
            assert kern.geometry["fast_loop"] is want, (d, dv, kv)


def interior_tiles(nq, nk, d, dv, wl=-1, wr=-1, q_len=None, k_len=None):
    """[query kernel, key kernel]: (interior tiles, all tiles) that one
    query head's blocks visit, for a dense sequence (bottom-right aligned),
    as the kernels' own :func:`head_tiles` counts them."""
    from numbattn._sequences import ALIGN, K_LEN, Q_LEN, dense_table
    from numbattn.cuda import backend

    geo = backend.backward_geometry(F32, d, dv)
    ql = nq if q_len is None else q_len
    kl = nk if k_len is None else k_len
    row = dense_table(nq, nk)
    row[Q_LEN], row[K_LEN], row[ALIGN] = ql, kl, kl - ql
    seq = row[None, None]
    br = geo[0] * geo[2]
    res = []
    for kv, own, rows in ((False, ql, nq), (True, kl, nk)):
        kern = backend._backward_kernel(F32, kv, geo)
        n_in = n_all = 0
        for o0 in range(0, rows, br):
            t = kern.head_tiles(seq, 0, 0, o0, 0, kl, wl, wr, o0 + br <= own)
            n_in += int(t[8] - t[7])
            n_all += int(t[6])
        res.append((n_in, n_all))
    return res


def test_interior_tiles_gqa():
    """GQA 2:1, d = 8, dv = 12, Nq = 64, Nk = 40, no mask: the query
    kernel's two query tiles see key tile 0 whole (interior, the fast loop)
    and the 8-key tail (general loop); the key kernel's key tile 0 sees
    both query tiles whole for each query head of its group (the fast loop
    moves from head to head), key tile 1 (8 keys) is general."""
    assert interior_tiles(64, 40, 8, 12) == [(2, 4), (2, 4)]
    rng = np.random.default_rng(21)
    q, k, v, do = _bwd._inputs(rng, F32, 1, 2, 1, 64, 40, 8, 12)
    _bwd.check_backward(F32, q, k, v, do, "interior gqa", scale=0.3)


def test_interior_and_edge_tiles_causal_lengths():
    """Causal with Nq = 64 < Nk = 96 (bottom-right: query i sees keys
    j <= i + 32), d = 40 (padded to 64), dv = 16 (padded to 32): batch
    element 0 has 3 interior tiles of 5 in each kernel (the others cross
    the diagonal); element 1 has 88 keys and 57 queries (no full query
    tile; one full key tile that sees a query tile whole)."""
    assert interior_tiles(64, 96, 40, 16, wr=0) == [(3, 5), (3, 5)]
    assert interior_tiles(64, 96, 40, 16, wr=0, q_len=57, k_len=88) == [(1, 5), (1, 5)]
    rng = np.random.default_rng(22)
    q, k, v, do = _bwd._inputs(rng, F32, 2, 1, 1, 64, 96, 40, 16)
    _bwd.check_backward(
        F32, q, k, v, do, "causal lengths", causal=True,
        key_lengths=np.array([96, 88]), query_lengths=np.array([64, 57]),
    )  # fmt: skip


def test_fast_loop_off_gives_the_same_gradients(monkeypatch):
    """CUDA_BWD_FAST_LOOP=False runs every tile in the general loop: the
    same gradients (up to summation order)."""
    assert interior_tiles(64, 40, 24, 8) == [(2, 4), (2, 4)]
    rng = np.random.default_rng(23)
    q, k, v, do = _bwd._inputs(rng, F32, 1, 2, 1, 64, 40, 24, 8)
    on = _grads(q, k, v, do, True, monkeypatch)
    off = _grads(q, k, v, do, False, monkeypatch)
    for name, a, b in zip(("dq", "dk", "dv"), on, off, strict=True):
        assert_close(a, b, F32, name)


def test_nonfinite_leaves_the_fast_loop(monkeypatch):
    """A NaN or inf staged in an interior tile hands the tile to the general
    loop, which skips exact zeros of P and dS instead of multiplying them.
    Window (40, 40), Nq = Nk = 64: the diagonal tiles are interior, the
    others are not. Query row 3's scores put P[3, 1] = exp(-800) = 0
    exactly, and dO[3] holds an inf (the key kernel's streamed tile 0 of
    key tile 0): dV[1] stays finite (the general loop skips the zero; a
    fast loop that multiplied it would give NaN), as with the fast loop
    off. V[60] holds a NaN (the query kernel's streamed key tile 1 of
    query tile 1). The non-finite pattern is the one of the fast loop off,
    and the reference agrees wherever it is finite."""
    assert interior_tiles(64, 64, 16, 16, 40, 40) == [(2, 4), (2, 4)]
    rng = np.random.default_rng(24)
    d = 16
    q, k, v, do = _bwd._inputs(rng, F32, 1, 1, 1, 64, 64, d, d)
    k[0, 0, :, 0] *= 0.2
    k[0, 0, 0] = 0.0
    k[0, 0, 1] = 0.0
    k[0, 0, 0, 0], k[0, 0, 1, 0] = 20.0, -20.0
    q[0, 0, 3] = 0.0
    q[0, 0, 3, 0] = 20.0  # scores 400 (key 0), -400 (key 1), |s| < 20 elsewhere
    do[0, 0, 3, 5] = np.inf
    v[0, 0, 60, 2] = np.nan
    opts = dict(scale=1.0, window=(40, 40))
    on = _grads(q, k, v, do, True, monkeypatch, **opts)
    off = _grads(q, k, v, do, False, monkeypatch, **opts)
    assert np.isfinite(on[2][0, 0, 1]).all()
    assert np.isfinite(np.delete(on[0][0, 0, :20], 3, axis=0)).all()
    for name, a, b in zip(("dq", "dk", "dv"), on, off, strict=True):
        fin = np.isfinite(b)
        assert np.array_equal(np.isfinite(a), fin), name
        assert_close(a[fin], b[fin], F32, name)
    # The reference multiplies the zeros: more non-finite entries.
    ref = reference.attention_backward(q, k, v, do, **opts)
    for name, a, r in zip(("dq", "dk", "dv"), on, ref, strict=True):
        fin = np.isfinite(r)
        assert np.all(np.isfinite(a)[fin]), name
        assert_close(a[fin], r[fin], F32, name)


def test_bias_and_mask_take_the_general_loop():
    """A zero bias and an all-true mask (no interior tiles: the general
    loop) on a shape whose tiles would be interior."""
    rng = np.random.default_rng(25)
    dtype = F32
    q, k, v, do = _bwd._inputs(rng, dtype, 1, 1, 1, 64, 64, 8, 8)
    bias = randn(rng, (64, 64), dtype, scale=0.5)
    mask = np.ones((64, 64), dtype=bool)
    mask[7, 9] = False
    _bwd.check_backward(dtype, q, k, v, do, "bias", bias=bias)
    _bwd.check_backward(dtype, q, k, v, do, "mask", mask=mask)
