"""Every public function's numpydoc "Raises" section is true.

Each documented exception type is provoked here by a bad call (the fixed
list ``BAD_CALLS``), and the list must name exactly the types the docstring
names: a docstring cannot list an exception that no call provokes, and a
new entry in a docstring needs a call here that raises it. The bad calls
fail validation, before any kernel is compiled, so this is quick.
"""

import inspect
import re

import numpy as np
import pytest

import numbattn

F32 = np.float32


def _qkv(shape=(1, 2, 4, 8)):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal(shape, dtype=F32) for _ in range(3))


def _packed(t=6, h=2, d=8):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((t, h, d), dtype=F32) for _ in range(3))


def _cu(*ends, dtype=np.int32):
    return np.array([0, *ends], dtype=dtype)


def _grads(q, k, v):
    out = np.zeros_like(q)
    lse = np.zeros(q.shape[:-1], q.dtype)
    return out, lse, np.zeros_like(out)


def _paged(block_table=None, key_lengths=(5,)):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 1, 8), dtype=F32)
    kc, vc = (rng.standard_normal((3, 4, 2, 8), dtype=F32) for _ in range(2))
    table = np.array([[0, 1]], np.int32) if block_table is None else block_table
    return q, kc, vc, table, np.array(key_lengths)


def _torch_bias_requires_grad():
    torch = pytest.importorskip("torch")
    import numbattn.torch

    q, k, v = (torch.zeros(1, 1, 4, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
    numbattn.torch.attention(q, k, v, bias=bias)


def _torch_numpy_input():
    pytest.importorskip("torch")
    import numbattn.torch

    numbattn.torch.attention(*_qkv())


def _dask_numpy_input():
    pytest.importorskip("dask")
    import numbattn.dask

    numbattn.dask.attention(*_qkv())


def _dask_split_every_1():
    da = pytest.importorskip("dask.array")
    import numbattn.dask

    q, k, v = (da.from_array(x) for x in _qkv())
    numbattn.dask.attention(q, k, v, split_every=1)


def _torch_fn():
    pytest.importorskip("torch")
    import numbattn.torch

    return numbattn.torch.attention


def _dask_fn():
    pytest.importorskip("dask")
    import numbattn.dask

    return numbattn.dask.attention


#: function name -> {documented exception type: a call that raises it}
BAD_CALLS = {
    "scores": {
        TypeError: lambda: numbattn.scores(_qkv()[0], _qkv()[1].astype(np.float64)),
        ValueError: lambda: numbattn.scores(_qkv()[0], _qkv((1, 2, 4, 4))[1]),
    },
    "softmax": {
        TypeError: lambda: numbattn.softmax(np.arange(6).reshape(2, 3)),
        ValueError: lambda: numbattn.softmax(np.array(1.0, F32)),
    },
    "attention": {
        TypeError: lambda: numbattn.attention(*_qkv(), num_splits="2"),
        ValueError: lambda: numbattn.attention(*_qkv(), num_splits=0),
    },
    "varlen_attention": {
        TypeError: lambda: numbattn.varlen_attention(
            *_packed(), _cu(6, dtype=F32), _cu(6, dtype=F32)
        ),
        ValueError: lambda: numbattn.varlen_attention(
            *_packed(), np.array([1, 6], np.int32), np.array([1, 6], np.int32)
        ),
    },
    "merge_attention": {
        TypeError: lambda: numbattn.merge_attention(["out"], ["lse"]),
        ValueError: lambda: numbattn.merge_attention([], []),
    },
    "paged_attention": {
        TypeError: lambda: numbattn.paged_attention(*_paged(np.array([[0, 1]], F32))),
        ValueError: lambda: numbattn.paged_attention(*_paged(key_lengths=(12,))),
    },
    "attention_backward": {
        TypeError: lambda: numbattn.attention_backward(
            *_qkv(), *_grads(*_qkv())[:2], np.zeros((1, 2, 4, 8), np.int64)
        ),
        ValueError: lambda: numbattn.attention_backward(
            *_qkv(), *_grads(*_qkv())[:2], np.zeros((1, 2, 4, 7), F32)
        ),
    },
    "varlen_attention_backward": {
        TypeError: lambda: numbattn.varlen_attention_backward(
            *_packed(), *_grads(*_packed()), _cu(6, dtype=F32), _cu(6, dtype=F32)
        ),
        ValueError: lambda: numbattn.varlen_attention_backward(
            *_packed(), *_grads(*_packed()), np.array([1, 6], np.int32), _cu(6)
        ),
    },
    "torch.attention": {TypeError: _torch_numpy_input, ValueError: _torch_bias_requires_grad},
    "dask.attention": {TypeError: _dask_numpy_input, ValueError: _dask_split_every_1},
}

FUNCTIONS = {
    **{name: lambda name=name: getattr(numbattn, name) for name in numbattn.__all__},
    "torch.attention": _torch_fn,
    "dask.attention": _dask_fn,
}


def documented_raises(fn) -> set[str]:
    doc = inspect.getdoc(fn) or ""
    m = re.search(r"^Raises\n-+\n(.*?)(?=^\w[^\n]*\n-+\n|\Z)", doc, re.S | re.M)
    return set(re.findall(r"^(\w+)\s*$", m.group(1), re.M)) if m else set()


def test_every_public_function_is_covered():
    public = {n for n in numbattn.__all__ if inspect.isfunction(getattr(numbattn, n))}
    documented = {n for n in public if documented_raises(getattr(numbattn, n))}
    assert documented <= set(BAD_CALLS)
    assert documented == public - {"cuda_available", "cuda_problem"}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_raises_section_lists_exactly_the_provoked_types(name):
    fn = FUNCTIONS[name]()
    assert documented_raises(fn) == {t.__name__ for t in BAD_CALLS[name]}


@pytest.mark.parametrize(
    ("name", "exc"),
    [(name, exc) for name, calls in sorted(BAD_CALLS.items()) for exc in calls],
    ids=lambda x: x if isinstance(x, str) else x.__name__,
)
def test_documented_exception_is_raised(name, exc):
    with pytest.raises(exc) as info:
        BAD_CALLS[name][exc]()
    assert type(info.value) is exc  # not a subclass standing in for it
    # raised by numbattn's checks, not by a bad signature or by this file
    raised_in = str(info.traceback[-1].path)
    assert "/numbattn/" in raised_in and "/tests/" not in raised_in, raised_in


def test_never_raises_as_documented():
    for fn in (numbattn.cuda_available, numbattn.cuda_problem):
        assert "never raises" in (inspect.getdoc(fn) or "").lower()
        fn()
