"""``njit`` with an on-disk cache that degrades instead of failing.

Numba's ``@njit(cache=True)`` raises ``RuntimeError: cannot cache function
...: no locator available`` when it finds no *writable* cache directory
(``NUMBA_CACHE_DIR``, the package's ``__pycache__``, the user-wide
``~/.cache/numba``): a read-only installation (container image, system
site-packages, HPC module tree) with a read-only HOME cannot even import the
kernels, and a warm cache shipped in those read-only places is never used.

:func:`njit` picks, per function when it is decorated, the first of Numba's
cache directories, in Numba's order, that is either

* writable: Numba's cache as usual (loads, and saves what it compiles), or
* read-only but holding this function's cache index, up to date for this
  Numba and this source file: loaded from, never written to (what is not in
  it compiles in memory);

and, when there is none, no on-disk cache: the function compiles in memory,
once per process. Nothing raises. :func:`cache_mode` tells which applies.
"""

from __future__ import annotations

import os
import sys
import types as _pytypes

import numba
from numba.core import caching

__all__ = ["cache_mode", "njit", "serial_copy"]


def _locator(name: str):
    # Public names since Numba 0.6x; older releases had a leading underscore.
    return getattr(caching, name, None) or getattr(caching, "_" + name)


def _filename_base(py_func, py_file: str) -> str:
    """The base name of ``py_func``'s cache files, as Numba builds it
    (CacheImpl.__init__ and get_filename_base)."""
    modname = os.path.splitext(os.path.basename(py_file))[0]
    fullname = f"{modname}.{py_func.__qualname__}".replace("<", "").replace(">", "")
    major, minor = sys.version_info[:2]
    abiflags = getattr(sys, "abiflags", "")
    return f"{fullname}-{py_func.__code__.co_firstlineno}.py{major}{minor}{abiflags}"


class _ReadOnlyLocatorMixin:  # mixed into Numba's cache locators (untyped)
    """Accepts a cache directory, writable or not, that already holds an
    up-to-date index for this function; never creates or writes anything."""

    read_only = True

    def __init__(self, py_func, py_file):
        super().__init__(py_func, py_file)  # type: ignore[call-arg]
        self._base = _filename_base(py_func, py_file)

    def ensure_cache_path(self):
        try:  # Numba's own reader: {} when absent, stale or of another version
            index = caching.IndexDataCacheFile(
                self.get_cache_path(),  # type: ignore[attr-defined]
                self._base,
                self.get_source_stamp(),  # type: ignore[attr-defined]
            )._load_index()
        except Exception:
            index = None
        if not index:
            raise OSError(
                f"no up-to-date cache index in {self.get_cache_path()}"  # type: ignore[attr-defined]
            )


def _read_only(base):
    name = "ReadOnly" + base.__name__.lstrip("_")
    return type(name, (_ReadOnlyLocatorMixin, base), {})


_BASES = [
    _locator("UserProvidedCacheLocator"),
    _locator("InTreeCacheLocator"),
    _locator("UserWideCacheLocator"),
]
# Numba's order, each directory taken writable if it can be, else read-only
# if it holds a fresh index; then Numba's remaining locators.
_LOCATORS = [cls for base in _BASES for cls in (base, _read_only(base))] + [
    cls for cls in caching.CacheImpl._locator_classes if cls not in _BASES
]


class _Impl(caching.CompileResultCacheImpl):
    _locator_classes = _LOCATORS


class FunctionCache(caching.FunctionCache):
    """Numba's function cache over :data:`_LOCATORS`; saves nothing when the
    directory it found is read-only."""

    _impl_class = _Impl

    @property
    def read_only(self) -> bool:
        return getattr(self._impl.locator, "read_only", False)

    def save_overload(self, sig, data):
        if not self.read_only:
            super().save_overload(sig, data)


def _enable_cache(dispatcher) -> None:
    try:
        dispatcher._cache = FunctionCache(dispatcher.py_func)  # what enable_caching() does
    except (RuntimeError, OSError):
        pass  # "no locator available": keep Numba's NullCache (compile in memory)


def cache_mode(dispatcher) -> str:
    """``'write'``, ``'read-only'`` or ``'none'``: the on-disk cache a dispatcher uses."""
    cache = getattr(dispatcher, "_cache", None)
    if not isinstance(cache, caching.Cache):
        return "none"
    return "read-only" if getattr(cache, "read_only", False) else "write"


def njit(*args, **options):
    """``numba.njit`` whose ``cache=True`` never raises (see the module doc)."""
    cache = options.pop("cache", False)

    def decorate(func):
        dispatcher = numba.njit(**options)(func)
        if cache:
            _enable_cache(dispatcher)
        return dispatcher

    if args:  # bare @njit
        return decorate(args[0])
    return decorate


def serial_copy(py_func, suffix: str = "_serial"):
    """A copy of ``py_func`` under another ``__qualname__``, so that a second
    compilation of it (say with ``parallel=False``) gets cache files of its own:
    Numba's cache index is keyed by qualname and line, not by the flags."""
    copy = _pytypes.FunctionType(
        py_func.__code__,
        py_func.__globals__,
        py_func.__name__ + suffix,
        py_func.__defaults__,
        py_func.__closure__,
    )
    copy.__qualname__ = py_func.__qualname__ + suffix
    copy.__module__ = py_func.__module__
    copy.__doc__ = py_func.__doc__
    copy.__kwdefaults__ = py_func.__kwdefaults__
    return copy
