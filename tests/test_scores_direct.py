"""The CPU scores kernel's direct path (issue 12): 4-row blocks written
straight into the output rows, the scale folded into the packed K tile
(|scale| <= 1) or applied in place (|scale| > 1), the last rows of a tile
through scratch; and the scratch path it falls back to (bias, mask, output
rows that are not unit-stride or run backwards). Against numbattn.reference,
outputs poisoned, with guard columns around row-strided outputs."""

import numpy as np
import pytest

import numbattn
from numbattn import reference

from .helpers import DTYPES, assert_close, poisoned, randn


@pytest.fixture(params=["shipped", "odd", "tiny"])
def scores_tiles(request, monkeypatch):
    """Shipped tiles; a query tile that is not a multiple of 4 (whole row
    blocks, then 1 row through scratch) and a key tile of 4 whole vectors, a
    part and a scalar tail (72 = 64 + 8 float32 / 9 x 8 float64); tiny."""
    tiles = {"shipped": None, "odd": (13, 72), "tiny": (3, 5)}[request.param]
    if tiles is not None:
        monkeypatch.setattr(numbattn.config, "CPU_SCORES_QUERY_TILE", tiles[0])
        monkeypatch.setattr(numbattn.config, "CPU_SCORES_KEY_TILE", tiles[1])
    return request.param


def _out(shape, dtype, layout):
    """(out, guard check): "contiguous"; "row-strided", the columns
    [3, 3 + nk) of a wider NaN buffer (rows of unit stride, row stride >
    row length: the direct path), the guard columns must stay NaN;
    "reversed", rows in reverse order (negative row stride: scratch path)."""
    if layout == "contiguous":
        return poisoned(shape, dtype), lambda: True
    if layout == "row-strided":
        big = poisoned(shape[:-1] + (shape[-1] + 7,), dtype)
        guard = np.ones(big.shape, bool)
        guard[..., 3 : 3 + shape[-1]] = False
        return big[..., 3 : 3 + shape[-1]], lambda: bool(np.isnan(big[guard]).all())
    return poisoned(shape, dtype)[..., ::-1, :], lambda: True


OPTIONS = [
    {},
    {"causal": True},
    {"window": (20, 3)},
    {"window": (-1, 0), "diagonal": -9},
    {"causal": True, "key_lengths": np.array([70, 23]), "query_lengths": np.array([50, 31])},
    {"query_lengths": np.array([1, 45])},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "reversed"])
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_scores_paths(rng, scores_tiles, dtype, layout, opts):
    q = randn(rng, (2, 3, 50, 24), dtype)
    k = randn(rng, (2, 3, 70, 24), dtype)
    if "key_lengths" in opts:
        k[1, :, 23:] = np.nan  # keys past a length are never read
    out, guard_ok = _out((2, 3, 50, 70), dtype, layout)
    assert numbattn.scores(q, k, out=out, **opts) is out
    assert guard_ok(), "written outside out"
    assert_close(out, reference.scores(q, k, **opts), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.125, 0.7, -0.3, 1.0, 2.5, -4.0, 0.0])
@pytest.mark.parametrize("causal", [False, True])
def test_scores_scale(rng, scores_tiles, dtype, scale, causal):
    """|scale| <= 1 is folded into K, larger ones are applied to the written
    rows; a power of two gives exactly fl(q . k) * scale."""
    q = randn(rng, (1, 2, 37, 16), dtype)
    k = randn(rng, (1, 2, 45, 16), dtype)
    out = poisoned((1, 2, 37, 45), dtype)
    numbattn.scores(q, k, scale=scale, causal=causal, out=out)
    assert_close(out, reference.scores(q, k, scale=scale, causal=causal), dtype)
    if scale in (0.125, 1.0, -4.0):
        unscaled = numbattn.scores(q, k, scale=1.0, causal=causal)
        want = np.where(np.isinf(unscaled), unscaled, unscaled * np.asarray(scale, dtype))
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_large_values_do_not_overflow(rng, scores_tiles, dtype):
    """k * scale is never formed with |scale| > 1 (it could overflow where
    scale * (q . k) is finite)."""
    big = np.finfo(dtype).max / 4
    q = np.full((1, 1, 9, 2), 1e-3, dtype)
    k = np.full((1, 1, 11, 2), big, dtype)
    out = poisoned((1, 1, 9, 11), dtype)
    numbattn.scores(q, k, scale=3.0, out=out)
    assert np.isfinite(out).all()
    assert_close(out / big, reference.scores(q, k, scale=3.0) / big, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "row-strided"])
def test_scores_bias_mask_gqa(rng, scores_tiles, dtype, layout):
    """Bias and mask take the scratch path; GQA reads key head b // group."""
    q = randn(rng, (2, 4, 29, 16), dtype)
    k = randn(rng, (2, 2, 41, 16), dtype)
    bias = randn(rng, (1, 4, 29, 41), dtype)
    bias[0, 1, 3, 5] = -np.inf
    mask = rng.random((2, 1, 1, 41)) < 0.8
    for kw in ({"bias": bias}, {"mask": mask}, {"bias": bias, "mask": mask, "causal": True}, {}):
        out, guard_ok = _out((2, 4, 29, 41), dtype, layout)
        numbattn.scores(q, k, out=out, **kw)
        assert guard_ok(), "written outside out"
        assert_close(out, reference.scores(q, k, **kw), dtype, str(list(kw)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_strided_inputs_and_one_row(rng, scores_tiles, dtype):
    """Inputs with non-unit inner strides (strided K packing, scaled), a
    single query row and a single key."""
    q = randn(rng, (2, 21, 3, 32), dtype).swapaxes(1, 2)[..., ::2]
    k = randn(rng, (2, 34, 3, 32), dtype).swapaxes(1, 2)[..., ::2]
    out = poisoned((2, 3, 21, 34), dtype)
    numbattn.scores(q, k, scale=0.3, causal=True, out=out)
    assert_close(out, reference.scores(q, k, scale=0.3, causal=True), dtype)
    for nq, nk in ((1, 34), (21, 1)):
        out = poisoned((2, 3, nq, nk), dtype)
        numbattn.scores(q[..., :nq, :], k[..., :nk, :], out=out)
        assert_close(out, reference.scores(q[..., :nq, :], k[..., :nk, :]), dtype)
