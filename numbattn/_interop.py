"""Array interop shared by both backends: host views of GPU arrays.

A leaf module (imports NumPy only, never a backend). A GPU argument is
inspected through a *shadow*: a NumPy array with the same shape, strides,
dtype and address, built from its ``__cuda_array_interface__``. A shadow is
never read or written, only inspected (shape, dtype, flags and address
arithmetic for overlap).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class _ArrayInterfaceView:
    """Exposes a CUDA array interface as a host ``__array_interface__``."""

    def __init__(self, cai: dict[str, Any]) -> None:
        self.__array_interface__ = {
            "shape": tuple(cai["shape"]),
            "typestr": cai["typestr"],
            "data": (cai["data"][0], bool(cai["data"][1])),
            "strides": cai.get("strides"),
            "version": 3,
        }


def _numba_device_array(obj: object) -> bool:
    module = type(obj).__module__
    return module.startswith(("numba.cuda", "numba_cuda")) and hasattr(obj, "strides")


def device_interface(obj: object) -> dict[str, Any] | None:
    """The ``__cuda_array_interface__`` of ``obj``, or None for host objects.

    Numba's device arrays report ``strides: None`` (C-contiguous) whenever
    they are contiguous *ignoring zero-stride axes* (numba-cuda 0.30's
    ``is_contiguous``), so a broadcast view such as ``(2, 2, 2, 1)`` with
    strides ``(8, 4, 0, 0)`` would be read as a dense array (found on an
    H200: wrong scores, stray reads). Their real strides are used instead.
    """
    try:
        cai = obj.__cuda_array_interface__  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError, TypeError):
        return None
    if cai.get("strides") is None and _numba_device_array(obj):
        cai = dict(cai, strides=tuple(int(s) for s in obj.strides))  # type: ignore[attr-defined]
    return cai


def interface_shadow(cai: dict[str, Any]) -> np.ndarray:
    """The host shadow described by a ``__cuda_array_interface__`` dict."""
    shape = tuple(cai["shape"])
    if math.prod(shape) == 0 or cai["data"][0] == 0:
        # NumPy refuses a NULL pointer; an empty array has no address anyway.
        arr = np.empty(shape, dtype=np.dtype(cai["typestr"]))
        if cai["data"][1]:
            arr.flags.writeable = False
        return arr
    return np.asarray(_ArrayInterfaceView(cai))


def looks_like_device_array(obj: object) -> bool:
    """A GPU array: it has an interface, or it is one of Numba's device arrays
    (whose simulator twin has no interface until the CUDA backend adds one)."""
    return device_interface(obj) is not None or type(obj).__module__.startswith("numba.cuda")
