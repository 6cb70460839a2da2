"""The sequence table and the visible block ranges, one definition for every CUDA kernel.

A kernel block reads its row of the sequence table (:mod:`numbattn._sequences`)
with :func:`block_ranges`' ``sequence`` and derives the window sides with
``window``: query i sees key j iff ``lo_base <= j - i < hi_base`` (and
``j < K_LEN``, ``i < Q_LEN``), ``BIG`` standing in for an unbounded side,
so that the tests need no window branches. From those, for a tile of query
rows, the keys any of its rows sees (``keys_seen``) and the keys every row
sees (``keys_seen_by_all``: the interior, where no per-element test is
needed); for a tile of keys (the backward's key kernel), the queries that
see any of its keys (``queries_seeing``) and that see all of them
(``queries_seeing_all``). :func:`block_keys` combines them for the fused
forward kernels.

The helpers are device functions inlined into the kernels (``forceinline``
off the simulator), so a kernel that calls one twice (to re-read its block
constants after a fast loop instead of keeping them in registers across it)
pays only the loads. ``block_ranges(device=False)`` gives the same functions
as plain Python, for host-side code and tests.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from numbattn._sequences import ALIGN, K_LEN, K_OFF, Q_LEN, Q_OFF, Q_ROWS

BIG = 1 << 40  # an unbounded window side: far beyond any token index


def sequence(seq, b1, b2):
    """Row (b1, b2) of the sequence table: (q_off, q_len, q_rows, k_off,
    k_len, offset), ``offset`` the diagonal (query i is aligned with key
    i + offset). Columns a caller does not use are never loaded."""
    return (
        seq[b1, b2, Q_OFF],
        seq[b1, b2, Q_LEN],
        seq[b1, b2, Q_ROWS],
        seq[b1, b2, K_OFF],
        seq[b1, b2, K_LEN],
        seq[b1, b2, ALIGN],
    )


def window(offset, wl, wr):
    """(lo_base, hi_base): query i sees keys [i + lo_base, i + hi_base) of
    the window (sides -1 = unbounded, ``BIG``)."""
    lo_base = -BIG
    hi_base = BIG
    if wl >= 0:
        lo_base = offset - wl
    if wr >= 0:
        hi_base = offset + wr + 1
    return lo_base, hi_base


def keys_seen(i0, i_end, q_len, k_len, lo_base, hi_base):
    """(lo, hi): the keys [lo, hi) that any real query of rows [i0, i_end)
    sees; empty (0, 0) when i0 is past the real queries."""
    lo = 0
    hi = 0
    if i0 < q_len:
        lo = max(0, i0 + lo_base)
        hi = min(k_len, min(i_end, q_len) - 1 + hi_base)
    return lo, hi


def keys_seen_by_all(i_first, i_last, lo_base, hi_base):
    """(lo_max, hi_min): every query of rows i_first .. i_last sees the keys
    of [lo_max, hi_min) that its window holds (key and query counts aside)."""
    return i_last + lo_base, i_first + hi_base


def queries_seeing(j0, j_end, q_len, k_len, lo_base, hi_base):
    """(lo, hi): the queries [lo, hi) that see any real key of [j0, j_end);
    empty (0, 0) when j0 is past the real keys."""
    lo = 0
    hi = 0
    j1 = min(j_end, k_len)
    if j1 > j0:
        lo = max(0, j0 - hi_base + 1)
        hi = min(q_len, j1 - lo_base)
    return lo, hi


def queries_seeing_all(j_first, j_last, lo_base, hi_base):
    """(lo_min, hi_max): every query of [lo_min, hi_max) sees all keys
    j_first .. j_last (window only; query and key counts aside)."""
    return j_last + 1 - hi_base, j_first + 1 - lo_base


class Ranges(NamedTuple):
    """The helpers of this module, as device functions or as Python."""

    sequence: Any
    window: Any
    keys_seen: Any
    keys_seen_by_all: Any
    queries_seeing: Any
    queries_seeing_all: Any


_RANGES: dict = {}


def block_ranges(device: bool = True) -> Ranges:
    """The sequence reader and the visible-range helpers: device functions
    inlined into their callers (``device``), else the plain Python ones."""
    fns = (sequence, window, keys_seen, keys_seen_by_all, queries_seeing, queries_seeing_all)
    if not device:
        return Ranges(*fns)
    from .inline import _device, _on_simulator

    key = _on_simulator()
    if key not in _RANGES:
        _RANGES[key] = Ranges(*(_device(fn) for fn in fns))
    return _RANGES[key]


def block_keys(BQ, BK):
    """Device function ``block_keys(seq, b1, b2, i0, wl, wr, has_mask)`` of
    the fused forward kernels (BQ query rows from i0, key tiles of BK):
    (q_off, q_len, k_off, k_len, lo_base, hi_base, lo, hi, lo_max, hi_min,
    n_kt). The block's rows see keys [lo, hi), n_kt tiles of BK from lo; a
    key tile [j0, j0 + BK) needs no per-element test when every row sees
    all of it (j0 >= lo_max, j0 + BK <= hi_min) and there is no mask;
    hi_min = -1 forces the test (a mask, or rows past Q_LEN in the tile)."""
    from .inline import _device

    rng = block_ranges()
    read, sides, seen, seen_by_all = rng.sequence, rng.window, rng.keys_seen, rng.keys_seen_by_all

    def block_keys(seq, b1, b2, i0, wl, wr, has_mask):
        q_off, q_len, _, k_off, k_len, offset = read(seq, b1, b2)
        lo_base, hi_base = sides(offset, wl, wr)
        lo, hi = seen(i0, i0 + BQ, q_len, k_len, lo_base, hi_base)
        lo_max, hi_min = seen_by_all(i0, i0 + BQ - 1, lo_base, hi_base)
        hi_min = min(k_len, hi_min)
        if has_mask or i0 + BQ > q_len:
            hi_min = -1
        n_kt = 0
        if hi > lo:
            n_kt = (hi - lo + BK - 1) // BK
        return q_off, q_len, k_off, k_len, lo_base, hi_base, lo, hi, lo_max, hi_min, n_kt

    return _device(block_keys)
