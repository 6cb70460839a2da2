"""The thread pools in the process and their known conflicts with numbattn's.

Behind ``python -m numbattn info``: the BLAS and OpenMP pools that are loaded
(through threadpoolctl, an optional dependency, imported only when present)
and the conflicts that slow numbattn or its neighbours down, each with its
fix. The measurements behind them are in docs/threads.md, "Using numbattn
beside NumPy and PyTorch" (``scripts/neighbours.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def thread_pools() -> list[dict] | None:
    """threadpoolctl's description of every BLAS / OpenMP pool loaded in this
    process (user_api, internal_api, num_threads, version, filepath ...), or
    None when threadpoolctl is not installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    try:
        return [dict(p) for p in threadpool_info()]
    except Exception as exc:  # a broken library must not break `info`
        return [{"user_api": "unknown", "error": f"{type(exc).__name__}: {exc}"}]


def conflicts(
    pools: list[dict] | None,
    layer: str | None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Known conflicts between numbattn's thread pool (Numba threading
    ``layer``) and the other ``pools``, each with its fix."""
    env = os.environ if environ is None else environ
    out = []
    pools = pools or []
    openblas = [p for p in pools if p.get("internal_api") == "openblas"]
    if (
        any(
            (p.get("num_threads") or 1) > 1 and p.get("threading_layer") != "openmp"
            for p in openblas
        )
        and "OPENBLAS_THREAD_TIMEOUT" not in env
    ):
        out.append(
            "OpenBLAS (NumPy's BLAS) keeps its threads spinning for about 2**28 cycles "
            "(~0.1 s) after each call, so a numbattn call right after a NumPy matmul "
            "runs slower. Fix: export OPENBLAS_THREAD_TIMEOUT=4 before starting Python "
            "(or wait ~0.2 s between the two)."
        )
    runtimes = {}
    for p in pools:
        if p.get("user_api") == "openmp":
            runtimes[os.path.realpath(p.get("filepath") or "")] = p.get("internal_api")
    if len(runtimes) > 1:
        names = ", ".join(f"{api} ({os.path.basename(f)})" for f, api in runtimes.items())
        out.append(
            f"{len(runtimes)} OpenMP runtimes are loaded ({names}); whichever starts its "
            "threads second can run many times slower (torch imported after numbattn's "
            "first call: ~20x). Fix: import torch before numbattn's first call, or set "
            "NUMBA_THREADING_LAYER=workqueue."
        )
    if layer == "workqueue":
        out.append(
            "Numba's workqueue layer cannot run two parallel kernels at once: numbattn "
            "serialises concurrent calls from Python threads. Install tbb (pip install "
            "tbb) or use the omp layer for concurrent calls."
        )
    return out
