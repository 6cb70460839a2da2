"""numbattn._pools: the known thread-pool conflicts that `info` warns about."""

from numbattn import _pools

OPENBLAS = {"user_api": "blas", "internal_api": "openblas", "num_threads": 2,
            "threading_layer": "pthreads", "filepath": "/x/libscipy_openblas.so"}  # fmt: skip
GOMP_TORCH = {"user_api": "openmp", "internal_api": "openmp", "num_threads": 2,
              "filepath": "/x/torch/lib/libgomp-a34b3233.so.1"}  # fmt: skip
GOMP_SYS = {"user_api": "openmp", "internal_api": "openmp", "num_threads": 2,
            "filepath": "/usr/lib/libgomp.so.1"}  # fmt: skip


def test_openblas_spin_warning_and_its_fix():
    (w,) = _pools.conflicts([OPENBLAS], "omp", environ={})
    assert "OPENBLAS_THREAD_TIMEOUT" in w
    assert _pools.conflicts([OPENBLAS], "omp", environ={"OPENBLAS_THREAD_TIMEOUT": "4"}) == []
    one = dict(OPENBLAS, num_threads=1)  # one thread: nothing spins beside numbattn
    assert _pools.conflicts([one], "omp", environ={}) == []


def test_two_openmp_runtimes():
    (w,) = _pools.conflicts([GOMP_TORCH, GOMP_SYS], "omp", environ={})
    assert "2 OpenMP runtimes" in w and "import torch before" in w
    assert _pools.conflicts([GOMP_SYS, dict(GOMP_SYS)], "omp", environ={}) == []


def test_workqueue_serialises():
    (w,) = _pools.conflicts([], "workqueue", environ={})
    assert "serialises" in w
    assert _pools.conflicts(None, "tbb", environ={}) == []


def test_thread_pools_lists_numpys_blas():
    import numpy  # noqa: F401

    pools = _pools.thread_pools()
    if pools is not None:  # threadpoolctl installed
        assert any(p.get("user_api") == "blas" for p in pools)
