"""Leading batch axes of size 1 between others (issue 8) on GPU arrays:
the reproductions of tests/test_layout.py through the CUDA backend."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numbattn
from numbattn import reference
from tests.helpers import DTYPES, assert_close, poisoned, randn
from tests.layouts import Carved, attention_problems, layouts, leading_shapes

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
    return backend.view_at(dbuf, start, view.shape, view.strides)


def address(arr):
    """Address of element 0 of a device array (host memory on the simulator)."""
    if hasattr(arr, "_ary"):  # the simulator's FakeCUDAArray
        return arr._ary.__array_interface__["data"][0]
    return arr.device_ctypes_pointer.value or 0


@pytest.mark.parametrize(
    "idx",
    [
        (1,),
        (1, 2),
        (slice(None, None, -1),),
        (Ellipsis, slice(1, 3)),
        (slice(None), slice(3, 0, -2), 0),
        (0, slice(2, 2)),
    ],
)
def test_index_is_numpy_basic_indexing(idx):
    """backend.index (O(1), unlike Numba's __getitem__ on non-contiguous
    results) gives NumPy's shape, strides and element-0 address, on a
    transposed, negatively strided view too."""
    from numbattn.cuda import backend

    host_buf = np.arange(2 * 5 * 4 * 3, dtype=np.float32)
    dbuf = dev(host_buf)
    for view in (
        host_buf.reshape(2, 5, 4, 3),
        host_buf.reshape(5, 2, 3, 4).transpose(1, 0, 3, 2)[:, ::-1],
    ):
        darr = device_view(dbuf, host_buf, view)
        want = view[idx]
        got = backend.index(darr, idx)
        assert (got.shape, got.strides) == (want.shape, want.strides)
        if want.size:
            offset = want.__array_interface__["data"][0] - host_buf.__array_interface__["data"][0]
            assert address(got) == address(dbuf) + offset


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


# ---------------------------------------------------------------- properties
#
# tests/test_layout.py's property tests, smaller: every argument in a random
# layout inside a guarded device buffer (size-1 leading axes anywhere,
# transposes, steps, negative steps, broadcast inputs). At least two leading
# axes of size > 1, so that few examples suffice to reach unit axes between.

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class OnDevice:
    """A Carved array's buffer on the device, and the same view of it."""

    def __init__(self, carved):
        self.carved = carved
        self.dbuf = dev(carved.buf)
        self.view = device_view(self.dbuf, carved.buf, carved.view)

    def back(self):
        """(buffer, view) copied back to the host."""
        buf = host(self.dbuf)
        return buf, self.carved.on(buf)


def _carve(data, rng, shape, dtype, output=False):
    layout = data.draw(layouts(len(shape), broadcast=not output))
    if output:
        return Carved(shape, dtype, layout, np.nan, writeable=True)
    if np.dtype(dtype) == np.bool_:
        return Carved(shape, dtype, layout, True, lambda s: rng.random(s) < 0.7)
    return Carved(shape, dtype, layout, np.nan, lambda s: randn(rng, s, dtype))


def _run(fn, inputs, outputs, **kw):
    """Call ``fn`` on device copies; check guards; host views of the outputs."""
    d_in = {n: OnDevice(c) for n, c in inputs.items()}
    d_out = {n: OnDevice(c) for n, c in outputs.items()}
    args = {n: d.view for n, d in d_in.items()}
    fn(**args, **{n: d.view for n, d in d_out.items()}, **kw)
    for n, d in d_in.items():
        assert d.carved.unchanged(host(d.dbuf)), f"input {n} was written"
    got = {}
    for n, d in d_out.items():
        buf, got[n] = d.back()
        assert d.carved.untouched(buf), f"written outside {n}"
    return got


@SETTINGS
@given(attention_problems(max_batch=6, min_sizes=2, max_nq=10, max_nk=10), st.data())
def test_attention_any_layout(problem, data):
    shapes, opts, dtype = problem
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    inputs = {n: _carve(data, rng, s, dtype) for n, s in shapes.items()}
    for name, kind in (("bias", dtype), ("mask", np.bool_)):
        if name in opts:
            inputs[name] = _carve(data, rng, opts.pop(name), kind)
    lead, nq = shapes["q"][:-2], shapes["q"][-2]
    outputs = {
        "out": _carve(data, rng, lead + (nq, shapes["v"][-1]), dtype, output=True),
        "lse": _carve(data, rng, lead + (nq,), dtype, output=True),
    }
    got = _run(numbattn.attention, inputs, outputs, **opts)
    ref_out, ref_lse = reference.attention(**{n: c.view for n, c in inputs.items()}, **opts)
    assert_close(got["out"], ref_out, dtype, "out")
    assert_close(got["lse"], ref_lse, dtype, "lse")


@SETTINGS
@given(attention_problems(with_v=False, max_batch=6, min_sizes=2, max_nq=6, max_nk=6), st.data())
def test_scores_any_layout(problem, data):
    shapes, opts, dtype = problem
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    inputs = {n: _carve(data, rng, s, dtype) for n, s in shapes.items()}
    for name, kind in (("bias", dtype), ("mask", np.bool_)):
        if name in opts:
            inputs[name] = _carve(data, rng, opts.pop(name), kind)
    shape = shapes["q"][:-1] + (shapes["k"][-2],)
    outputs = {"out": _carve(data, rng, shape, dtype, output=True)}
    got = _run(numbattn.scores, inputs, outputs, **opts)
    ref = reference.scores(**{n: c.view for n, c in inputs.items()}, **opts)
    assert_close(got["out"], ref, dtype, "scores")


@SETTINGS
@given(leading_shapes(max_size=6, min_sizes=2), st.integers(0, 12), st.data())
def test_softmax_and_merge_any_layout(lead, n, data):
    dtype = np.float32
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    inputs = {"x": _carve(data, rng, lead + (n,), dtype)}
    outputs = {"out": _carve(data, rng, lead + (n,), dtype, output=True)}
    got = _run(numbattn.softmax, inputs, outputs)
    assert_close(got["out"], reference.softmax(inputs["x"].view), dtype, "softmax")
    nq, dv = max(n // 3, 1), 3
    parts = {
        n: _carve(data, rng, lead + (nq, dv) if n[0] == "o" else lead + (nq,), dtype)
        for n in ("o1", "l1", "o2", "l2")
    }
    outputs = {
        "out": _carve(data, rng, lead + (nq, dv), dtype, output=True),
        "lse": _carve(data, rng, lead + (nq,), dtype, output=True),
    }

    def merge(o1, l1, o2, l2, out, lse):
        numbattn.merge_attention([o1, o2], [l1, l2], out=out, lse=lse)

    got = _run(merge, parts, outputs)
    views = {n: c.view for n, c in parts.items()}
    ref_out, ref_lse = reference.merge_attention(
        [views["o1"], views["o2"]], [views["l1"], views["l2"]]
    )
    assert_close(got["out"], ref_out, dtype, "merged out")
    assert_close(got["lse"], ref_lse, dtype, "merged lse")
