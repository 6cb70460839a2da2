"""Arbitrary memory layouts for property tests (Hypothesis strategies).

Every array argument becomes a view into a larger 1-d buffer: its axes in a
random storage order (a transpose), each with a step (2, -1, -2: slices with
steps, negative strides), optionally broadcast (stride 0; inputs only), and
unit axes with arbitrary strides. The buffer has guard regions before and
after the storage and holds ``fill`` wherever the view does not reach
(stepped-over elements included): NaN in an input's buffer poisons a stray
read, and :meth:`Carved.untouched` says whether anything outside an output
view was written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from .helpers import DTYPES


@dataclass(frozen=True)
class Layout:
    perm: tuple[int, ...]  # storage order of the axes, outermost first
    steps: tuple[int, ...]  # per axis; negative: reversed
    broadcast: tuple[bool, ...]  # per axis: stride 0 (inputs only)
    unit_strides: tuple[int | None, ...]  # per axis, for size-1 axes: stride in elements
    guard: int  # extra guard elements on each side (besides one storage size)


STEPS = (1, 1, 1, 2, -1, -2)


@st.composite
def layouts(draw, ndim: int, broadcast: bool = True) -> Layout:
    perm = tuple(draw(st.permutations(range(ndim))))
    steps = tuple(draw(st.sampled_from(STEPS)) for _ in range(ndim))
    bcast = tuple(
        draw(st.sampled_from((False, False, False, True))) if broadcast else False
        for _ in range(ndim)
    )
    unit = tuple(draw(st.sampled_from((None, None, 0, 7, -3))) for _ in range(ndim))
    return Layout(perm, steps, bcast, unit, draw(st.integers(0, 3)))


@st.composite
def leading_shapes(draw, max_size: int = 12, min_sizes: int = 0) -> tuple[int, ...]:
    """Leading (batch) shapes: ``min_sizes`` to three axes of size 2 or 3
    (product at most ``max_size``) with size-1 axes before, between and
    after them."""
    sizes = draw(
        st.lists(st.sampled_from((2, 3)), min_size=min_sizes, max_size=3).filter(
            lambda s: math.prod(s) <= max_size
        )
    )
    shape: list[int] = []
    for i, n in enumerate(sizes + [None]):
        inner = 0 < i < len(sizes)
        shape += [1] * draw(st.sampled_from((0, 1, 1, 2) if inner else (0, 0, 1)))
        if n is not None:
            shape.append(n)
    return tuple(shape)


@st.composite
def broadcastable(draw, full: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that NumPy broadcasts to ``full`` (fewer axes, size-1 axes)."""
    drop = draw(st.integers(0, len(full)))
    return tuple(1 if draw(st.booleans()) else n for n in full[drop:])


@st.composite
def attention_problems(draw, with_v=True, max_batch=12, min_sizes=0, max_nq=7, max_nk=9):
    """(shapes, options, dtype) of an attention or scores call: leading
    shapes with size-1 axes anywhere, grouped-query heads, and bias and mask
    shapes (broadcastable), lengths, causal and window drawn at random."""
    lead = draw(leading_shapes(max_batch, min_sizes), label="leading")
    kv_lead = lead
    if lead and lead[-1] > 1 and draw(st.booleans()):  # grouped-query attention
        kv_lead = lead[:-1] + (draw(st.sampled_from(divisors(lead[-1]))),)
    nq, nk = draw(st.integers(0, max_nq)), draw(st.integers(0, max_nk))
    d, dv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    full = lead + (nq, nk)
    opts = {
        "causal": draw(st.booleans()),
        "window": draw(st.none() | st.tuples(st.integers(-1, 3), st.integers(-1, 3))),
        "bias": draw(st.none() | broadcastable(full)),
        "mask": draw(st.none() | broadcastable(full)),
    }
    if lead:
        opts["key_lengths"] = draw(
            st.none() | st.lists(st.integers(0, nk), min_size=lead[0], max_size=lead[0])
        )
        opts["query_lengths"] = draw(
            st.none() | st.lists(st.integers(0, nq), min_size=lead[0], max_size=lead[0])
        )
    opts = {n: o for n, o in opts.items() if o is not None}
    shapes = {"q": lead + (nq, d), "k": kv_lead + (nk, d)}
    if with_v:
        shapes["v"] = kv_lead + (nk, dv)
    return shapes, opts, draw(st.sampled_from(DTYPES))


class Carved:
    """An array of ``shape`` laid out as ``layout`` inside a guarded buffer."""

    def __init__(self, shape, dtype, layout: Layout, fill, values=None, writeable=False):
        shape = tuple(shape)
        ndim = len(shape)
        bcast = [layout.broadcast[i] and shape[i] != 1 for i in range(ndim)]
        dense_shape = tuple(1 if bcast[i] else shape[i] for i in range(ndim))
        storage = [dense_shape[a] * abs(layout.steps[a]) for a in layout.perm]
        total = math.prod(storage)
        pad = total + layout.guard
        self.buf = np.full(pad + total + pad, fill, dtype)
        inverse = tuple(np.argsort(layout.perm))
        steps = tuple(slice(None, None, s) for s in layout.steps) + (Ellipsis,)  # 0-d: a view

        def viewed(b):
            dense = b[pad : pad + total].reshape(storage).transpose(inverse)[steps]
            strides = list(dense.strides)
            for i in range(ndim):
                if bcast[i]:
                    strides[i] = 0
                elif shape[i] == 1 and layout.unit_strides[i] is not None:
                    strides[i] = layout.unit_strides[i] * b.itemsize
            return dense, np.lib.stride_tricks.as_strided(
                dense, shape, tuple(strides), writeable=writeable and b is self.buf
            )

        dense, self.view = viewed(self.buf)
        if values is not None:
            dense[...] = values(dense_shape)
        _, index = viewed(np.arange(self.buf.size))
        self.covered = np.zeros(self.buf.size, bool)
        self.covered[index.ravel()] = True
        self.before = self.buf.copy()

    @property
    def offset(self) -> int:
        """Elements from the buffer's start to the view's first element."""
        start = self.view.__array_interface__["data"][0]
        return (start - self.buf.__array_interface__["data"][0]) // self.buf.itemsize

    def on(self, buf: np.ndarray) -> np.ndarray:
        """The same view of another buffer (e.g. a copy back from the GPU)."""
        return np.lib.stride_tricks.as_strided(
            buf[self.offset :], self.view.shape, self.view.strides, writeable=False
        )

    def untouched(self, buf=None) -> bool:
        """Whether ``buf`` (default: the host buffer) still holds, bit for bit,
        what it held outside the view when created."""
        buf = self.buf if buf is None else buf
        as_bits = _bits(buf)[~self.covered]
        return np.array_equal(as_bits, _bits(self.before)[~self.covered])

    def unchanged(self, buf=None) -> bool:
        """Whether nothing at all was written (for inputs)."""
        buf = self.buf if buf is None else buf
        return np.array_equal(_bits(buf), _bits(self.before))


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.itemsize}"))


def divisors(n: int) -> list[int]:
    return [h for h in range(1, n + 1) if n % h == 0]
