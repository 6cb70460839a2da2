"""Geometries that cannot launch are refused before launch with a ValueError
naming the numbattn.config knob, never a CUDA error, and nothing is written.

Runs on the simulator (on top of conftest's small tiles) and on a GPU.
"""

import types

import numpy as np
import pytest

import numbattn
from tests.helpers import poisoned, randn

cuda = pytest.importorskip("numba.cuda")


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def _case(kernel, dtype):
    """(call, outs): ``call()`` runs ``kernel`` on tiny device inputs into the
    NaN-poisoned device arrays ``outs``."""
    rng = np.random.default_rng(0)
    q, k, v = (dev(randn(rng, (1, 2, 5, 4), dtype)) for _ in range(3))
    if kernel == "backward":
        lse = dev(poisoned((1, 2, 5), dtype))
        out = numbattn.attention(q, k, v, causal=True, lse=lse)
        dout = dev(randn(rng, (1, 2, 5, 4), dtype))
        grads = [dev(poisoned((1, 2, 5, 4), dtype)) for _ in range(3)]

        def backward():
            numbattn.attention_backward(
                q, k, v, out, lse, dout, causal=True, dq=grads[0], dk=grads[1], dv=grads[2]
            )

        return backward, grads
    if kernel == "decode":
        # One query per head, two query heads on one KV head: the streaming
        # kernel, one block (so num_splits=None weighs a split, reading
        # CUDA_MIN_SPLIT_KEYS).
        q1 = dev(randn(rng, (1, 2, 1, 4), dtype))
        k1, v1 = (dev(randn(rng, (1, 1, 5, 4), dtype)) for _ in range(2))
        out = dev(poisoned((1, 2, 1, 4), dtype))
        return lambda: numbattn.attention(q1, k1, v1, out=out), [out]
    if kernel == "attention":
        out = dev(poisoned((1, 2, 5, 4), dtype))
        return lambda: numbattn.attention(q, k, v, causal=True, out=out), [out]
    if kernel == "varlen":
        packed = [dev(randn(rng, (5, 2, 4), dtype)) for _ in range(3)]
        out = dev(poisoned((5, 2, 4), dtype))
        cu = np.array([0, 2, 5])
        return lambda: numbattn.varlen_attention(*packed, cu, cu, causal=True, out=out), [out]
    if kernel == "scores":
        out = dev(poisoned((1, 2, 5, 5), dtype))
        return lambda: numbattn.scores(q, k, out=out), [out]
    x = dev(randn(rng, (1, 2, 5), dtype))
    out = dev(poisoned((1, 2, 5), dtype))
    return lambda: numbattn.softmax(x, out=out), [out]


BAD = [
    # (kernel, dtype, {knob: value}, message)
    ("attention", "float32", {"CUDA_QUERY_TILE": 0},
     r"CUDA_QUERY_TILE must be a positive integer, got 0"),
    ("attention", "float32", {"CUDA_KEY_TILE": -8}, r"CUDA_KEY_TILE must be a positive"),
    ("attention", "float32", {"CUDA_HEAD_CHUNK": 8.0}, r"CUDA_HEAD_CHUNK must be a positive"),
    ("attention", "float32", {"CUDA_VALUE_CHUNK": True}, r"CUDA_VALUE_CHUNK must be a positive"),
    ("attention", "float32", {"CUDA_KEYS_PER_THREAD": "4"}, r"CUDA_KEYS_PER_THREAD must be"),
    ("attention", "float64", {"CUDA_QUERY_TILE_F64": None}, r"CUDA_QUERY_TILE_F64 must be"),
    ("attention", "float32", {"CUDA_ROWS_PER_THREAD": 3},
     r"CUDA_ROWS_PER_THREAD must divide numbattn.config.CUDA_QUERY_TILE = 8, got 3"),
    ("attention", "float64", {"CUDA_KEYS_PER_THREAD": 16},
     r"CUDA_KEYS_PER_THREAD must divide numbattn.config.CUDA_KEY_TILE_F64 = 8, got 16"),
    ("attention", "float32", {"CUDA_QUERY_TILE": 1024, "CUDA_ROWS_PER_THREAD": 1},
     r"2048 threads per block \(the limit is 1024\).*CUDA_QUERY_TILE"),
    ("attention", "float64", {"CUDA_QUERY_TILE_F64": 4096, "CUDA_ROWS_PER_THREAD_F64": 1},
     r"8192 threads per block"),
    ("attention", "float32", {"CUDA_HEAD_CHUNK": 4096},
     r"bytes of static shared memory \(the limit is 49152\).*CUDA_HEAD_CHUNK"),
    ("attention", "float32", {"CUDA_VALUE_CHUNK": 1 << 20}, r"static shared memory"),
    ("varlen", "float32", {"CUDA_KEY_TILE": 10**9, "CUDA_KEYS_PER_THREAD": 1},
     r"threads per block"),
    ("scores", "float32", {"CUDA_SCORES_TILE": 256, "CUDA_SCORES_PER_THREAD": 4},
     r"4096 threads per block \(the limit is 1024\).*CUDA_SCORES_PER_THREAD"),
    ("scores", "float64", {"CUDA_SCORES_HEAD_CHUNK": 1024},
     r"bytes of static shared memory \(the limit is 49152\).*CUDA_SCORES_HEAD_CHUNK"),
    ("scores", "float32", {"CUDA_SCORES_PER_THREAD": 3},
     r"CUDA_SCORES_PER_THREAD must divide numbattn.config.CUDA_SCORES_TILE = 8, got 3"),
    ("scores", "float64", {"CUDA_SCORES_TILE": -1}, r"CUDA_SCORES_TILE must be a positive"),
    ("scores", "float32", {"CUDA_SCORES_HEAD_CHUNK": 0}, r"CUDA_SCORES_HEAD_CHUNK must be a pos"),
    ("softmax", "float32", {"CUDA_SOFTMAX_THREADS": 2048},
     r"CUDA_SOFTMAX_THREADS must be a power of two between 1 and 1024.*got 2048"),
    ("softmax", "float64", {"CUDA_SOFTMAX_THREADS": 100}, r"power of two.*got 100"),
    ("softmax", "float32", {"CUDA_SOFTMAX_THREADS": 0}, r"CUDA_SOFTMAX_THREADS must be a pos"),
    ("softmax", "float64", {"CUDA_SOFTMAX_CACHE_BYTES": 10**6},
     r"CUDA_SOFTMAX_CACHE_BYTES is too large.*the limit is 49152"),
    ("softmax", "float32", {"CUDA_SOFTMAX_CACHE_BYTES": 0}, r"CUDA_SOFTMAX_CACHE_BYTES must be"),
    # The backward and streaming kernels' knobs: checked as the others, before
    # the first launch (the backward's query kernel writes dq before the key
    # kernel is chosen).
    ("backward", "float32", {"CUDA_BWD_FAST_LOOP": 1},
     r"CUDA_BWD_FAST_LOOP must be True or False, got 1"),
    ("backward", "float32", {"CUDA_BWD_FAST_LOOP": "False"},
     r"CUDA_BWD_FAST_LOOP must be True or False, got 'False'"),
    ("backward", "float64", {"CUDA_BWD_FAST_LOOP": None}, r"CUDA_BWD_FAST_LOOP must be True or"),
    ("backward", "float32", {"CUDA_BWD_ROW_TILE": 0},
     r"CUDA_BWD_ROW_TILE must be a positive integer, got 0"),
    ("backward", "float64", {"CUDA_BWD_COLS_PER_THREAD_F64": 2.0},
     r"CUDA_BWD_COLS_PER_THREAD_F64 must be a positive integer, got 2.0"),
    ("backward", "float32", {"CUDA_BWD_ROWS_PER_THREAD": 3},
     r"CUDA_BWD_ROWS_PER_THREAD must divide numbattn.config.CUDA_BWD_ROW_TILE"),
    ("decode", "float32", {"CUDA_STREAM_ROWS": -1},
     r"CUDA_STREAM_ROWS must be an integer >= 0, got -1"),
    ("decode", "float32", {"CUDA_STREAM_ROWS": 4.0}, r"CUDA_STREAM_ROWS must be an integer >= 0"),
    ("decode", "float32", {"CUDA_MIN_SPLIT_KEYS": 0},
     r"CUDA_MIN_SPLIT_KEYS must be a positive integer, got 0"),
    ("decode", "float64", {"CUDA_DECODE_KEYS_F64": True},
     r"CUDA_DECODE_KEYS_F64 must be a positive integer, got True"),
    ("decode", "float32", {"CUDA_DECODE_ROWS": "4"}, r"CUDA_DECODE_ROWS must be a positive"),
]  # fmt: skip


@pytest.mark.parametrize("kernel, dtype, knobs, message", BAD)
def test_silly_config_is_a_value_error(kernel, dtype, knobs, message, monkeypatch):
    if kernel == "decode":
        monkeypatch.setattr(numbattn.config, "CUDA_STREAM_ROWS", 16)  # conftest: 0
    call, outs = _case(kernel, dtype)
    call()  # the conftest's small tiles launch
    for out in outs:
        out.copy_to_device(poisoned(out.shape, dtype))
    for name, value in knobs.items():
        monkeypatch.setattr(numbattn.config, name, value)
    with pytest.raises(ValueError, match=message):
        call()
    for out in outs:
        assert np.isnan(out.copy_to_host()).all(), "written before the error"


@pytest.mark.parametrize("value", [False, np.bool_(True)])
def test_fast_loop_knob_takes_bools(value, monkeypatch):
    """CUDA_BWD_FAST_LOOP: Python and NumPy bools are accepted (and the call
    writes its gradients)."""
    call, grads = _case("backward", "float32")
    monkeypatch.setattr(numbattn.config, "CUDA_BWD_FAST_LOOP", value)
    call()
    for g in grads:
        assert np.isfinite(g.copy_to_host()).all()


def test_valid_geometries_still_run(monkeypatch):
    """Edge values that can launch: one thread per block."""
    for name, value in dict(CUDA_QUERY_TILE=1, CUDA_KEY_TILE=1, CUDA_ROWS_PER_THREAD=1,
                            CUDA_KEYS_PER_THREAD=1, CUDA_HEAD_CHUNK=1, CUDA_VALUE_CHUNK=1,
                            CUDA_SOFTMAX_THREADS=1).items():  # fmt: skip
        monkeypatch.setattr(numbattn.config, name, value)
    rng = np.random.default_rng(2)
    q, k, v = (randn(rng, (1, 1, 3, 2), np.float32) for _ in range(3))
    ref, _ = numbattn.reference.attention(q, k, v, causal=True)
    out = numbattn.attention(dev(q), dev(k), dev(v), causal=True)
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-5, atol=1e-6)
    x = randn(rng, (2, 3), np.float32)
    np.testing.assert_allclose(
        numbattn.softmax(dev(x)).copy_to_host(), numbattn.reference.softmax(x), rtol=1e-5
    )


def attention_kernel():  # named like the kernel, for the hint
    pass


def test_compiled_kernel_too_big_for_its_block():
    """On a GPU the compiled kernel's limit (registers x threads, shared memory)
    is checked at its first launch: too many threads is a ValueError."""
    from numbattn.cuda import backend

    kern = types.SimpleNamespace(py_func=attention_kernel)
    compiled = types.SimpleNamespace(
        max_threads_per_block=256, regs_per_thread=255, shared_mem_per_block=1024
    )
    backend.check_compiled(kern, compiled, 256)
    with pytest.raises(ValueError) as info:
        backend.check_compiled(kern, compiled, 512)
    msg = str(info.value)
    assert "255 registers per thread" in msg and "1024 bytes of shared memory" in msg
    assert "at most 256 threads per block" in msg and "asks for 512" in msg
    assert "CUDA_QUERY_TILE" in msg


def test_production_kernels_fit_their_blocks():
    """At the shipped geometry every kernel's block launches (registers known
    only on a GPU: there, the compiled kernels' limits are checked too)."""
    import importlib

    from numbattn.cuda import backend, limits

    importlib.reload(numbattn.config)  # the shipped values (small_tiles restores its own)
    for dtype in (np.float32, np.float64):
        for launch in backend.kernel_launches(dtype):
            assert launch["threads"] <= limits.MAX_THREADS_PER_BLOCK
            if not backend.simulator():
                compiled = launch["dispatcher"].compile(launch["signature"])
                backend.check_compiled(launch["dispatcher"], compiled, launch["threads"])
                problem = limits.launch_problem(
                    launch["threads"], compiled.shared_mem_per_block, compiled.regs_per_thread
                )
                assert problem is None, (launch["kernel"], problem)
