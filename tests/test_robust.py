"""Robustness (issue 8, item 6): rough edges of validation (masked arrays,
byte order, huge scale)."""

from fractions import Fraction

import numpy as np
import pytest

import numbattn

# ---------------------------------------------------------------------------
# 6. Rough edges
# ---------------------------------------------------------------------------


def _qkv(dtype=np.float32):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, 3, 5, 4)).astype(dtype) for _ in range(3))


@pytest.mark.parametrize("which", ["q", "k", "v", "out", "bias"])
def test_masked_array_refused(which):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    if which in ("out", "bias"):
        shape = (2, 3, 5, 4) if which == "out" else (5, 5)
        args[which] = np.ma.masked_array(np.zeros(shape, np.float32), mask=False)
    else:
        args[which] = np.ma.masked_array(args[which], mask=args[which] > 0)
    with pytest.raises(
        TypeError, match=rf"{which} is a numpy.ma.MaskedArray.*mask would be ignored"
    ):
        numbattn.attention(**args)


def test_masked_array_refused_everywhere():
    q, k, _ = _qkv()
    m = np.ma.masked_array(q, mask=q > 0)
    with pytest.raises(TypeError, match=r"x is a numpy.ma.MaskedArray"):
        numbattn.softmax(m)
    with pytest.raises(TypeError, match=r"k is a numpy.ma.MaskedArray"):
        numbattn.scores(q, np.ma.masked_array(k))
    with pytest.raises(TypeError, match=r"key_lengths is a numpy.ma.MaskedArray"):
        numbattn.attention(q, k, k, key_lengths=np.ma.masked_array([1, 2]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_native_byte_order(dtype):
    dt = np.dtype(dtype).newbyteorder("S")  # swapped: '>f4' on little-endian machines
    q, k, v = (x.astype(dt) for x in _qkv(dt.newbyteorder("=")))
    msg = rf"q has non-native byte order {dt.str}: .* q.astype\(q.dtype.newbyteorder\('='\)\)"
    with pytest.raises(TypeError, match=msg):
        numbattn.attention(q, k, v)
    native = [x.astype(x.dtype.newbyteorder("=")) for x in (q, k, v)]
    out = np.empty(native[0].shape, dt)
    with pytest.raises(TypeError, match=rf"out has non-native byte order {dt.str}"):
        numbattn.attention(*native, out=out)


def test_non_native_cu_seqlens_accepted():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 2, 4))
    cu = np.array([0, 2, 5], dtype=np.dtype(np.int32).newbyteorder("S"))
    expected = numbattn.varlen_attention(q, q, q, cu.astype(np.int32), cu.astype(np.int32))
    np.testing.assert_array_equal(numbattn.varlen_attention(q, q, q, cu, cu), expected)


@pytest.mark.parametrize("scale", [10**400, -(10**400)], ids=["1e400", "-1e400"])
def test_huge_scale_is_a_value_error(scale):
    q, k, v = _qkv()
    for s in (scale, Fraction(scale, 3)):
        with pytest.raises(ValueError, match=r"scale must be finite, got a value too large"):
            numbattn.attention(q, k, v, scale=s)
        with pytest.raises(ValueError, match=r"scale must be finite"):
            numbattn.scores(q, k, scale=s)
