"""Shared test utilities: tolerances (stated once), poisoning, comparison."""

import threading

import numpy as np

from numbattn.reference import relative_error

#: Relative tolerance ||out - ref|| / ||ref|| against the float64 reference.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

DTYPES = (np.float32, np.float64)


#: ||out - ref|| / ||ref|| over finite reference entries; inf on a shape or
#: non-finite mismatch (the package's one definition).
rel_err = relative_error


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    tol = RTOL[np.dtype(dtype)]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def poisoned(shape, dtype):
    """A new array filled with NaN, so an element the kernel skips fails."""
    return np.full(shape, np.nan, dtype=dtype)


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def device_transpose(arr, axes):
    """A transposed view of a Numba device array (as ``numpy.transpose``).

    Numba's DeviceNDArray transposes only 2-d arrays on a real GPU (its
    simulator allows any), so build the view from shape and strides.
    """
    from numbattn.cuda.backend import restride

    return restride(arr, [arr.shape[a] for a in axes], [arr.strides[a] for a in axes])


def run_threads(worker, n):
    """Run ``worker(i)`` for i < n on n threads at once; return when all end."""
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
