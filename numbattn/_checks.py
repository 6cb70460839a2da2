"""Argument validation shared by the CPU and CUDA backends.

A leaf layer: it imports NumPy and :mod:`numbattn._interop`, never a
backend. Every check works on NumPy arrays. Host arguments are checked as
they are; GPU arguments are checked through a *shadow*
(:func:`numbattn._interop.interface_shadow`), so both backends raise
identical errors, and all of them are raised before any output is touched.
Values that must be read on the host (integer lengths on a GPU) are copied
there by the backend (``backend.to_host``) before they reach these checks.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._interop import device_interface, interface_shadow

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def shadow(name: str, obj: Any) -> tuple[np.ndarray, bool]:
    """Return ``(array_to_check, is_device)`` for a public argument.

    Raises TypeError for anything that is neither a NumPy array nor a GPU
    array exposing ``__cuda_array_interface__``.
    """
    if isinstance(obj, np.ma.MaskedArray):
        raise TypeError(_masked_message(name))
    if isinstance(obj, np.ndarray):
        return obj, False
    cai = device_interface(obj)
    if cai is not None:
        return interface_shadow(cai), True
    raise TypeError(
        f"{name} must be a numpy.ndarray or a GPU array exposing "
        f"__cuda_array_interface__ (CuPy, PyTorch CUDA, Numba device array), "
        f"got {type(obj).__module__}.{type(obj).__qualname__}"
    )


def _masked_message(name: str) -> str:
    return (
        f"{name} is a numpy.ma.MaskedArray, which numbattn refuses: its mask would be "
        f"ignored. Pass {name}.filled(value) or {name}.data, and express masked keys "
        "with mask= or key_lengths="
    )


def check_same_device(named: dict[str, bool]) -> bool:
    """All arguments on the host or all on the GPU; returns True for GPU."""
    names = list(named)
    first = names[0]
    for name in names[1:]:
        if named[name] != named[first]:
            where = {True: "a GPU array", False: "a host (NumPy) array"}
            raise TypeError(
                f"{name} is {where[named[name]]} but {first} is {where[named[first]]}; "
                "all arrays of one call must live on the same device"
            )
    return named[first]


def check_dtype(name: str, arr: np.ndarray, expected: np.dtype | None = None) -> np.dtype:
    """float32 or float64, and equal to ``expected`` when given."""
    if arr.dtype not in SUPPORTED_DTYPES:
        if not arr.dtype.isnative and arr.dtype.newbyteorder("=") in SUPPORTED_DTYPES:
            raise TypeError(_byte_order_message(name, arr.dtype))
        raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")
    if expected is not None and arr.dtype != expected:
        raise TypeError(
            f"{name} must have dtype {expected} (the dtype of the inputs), got {arr.dtype}; "
            "numbattn never converts dtypes silently"
        )
    return arr.dtype


def _byte_order_message(name: str, dtype: np.dtype) -> str:
    return (
        f"{name} has non-native byte order {dtype.str}: numbattn never converts "
        f"silently; convert with {name}.astype({name}.dtype.newbyteorder('='))"
    )


def check_ndim(name: str, arr: np.ndarray, minimum: int, what: str) -> None:
    if arr.ndim < minimum:
        raise ValueError(
            f"{name} must have at least {minimum} dimensions {what}, got shape {arr.shape}"
        )


def check_dim(name: str, actual: int, expected: int, what: str, ref: str) -> None:
    if actual != expected:
        raise ValueError(f"{name} must have {what} {expected} (as {ref}), got {actual}")


def check_leading(name: str, arr: np.ndarray, expected: tuple, ref: str, trailing: int) -> None:
    leading = arr.shape[: arr.ndim - trailing]
    if leading != expected:
        raise ValueError(
            f"{name} must have the same leading (batch) dimensions as {ref}: "
            f"expected {expected}, got {leading} (shape {arr.shape})"
        )


def check_scale(scale: Any, d: int) -> float:
    """A finite real number; None means 1/sqrt(d) (1 when d == 0)."""
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    try:
        value = float(scale)
    except OverflowError:  # e.g. 10**400: a real number, but no finite float
        raise ValueError(
            f"scale must be finite, got a value too large for float64 (type {type(scale).__name__})"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays (or shadows) share any byte. Exact when cheap."""
    if a.size == 0 or b.size == 0 or not np.may_share_memory(a, b):
        return False
    try:
        return bool(np.shares_memory(a, b, max_work=100_000))  # type: ignore[arg-type]
    except np.exceptions.TooHardError:
        return True  # be conservative: refuse rather than risk corrupt output


def same_view(a: np.ndarray, b: np.ndarray) -> bool:
    """Exactly the same elements in the same order (an in-place operation)."""
    return (
        a.shape == b.shape
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def check_output(
    name: str,
    arr: np.ndarray,
    shape: tuple,
    dtype: np.dtype,
    inputs: dict[str, np.ndarray],
    in_place_ok: str | None = None,
) -> None:
    """Shape, dtype, writeability and no overlap with ``inputs``.

    ``in_place_ok`` names one input that ``arr`` may be exactly (not partly).
    """
    if arr.dtype not in SUPPORTED_DTYPES or arr.dtype != dtype:
        if not arr.dtype.isnative and arr.dtype.newbyteorder("=") == dtype:
            raise TypeError(_byte_order_message(name, arr.dtype))
        raise TypeError(f"{name} must have dtype {dtype}, got {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    if not arr.flags.writeable:
        raise ValueError(f"{name} must be writeable, got a read-only array")
    if arr.size > 1 and any(s == 0 for s, n in zip(arr.strides, arr.shape) if n > 1):
        raise ValueError(f"{name} must not repeat elements (it has a zero stride)")
    for other_name, other in inputs.items():
        if other_name == in_place_ok and same_view(arr, other):
            continue
        if overlaps(arr, other):
            raise ValueError(f"{name} must not overlap {other_name} (they share memory)")


def _host_integers(name: str, obj: Any, what: str) -> np.ndarray:
    """An integer array's values (GPU arrays were copied to the host by the caller)."""
    if isinstance(obj, np.ma.MaskedArray):
        raise TypeError(_masked_message(name))
    if isinstance(obj, np.ndarray):
        arr = obj
    elif isinstance(obj, (list, tuple)):
        arr = np.asarray(obj)
        if arr.size == 0:
            arr = arr.astype(np.int64)
    else:
        raise TypeError(
            f"{name} must be an integer array {what}, got {type(obj).__module__}.{type(obj).__qualname__}"
        )
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {arr.dtype}")
    return arr


def check_lengths(name: str, obj: Any, batch: int, limit: int) -> np.ndarray:
    """Per-sequence lengths: integers of shape (batch,) in [0, limit]."""
    arr = _host_integers(name, obj, f"of shape ({batch},)")
    if arr.shape != (batch,):
        raise ValueError(
            f"{name} must have shape ({batch},) (one per batch element), got {arr.shape}"
        )
    if arr.size and (arr.min() < 0 or arr.max() > limit):
        bad = arr[(arr < 0) | (arr > limit)][0]
        raise ValueError(f"{name} must lie in [0, {limit}], got {bad}")
    return arr.astype(np.int64)


#: Largest |diagonal|: keeps i + diagonal +- window inside int64 in the kernels.
DIAGONAL_LIMIT = 2**60


def check_diagonal(obj: Any, batch: int | None) -> np.ndarray:
    """The causal/window alignment: an integer (a 0-d integer array too), or
    integers of shape (batch,), within +-DIAGONAL_LIMIT; returned as int64 of
    shape () or (batch,)."""
    if isinstance(obj, np.ndarray) and obj.ndim == 0 and obj.dtype.kind in "iu":
        obj = obj[()]
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, (bool, np.bool_)):
        values = np.asarray([int(obj)], dtype=object)
        shape: tuple[int, ...] = ()
    else:
        if batch is None:
            if isinstance(obj, (np.ndarray, list, tuple)):
                raise ValueError(
                    "diagonal must be an int when q has no batch dimension, "
                    f"got an array of shape {np.shape(obj)}"
                )
            raise TypeError(
                "diagonal must be an int (q has no batch dimension), "
                f"got {type(obj).__module__}.{type(obj).__qualname__}"
            )
        arr = _host_integers("diagonal", obj, f"of shape ({batch},), or an int")
        if arr.shape != (batch,):
            raise ValueError(
                f"diagonal must be an int or have shape ({batch},) (one per batch element), "
                f"got shape {arr.shape}"
            )
        values, shape = arr.astype(object), arr.shape
    if values.size:
        bad = [int(x) for x in values if abs(int(x)) > DIAGONAL_LIMIT]
        if bad:
            raise ValueError(f"diagonal must lie within +-2**60, got {bad[0]}")
    return np.asarray(values, dtype=np.int64).reshape(shape)


def check_cu_seqlens(name: str, obj: Any, total: int, ref: str) -> np.ndarray:
    """FlashAttention's cumulative lengths: int32/int64, 0 first, non-decreasing, ``total`` last."""
    arr = _host_integers(name, obj, "of shape (B + 1,)")
    # Copied to native int64 below, so a non-native byte order is fine here.
    if arr.dtype.newbyteorder("=") not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"{name} must have dtype int32 or int64, got {arr.dtype}")
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name} must have shape (B + 1,) with B >= 0, got {arr.shape}")
    if arr[0] != 0:
        raise ValueError(f"{name} must start at 0, got {arr[0]}")
    steps = np.diff(arr)
    if steps.size and steps.min() < 0:
        at = int(np.argmax(steps < 0))
        raise ValueError(
            f"{name} must be non-decreasing, got {arr[at]} then {arr[at + 1]} at index {at}"
        )
    if arr[-1] != total:
        raise ValueError(f"{name} must end at the packed size of {ref}, {total}, got {arr[-1]}")
    return arr.astype(np.int64)


def check_window(window: Any) -> tuple[int, int]:
    """``(left, right)`` integers >= -1 (-1: unbounded); None = (-1, -1)."""
    if window is None:
        return -1, -1
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in window)
    ):
        raise TypeError(f"window must be a pair of integers (left, right) or None, got {window!r}")
    left, right = (int(w) for w in window)
    for side, value in (("left", left), ("right", right)):
        if value < -1:
            raise ValueError(f"window {side} must be >= -1 (-1: unbounded), got {value}")
    return left, right


def check_broadcast(
    name: str, arr: np.ndarray, shape: tuple, kind: str, dtype: np.dtype | None = None
) -> np.ndarray:
    """A view of ``arr`` broadcast to ``shape`` (never materialised)."""
    if kind == "bool":
        if arr.dtype != np.bool_:
            raise TypeError(f"{name} must have dtype bool (True = attend), got {arr.dtype}")
    else:
        check_dtype(name, arr, dtype)
    try:
        return np.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(f"{name} of shape {arr.shape} does not broadcast to {shape}") from None


def check_heads(sq: np.ndarray, sk: np.ndarray, sv: np.ndarray) -> int:
    """Leading dims of k and v against q; returns the query heads per key head.

    Grouped-query attention: the last leading axis (heads) of k and v may be
    a divisor of q's; every other leading axis must match.
    """
    lq, lk = sq.shape[:-2], sk.shape[:-2]
    group = 1
    if len(lq) == len(lk) and lq and lq[:-1] == lk[:-1] and lq[-1] != lk[-1]:
        if lk[-1] == 0 or lq[-1] % lk[-1]:
            raise ValueError(
                f"k must have a number of heads (axis {len(lk) - 1}) that divides q's {lq[-1]} "
                f"(grouped-query attention), got {lk[-1]}"
            )
        group = lq[-1] // lk[-1]
    else:
        check_leading("k", sk, lq, "q", 2)
    check_leading("v", sv, lk, "k", 2)
    return group


# --- Tuning knobs (numbattn.config) -----------------------------------------


def check_knob(name: str, value: Any, minimum: int = 1) -> int:
    """``numbattn.config.<name>`` as an int >= ``minimum``; ValueError otherwise.

    Knobs are read at call time, before anything is written; a float, bool or
    string would otherwise be truncated or misread by the kernels' integer
    arguments."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"numbattn.config.{name} must be {what}, got {value!r}")
    return int(value)


def check_knob_flag(name: str, value: Any) -> bool:
    """``numbattn.config.<name>`` as a bool (``bool`` or ``numpy.bool_``);
    ValueError otherwise, as :func:`check_knob` (``bool()`` would take any
    value: ``"False"`` or ``0.5`` would silently switch a path on)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"numbattn.config.{name} must be True or False, got {value!r}")
    return bool(value)


# --- Split-K and paged KV caches ------------------------------------------


def check_num_splits(value: Any) -> int | None:
    """``num_splits``: None (heuristic) or an integer >= 1."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"num_splits must be an integer >= 1 or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"num_splits must be >= 1 (1 disables splitting), got {value}")
    return int(value)


def check_block_table(
    table: np.ndarray, batch: int, key_lengths: np.ndarray, block_size: int, num_blocks: int
) -> None:
    """A paged cache's block table (host values): int32, shape (batch,
    max_blocks), enough columns for every length, and every entry a length
    needs (the first ceil(key_lengths[b] / block_size) of row b) in
    [0, num_blocks). Entries past those are never read, so never checked."""
    if table.dtype != np.int32:
        raise TypeError(f"block_table must have dtype int32, got {table.dtype}")
    if table.ndim != 2 or table.shape[0] != batch:
        raise ValueError(
            f"block_table must have shape (B, max_blocks) with B = {batch} (q's batch), "
            f"got {table.shape}"
        )
    max_blocks = table.shape[1]
    capacity = max_blocks * block_size
    if key_lengths.size and key_lengths.max() > capacity:
        b = int(np.argmax(key_lengths > capacity))
        raise ValueError(
            f"block_table has too few blocks for key_lengths[{b}] = {int(key_lengths[b])}: "
            f"{max_blocks} blocks of block_size {block_size} hold {capacity} keys"
        )
    if block_size == 0:
        return
    needed = -(-key_lengths // block_size)
    used = np.arange(max_blocks)[None, :] < needed[:, None]
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        b, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"block_table[{b}, {j}] must lie in [0, {num_blocks}) (num_blocks of the cache), "
            f"got {int(table[b, j])}"
        )
