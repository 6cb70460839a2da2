"""Host side of the CPU backend: buffers, tile sizes and kernel calls."""

from __future__ import annotations

import threading

import numpy as np

from .. import config
from .._layout import host_index as index  # noqa: F401  (backend interface)
from .._layout import host_restride as restride  # noqa: F401

name = "cpu"

# Numba's fallback "workqueue" threading layer crashes when two Python threads
# launch parallel kernels at once; omp and tbb are safe. Serialise only then.
_workqueue_lock = threading.Lock()


def _call(kernel, *args):
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet in this process
        layer = None
    if layer in (None, "workqueue"):
        with _workqueue_lock:
            kernel(*args)
    else:
        kernel(*args)


def resolve_stream(stream, arrays):
    if stream is not None:
        raise ValueError("stream applies to GPU arrays only; got a stream with host (NumPy) arrays")
    return None


def as_kernel_array(obj, stream=None):
    return obj


def empty(shape, dtype, like=None, stream=None):
    arr = np.empty(shape, dtype=dtype)
    return arr, arr


def scores(q, k, out, scale, causal, stream=None):
    from .kernels import scores_kernel

    _call(scores_kernel, q, k, out, scale, causal, config.CPU_QUERY_TILE, config.CPU_KEY_TILE)


def softmax(x, out, stream=None):
    from .kernels import softmax_kernel

    _call(softmax_kernel, x, out)


def attention(q, k, v, out, lse, scale, causal, stream=None):
    from .kernels import attention_kernel

    _call(
        attention_kernel,
        q,
        k,
        v,
        out,
        lse,
        scale,
        causal,
        config.CPU_QUERY_TILE,
        config.CPU_KEY_TILE,
    )
