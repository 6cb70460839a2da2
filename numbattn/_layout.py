"""Reduce any number of leading batch dimensions to exactly two, without copies.

Kernels take arrays shaped (G1, G2, ...trailing) with arbitrary strides.
Leading dimensions of size 1 are ignored (their stride never matters); two
non-unit leading dimensions i < j with only unit ones between them are merged
where every array of the call allows it (stride[i] == stride[j] * shape[j],
so a broadcast stride 0 merges only with another 0). A merged run has the
stride of its innermost non-unit dimension. If more than two groups remain,
the outer ones are looped over in Python, one kernel launch per index. Common
layouts ((B, H) contiguous or swapaxes'd, or any single leading dimension)
need exactly one launch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np


def _groups(
    leading: tuple[int, ...], strides: Sequence[tuple[int, ...]], keep_last: bool
) -> list[list[int]]:
    """Partition leading axes into runs that are one axis in every array.

    A unit axis joins the current run whatever its strides. A non-unit axis
    joins it when the run has no non-unit axis yet, or when, in every array,
    the run's innermost non-unit axis ``p`` steps exactly over it:
    ``stride[p] == stride[axis] * leading[axis]`` (strides may be negative or
    0). Comparing with ``p``, not the previous axis, keeps a unit axis from
    bridging two axes that do not merge.
    """
    groups: list[list[int]] = []
    inner = None  # innermost non-unit axis of groups[-1], None if all unit
    for axis, n in enumerate(leading):
        if groups and not (keep_last and axis == len(leading) - 1):
            if n == 1:
                groups[-1].append(axis)
                continue
            if inner is None or all(s[inner] == s[axis] * n for s in strides):
                groups[-1].append(axis)
                inner = axis
                continue
        groups.append([axis])
        inner = None if n == 1 else axis
    return groups


def _merged(shape, strides, axes) -> tuple[int, int]:
    """Size and stride of a merged run of axes: the stride of its innermost
    non-unit axis (0 if every axis has size 1)."""
    size = math.prod(shape[a] for a in axes)  # not np.prod: ~5 us a call, per array
    stride = next((strides[a] for a in reversed(axes) if shape[a] != 1), 0)
    return size, stride


class BatchPlan:
    """How to present arrays sharing leading dims ``leading`` as (G1, G2, ...).

    ``keep_last`` keeps the last leading axis (the heads) a group of its own,
    so that G2 counts heads: grouped-query attention gives k and v fewer heads
    than q there, and otherwise the same leading dimensions.
    """

    def __init__(
        self, leading: tuple[int, ...], arrays: Sequence[np.ndarray], keep_last: bool = False
    ):
        nlead = len(leading)
        groups = _groups(leading, [a.strides[:nlead] for a in arrays if a is not None], keep_last)
        while len(groups) < 2:
            groups.insert(0, [])
        self.outer_axes = [ax for g in groups[:-2] for ax in g]
        self.inner_groups = groups[-2:]
        self.leading = leading

    def views(
        self, arrays: Sequence, shadows: Sequence[np.ndarray], index, restride
    ) -> Iterator[list]:
        """Yield, per outer index, each array as (G1, G2, *trailing).

        ``index(arr, idx)`` indexes the outer axes of a backend array and
        ``restride(arr, shape, strides)`` re-views it (strides in bytes);
        either may be a sequence with one function per array. None entries
        stay None.
        """
        n = len(arrays)
        index = index if isinstance(index, (list, tuple)) else [index] * n
        restride = restride if isinstance(restride, (list, tuple)) else [restride] * n
        nouter = len(self.outer_axes)
        outer_shape = tuple(self.leading[a] for a in self.outer_axes)
        for idx in itertools.product(*(range(n) for n in outer_shape)):
            result: list = []
            for arr, sh, index_, restride_ in zip(arrays, shadows, index, restride):
                if arr is None:
                    result.append(None)
                    continue
                if nouter:
                    arr = index_(arr, idx)
                    sh = sh[idx]
                shape, strides = list(sh.shape), list(sh.strides)
                nlead = len(self.leading) - nouter
                new_shape, new_strides = [], []
                for g in self.inner_groups:
                    axes = [a - nouter for a in g]
                    size, stride = _merged(shape, strides, axes)
                    new_shape.append(size)
                    new_strides.append(stride)
                new_shape += shape[nlead:]
                new_strides += strides[nlead:]
                result.append(restride_(arr, tuple(new_shape), tuple(new_strides)))
            yield result


def host_index(arr: np.ndarray, idx: tuple) -> np.ndarray:
    return arr[idx]


def host_restride(arr: np.ndarray, shape: tuple, strides: tuple) -> np.ndarray:
    """``arr`` with the given shape and byte strides: ``arr`` itself when only
    the strides of axes of length 1 differ (no index moves along them, and
    ``as_strided`` costs about 5 us a call)."""
    if arr.shape == shape and (
        arr.strides == strides
        or all(n == 1 or s == t for n, s, t in zip(shape, arr.strides, strides))
    ):
        return arr
    return np.lib.stride_tricks.as_strided(arr, shape, strides, writeable=arr.flags.writeable)
