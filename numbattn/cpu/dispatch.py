"""The one-layout dispatcher of the CPU kernels (pure Python, no kernel code).

:class:`OneLayoutKernel` wraps an ``@njit`` dispatcher so that one
'A'-layout specialisation per dtype serves every array layout; see the
"One specialisation per dtype" and "Serial twin" points of
:mod:`numbattn.cpu.kernels`. The signature it compiles is built from the
kernel's typed argument description (:mod:`numbattn.cpu.args`).

Kept apart from the kernels' file on purpose: Numba's on-disk cache is
invalidated by the stamp of the file that defines a jitted function only,
so the jitted helpers the kernels call stay in ``kernels.py`` with them.
"""

import functools

import numpy as np
from numba import types

from .._jit import njit, serial_copy
from .args import arg_kinds

_ELEMENT = {
    "bool": (types.boolean, np.dtype(np.bool_)),
    "int": (types.int64, np.dtype(np.int64)),
    "int32": (types.int32, np.dtype(np.int32)),
}


class OneLayoutKernel:
    """Callable wrapper that runs one 'A'-layout specialisation per dtype.

    ``args_type`` (a NamedTuple of :mod:`numbattn.cpu.args`) describes the
    positional arguments; its fields' kinds (:func:`numbattn.cpu.args.arg_kinds`)
    are ``(role, ndim)`` for an array of the call's float dtype, ``role``
    being ``'in'`` (read-only) or ``'out'`` (writable); ``('bool', ndim)`` /
    ``('int', ndim)`` for a read-only bool / int64 array (mask, sequence
    table); or the name of a Numba scalar type. The float dtype is that of the first
    argument. Calls whose arrays do not match these dtypes fall back to the
    dispatcher. ``serial_options``: the ``njit`` options of the serial twin.
    """

    def __init__(self, dispatcher, args_type, serial_options):
        self._dispatcher = dispatcher
        self._serial_options = serial_options
        self.args_type = args_type
        self._kinds = arg_kinds(args_type)
        self._entry = {}
        self._serial = None
        functools.update_wrapper(self, dispatcher.py_func)

    @property
    def serial(self):
        """The same kernel compiled without ``parallel=True`` (prange runs as
        range, on the calling thread), for processes where Numba's threads
        must not start (numbattn.cpu.backend: forked after GNU OpenMP started).
        Compiled on first use, cached on disk under its own name."""
        if self._serial is None:
            py_func = serial_copy(self._dispatcher.py_func)
            self._serial = OneLayoutKernel(
                njit(**self._serial_options)(py_func), self.args_type, self._serial_options
            )
        return self._serial

    def signature_for(self, dtype):
        """The Numba signature compiled for ``dtype``."""
        nbt = types.float32 if np.dtype(dtype) == np.float32 else types.float64
        sig = []
        for kind in self._kinds:
            if isinstance(kind, tuple):
                role, ndim = kind
                if role in _ELEMENT:
                    sig.append(types.Array(_ELEMENT[role][0], ndim, "A", readonly=True))
                else:
                    sig.append(types.Array(nbt, ndim, "A", readonly=(role == "in")))
            else:
                sig.append(getattr(types, kind))  # "int64", "float64", "boolean"
        return tuple(sig)

    def _compile(self, dtype):
        sig = self.signature_for(dtype)
        self._dispatcher.compile(sig)
        fn = self._dispatcher.overloads[sig].entry_point
        self._entry[dtype] = fn
        return fn

    def entry_for(self, args):
        """The compiled entry point that ``self(*args)`` runs, or None when the
        call would go to the dispatcher (arrays of other dtypes or ranks)."""
        dtype = args[0].dtype
        fn = self._entry.get(dtype)
        if fn is None:
            if dtype != np.float32 and dtype != np.float64:
                return None
            fn = self._compile(dtype)
        for arg, kind in zip(args, self._kinds):
            if isinstance(kind, tuple):
                want = _ELEMENT[kind[0]][1] if kind[0] in _ELEMENT else dtype
                if arg.dtype != want or arg.ndim != kind[1]:
                    return None
        return fn

    def __call__(self, *args):
        fn = self.entry_for(args)
        if fn is None:
            return self._dispatcher(*args)
        return fn(*args)

    def __getattr__(self, name):
        return getattr(self._dispatcher, name)

    def __repr__(self):
        return f"<numbattn CPU kernel {self.__name__}>"
