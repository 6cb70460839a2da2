"""Call plans: a repeated host call with one signature skips validation and planning.

A CPU call of :func:`numbattn.attention` runs the whole public path
(validation, planning, launch); the second call with the same *signature*
also records the kernel launches it made. Later calls with that signature
replay them on their own arrays: they build the signature, check what the
signature cannot hold (that an output overlaps no other argument, when the
arrays are not those the plan last checked), and call the kernels.

The signature holds everything validation and planning read: each array's
type, shape, strides and dtype, and each output's writeable flag; which arguments are the
same object; every option's type and value (lengths and per-batch diagonals
by their contents); numbattn.config's assignment count; Numba's thread count
on the calling thread. A call outside it (GPU arrays, lists for lengths, a
stream) takes the public path every time.

A recorded kernel argument is replayed as one of:

* an argument of the call (q, k, v, out, ...), or a view of it at the same
  address (an axis permutation, such as the backend's ``swapaxes``, or the
  (G1, G2, ...) views of numbattn._layout, broadcasts of bias and mask);
* an array the backend allocated that the kernel writes (scratch): a new
  one of the same shape and dtype each call, so that threads sharing a plan
  never share scratch;
* any other array: a constant the plan keeps (sequence table, block table
  of a dense cache, stand-ins for absent options). The CPU backend passes
  kernels no other arrays (no copies of the call's data).

A recording whose arguments cannot be classified so (a view at an offset
into an argument, two distinct arguments at one address) stores no plan.
Plans are bounded in number and safe to share between threads.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import config

#: Plans kept (oldest dropped first).
MAX_PLANS = 128

_plans: dict[tuple, _Plan] = {}
_lock = threading.Lock()
_local = threading.local()


class _NotCacheable(Exception):
    pass


def _value_key(x: Any) -> tuple | None:
    """An option's type and value (an ndarray's contents; lists are not cached)."""
    if x is None:
        return None
    if type(x) is np.ndarray:
        if x.size > 4096:
            raise _NotCacheable
        return (x.shape, x.dtype, x.tobytes())
    if type(x) is tuple:
        return (tuple, tuple(_value_key(e) for e in x))
    if not isinstance(x, (bool, int, float, np.generic)):
        raise _NotCacheable  # lists, other arrays (masked ones too), objects
    return (type(x), x)


def _identity(arrays: Sequence[Any]) -> tuple[int, ...] | None:
    """For each argument, the first position holding the same object; None
    when no object is given twice (the common case, and the cheap one)."""
    given = [id(a) for a in arrays if a is not None]
    if len(set(given)) == len(given):
        return None
    out = []
    for a in arrays:
        j = 0
        while arrays[j] is not a:
            j += 1
        out.append(j)
    return tuple(out)


_parallel: Any = None


def _threads() -> int:
    """Numba's thread count on this thread (its cheap C getter once started)."""
    global _parallel
    if _parallel is None:
        from numba.np.ufunc import parallel

        _parallel = parallel
    if _parallel._is_initialized:
        return _parallel._get_num_threads()
    return _parallel.get_num_threads()


def _bad_array(x: Any) -> tuple:
    """Not a host array: the call takes no plan."""
    raise _NotCacheable


def signature(
    name: str, arrays: Sequence[Any], options: Sequence[Any], outputs: Sequence[int] = ()
) -> tuple | None:
    """The plan key of a call, or None when the call cannot take a plan;
    ``outputs``: the indices of the arrays written (their writeable flag counts)."""
    try:
        return (
            name,
            tuple(
                [
                    None
                    if a is None
                    else (a.shape, a.strides, a.dtype)
                    if type(a) is np.ndarray
                    else _bad_array(a)
                    for a in arrays
                ]
            ),
            tuple([arrays[i].flags.writeable for i in outputs if arrays[i] is not None]),
            _identity(arrays),
            tuple([_value_key(o) for o in options]),
            config._generation,
            _threads(),
        )
    except _NotCacheable:
        return None


# --------------------------------------------------------------------------
# Recording (numbattn.cpu.backend._call reports each launch here)


def recording() -> list | None:
    """The current thread's launch list while a call is being recorded."""
    return getattr(_local, "launches", None)


class _Recording:
    def __enter__(self) -> list:
        _local.launches = []
        return _local.launches

    def __exit__(self, *exc: Any) -> None:
        _local.launches = None


def record() -> _Recording:
    """``with record() as launches:`` collects (kernel, args) per launch."""
    return _Recording()


# --------------------------------------------------------------------------
# Plans


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _permutation(arg: np.ndarray, base: np.ndarray) -> tuple[int, ...] | None:
    """``p`` with ``base.transpose(p)`` laid out as ``arg`` (same address,
    shape, and strides but on axes of length 1, which no index moves along);
    ``()`` for ``base`` itself; None if none."""
    if arg is base:
        return ()
    if arg.ndim != base.ndim:
        return None
    used: list[int] = []
    for n, s in zip(arg.shape, arg.strides):
        for ax in range(base.ndim):
            if ax not in used and base.shape[ax] == n and (n == 1 or base.strides[ax] == s):
                used.append(ax)
                break
        else:
            return None
    return tuple(used)


class _Plan:
    """Recorded launches, replayable on another call's arrays."""

    __slots__ = ("_checked", "_fresh", "_launches", "_out", "_outputs")

    def __init__(
        self,
        launches: list[tuple[Callable[[tuple], None], list[Any], list[tuple[int, Any]]]],
        out: int,
        fresh: tuple[tuple[int, ...], np.dtype] | None,
        outputs: tuple[int, ...],
    ) -> None:
        self._launches = launches  # (run(args), argument template, slots) per launch
        self._out = out  # where the returned array is
        self._fresh = fresh  # (shape, dtype) when the call allocates it
        self._outputs = outputs  # the caller's buffers that the kernels write
        self._checked: tuple = ()

    def _overlap_free(self, arrays: list[Any]) -> bool:
        """No output of the caller's shares memory with another argument
        (checked again only for arrays other than those of the last call
        that passed; a new output overlaps nothing)."""
        skip = self._out if self._fresh is not None else -1
        last = self._checked
        if all(
            i == skip or (r is None if a is None else r() is a)
            for i, (r, a) in enumerate(zip(last, arrays))
        ) and len(last) == len(arrays):
            return True
        for i in self._outputs:
            o = arrays[i]
            for j, x in enumerate(arrays):
                if j != i and j != skip and x is not None and (x is o or np.may_share_memory(o, x)):
                    return False
        self._checked = tuple(
            None if a is None or i == skip else weakref.ref(a) for i, a in enumerate(arrays)
        )
        return True

    def replay(self, arrays: Sequence[Any]) -> Any:
        """Run the plan on ``arrays``: the output array, or None when the
        call must take the public path (an output may overlap an argument)."""
        arrays = list(arrays)
        if self._fresh is not None:
            arrays[self._out] = np.empty(*self._fresh)
        if self._outputs and not self._overlap_free(arrays):
            return None
        for run, template, slots in self._launches:
            args = list(template)
            for pos, how in slots:
                if len(how) == 2:  # (argument index, axis permutation)
                    a = arrays[how[0]]
                    args[pos] = a.transpose(how[1]) if how[1] else a
                elif how[0] == "new":  # scratch: ("new", shape, dtype)
                    args[pos] = np.empty(how[1], how[2])
                else:  # (argument index, shape, strides)
                    args[pos] = as_strided(arrays[how[0]], how[1], how[2])
            run(tuple(args))
        return arrays[self._out]


def _classify(
    arg: Any, role: Any, arrays: Sequence[Any], addresses: Sequence[int | None]
) -> tuple | bool | None:
    """How a recorded kernel argument is replayed (see the module docstring):
    ``(index, permutation)``, ``(index, shape, strides)`` for another view at
    the argument's address, ``("new", shape, dtype)`` for scratch, None for a
    constant, False when it cannot be. ``addresses``: those of ``arrays``."""
    if type(arg) is not np.ndarray:
        return None
    address = _address(arg)
    found: tuple | None = None
    owner = None
    for i, (a, at) in enumerate(zip(arrays, addresses)):
        if at != address or a is owner or a.dtype != arg.dtype:
            continue
        if owner is not None:
            return False  # two distinct arguments at one address
        perm = _permutation(arg, a)
        found = (i, perm) if perm is not None else (i, arg.shape, arg.strides)
        owner = a
    if found is not None:
        return found
    for a in arrays:
        if a is not None and a.size and np.may_share_memory(arg, a):
            return False  # a view of an argument at an offset
    if isinstance(role, tuple) and role[0] == "out":
        if not arg.flags.c_contiguous:
            return False
        return ("new", arg.shape, arg.dtype)
    return None


def store(
    key: tuple,
    launches: list[tuple[Any, tuple]],
    arrays: Sequence[Any],
    out: int,
    fresh: bool,
    outputs: tuple[int, ...],
    roles: Callable[[Any], Sequence[Any]],
    launcher: Callable[[Any, tuple], Callable[[tuple], None]],
) -> None:
    """Keep a plan for ``key`` from a recorded call.

    ``arrays``: the call's arrays, with the array it returned at ``out``
    (``fresh``: allocated by the call, else the caller's); ``outputs``: the
    indices of the caller's buffers the call writes; ``roles(kernel)``: each
    kernel argument's kind (numbattn.cpu.args); ``launcher(kernel, args)``:
    the ``run(args)`` that launches ``kernel`` on a replay's arguments.
    """
    addresses = [None if a is None else _address(a) for a in arrays]
    recorded = []
    for kernel, args in launches:
        template: list[Any] = list(args)
        slots: list[tuple[int, Any]] = []
        for pos, (arg, role) in enumerate(zip(args, roles(kernel))):
            how = _classify(arg, role, arrays, addresses)
            if how is False:
                return
            if how is not None:
                slots.append((pos, how))
                template[pos] = None  # the plan keeps no caller's array alive
        recorded.append((launcher(kernel, args), template, slots))
    result = arrays[out]
    plan = _Plan(recorded, out, (result.shape, result.dtype) if fresh else None, outputs)
    try:
        hash(key)
    except TypeError:
        return
    with _lock:
        while len(_plans) >= MAX_PLANS:
            _plans.pop(next(iter(_plans)))
        _plans[key] = plan


#: Signatures called once: the second call records the plan, so a signature
#: that never repeats (a loop over scales, say) never pays for a recording.
_seen: dict[tuple, None] = {}
MAX_SEEN = 1024


def lookup(key: tuple | None) -> _Plan | None:
    """The plan of ``key`` (None for no plan, or a key that cannot be hashed)."""
    if key is None:
        return None
    try:
        return _plans.get(key)
    except TypeError:
        return None


def second_call(key: tuple) -> bool:
    """Whether ``key`` was called before (then record this call); notes it if not."""
    try:
        if key in _seen:
            return True
    except TypeError:
        return False
    with _lock:
        while len(_seen) >= MAX_SEEN:
            _seen.pop(next(iter(_seen)))
        _seen[key] = None
    return False


def clear() -> None:
    """Drop every plan."""
    global _lock
    _lock = threading.Lock()  # may have been held by a thread of a forked parent
    _plans.clear()
    _seen.clear()


if hasattr(os, "register_at_fork"):
    # A forked child runs the kernels' serial twins (numbattn.cpu.backend): plan anew.
    os.register_at_fork(after_in_child=clear)
