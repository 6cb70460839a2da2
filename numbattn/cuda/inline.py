"""Building device functions: the one place that knows whether the CUDA
simulator runs and how a helper is inlined into its kernel (a leaf: the
kernel modules import it, it imports none of them)."""

from __future__ import annotations

from numba import cuda


def _on_simulator() -> bool:
    from numba.cuda.core import config as ncfg

    return bool(ncfg.ENABLE_CUDASIM)


def _device(fn):
    """``fn`` as a device function inlined into its caller (the simulator
    takes no ``forceinline``)."""
    opts = {} if _on_simulator() else {"forceinline": True}
    return cuda.jit(device=True, **opts)(fn)
