"""Leading batch axes of size 1 between others (issue 8) on GPU arrays:
the reproductions of tests/test_layout.py through the CUDA backend."""

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


def device_view(dbuf, buf, view):
    """The view of device buffer ``dbuf`` that ``view`` is of host buffer ``buf``
    (1-d; any strides, negative or 0 included)."""
    from numbattn.cuda import backend

    start = view.__array_interface__["data"][0] - buf.__array_interface__["data"][0]
    return backend.restride(dbuf[start // buf.itemsize :], view.shape, view.strides)


def check_attention(dtype, q, k, v, **kw):
    lead, nq, dv = q.shape[:-2], q.shape[-2], v.shape[-1]
    out, lse = dev(poisoned(lead + (nq, dv), dtype)), dev(poisoned(lead + (nq,), dtype))
    dkw = {n: (dev(x) if n in ("bias", "mask") else x) for n, x in kw.items()}
    assert numbattn.attention(dev(q), dev(k), dev(v), out=out, lse=lse, **dkw) is out
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    assert_close(host(out), ref_out, dtype, "out")
    assert_close(host(lse), ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_batch_mask_and_bias_with_unit_axis(dtype):
    rng = np.random.default_rng(80)
    b, g, n, d = 2, 3, 5, 4
    q, k, v = (randn(rng, (b, 1, g, n, d), dtype) for _ in range(3))
    mask = np.ones((b, 1, 1, 1, n), bool)
    mask[1, ..., 3:] = False
    check_attention(dtype, q, k, v, mask=mask)
    check_attention(dtype, q, k, v, bias=randn(rng, (b, 1, 1, n, n), dtype))
    s = dev(poisoned((b, 1, g, n, n), dtype))
    numbattn.scores(dev(q), dev(k), mask=dev(mask), out=s)
    assert_close(host(s), reference.scores(q, k, mask=mask), dtype, "scores")


def test_key_lengths_with_unit_axis():
    rng = np.random.default_rng(81)
    q, k, v = (randn(rng, (3, 1, 2, 8, 4), np.float32) for _ in range(3))
    check_attention(np.float32, q, k, v, key_lengths=[8, 2, 5])


def test_softmax_transposed_view_with_unit_axis():
    rng = np.random.default_rng(82)
    buf = randn(rng, 3 * 2 * 6, np.float64)
    x = buf.reshape(3, 2, 6).transpose(1, 0, 2)[:, None]  # (2, 1, 3, 6)
    out = dev(poisoned(x.shape, np.float64))
    numbattn.softmax(device_view(dev(buf), buf, x), out=out)
    assert_close(host(out), reference.softmax(x), np.float64, "softmax")


def test_no_write_past_out_no_read_past_q():
    rng = np.random.default_rng(83)
    dtype = np.float32
    x, v = randn(rng, (2, 1, 3, 8, 4), dtype), randn(rng, (2, 1, 3, 8, 4), dtype)
    buf = np.zeros(20 * 8 * 4, dtype)
    dbuf = dev(buf)
    out = device_view(
        dbuf, buf, buf[: 6 * 8 * 4].reshape(3, 2, 8, 4).transpose(1, 0, 2, 3)[:, None]
    )
    numbattn.attention(dev(x), dev(x), dev(v), out=out)
    got = host(dbuf)
    assert not got[6 * 8 * 4 :].any()
    got_out = got[: 6 * 8 * 4].reshape(3, 2, 8, 4).transpose(1, 0, 2, 3)[:, None]
    assert_close(got_out, reference.attention(x, x, v)[0], dtype, "out")
    qbuf = np.full(20 * 8 * 4, np.nan, dtype)
    qbuf[: 6 * 8 * 4] = randn(rng, 6 * 8 * 4, dtype)
    q_view = qbuf[: 6 * 8 * 4].reshape(3, 2, 8, 4).transpose(1, 0, 2, 3)[:, None]
    out = numbattn.attention(device_view(dev(qbuf), qbuf, q_view), dev(x), dev(v))
    assert_close(host(out), reference.attention(q_view, x, v)[0], dtype, "q view")
