"""Support for Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

The simulator's device arrays (``FakeCUDAArray``) wrap host NumPy arrays and
do not expose ``__cuda_array_interface__``, which numbattn's argument checks
rely on to recognise GPU arrays. :func:`install` gives them one describing
the wrapped host buffer, so the same public API and tests run unchanged on
the simulator. Never used with a real GPU.
"""

from __future__ import annotations

from typing import Any

from .._interop import device_interface, interface_shadow


def _interface(self: Any) -> dict[str, Any]:
    a = self._ary
    return {
        "shape": tuple(a.shape),
        "strides": None if a.flags.c_contiguous else tuple(a.strides),
        "typestr": a.dtype.str,
        "data": (a.__array_interface__["data"][0], not a.flags.writeable),
        "version": 3,
        "stream": None,
    }


def install() -> None:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    if "__cuda_array_interface__" not in FakeCUDAArray.__dict__:
        FakeCUDAArray.__cuda_array_interface__ = property(_interface)


def from_interface(obj: Any) -> Any:
    """A FakeCUDAArray viewing the host memory an interface object describes."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    cai = device_interface(obj)
    if cai is None:
        raise TypeError(f"{type(obj).__qualname__} exposes no __cuda_array_interface__")
    return FakeCUDAArray(interface_shadow(cai))


__all__ = ["from_interface", "install"]
