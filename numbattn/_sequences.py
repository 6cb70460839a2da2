"""The sequence table: how the API tells a kernel which rows and keys exist.

Every attention and scores kernel (both backends) receives, besides its
(G1, G2, ...) arrays, an int64 table ``seq`` of shape (G1, G2, 6) (usually a
broadcast view with zero strides) and an int ``max_rows``. For batch element
(a, h) the columns are::

    seq[a, h, Q_OFF]   first query row of the sequence in q[a, h] / out / lse
    seq[a, h, Q_LEN]   real queries (rows Q_OFF .. Q_OFF + Q_LEN - 1)
    seq[a, h, Q_ROWS]  rows to write (>= Q_LEN): rows past Q_LEN get zeros in
                       out and -inf in lse (scores: -inf everywhere)
    seq[a, h, K_OFF]   first key row in k[a, h // group] / v[a, h // group]
    seq[a, h, K_LEN]   keys of the sequence (K_OFF .. K_OFF + K_LEN - 1)
    seq[a, h, ALIGN]   the diagonal ``off``: query i is aligned with key
                       i + off (default K_LEN - Q_LEN, bottom-right; the
                       ``diagonal`` keyword sets it, e.g. for a block of a
                       larger problem)

``max_rows`` is the largest Q_ROWS (the kernel's query-tile grid size).

Within a sequence, with local indices i < Q_LEN and j < K_LEN and
``off = seq[a, h, ALIGN]``, key j is visible to query i when

    (left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)
    and (no mask or mask[a, h, Q_OFF + i, K_OFF + j])

(causal is folded into ``right`` by the API). A bias, when given, is added to
the scaled score: ``s = scale * <q, k> + bias[a, h, Q_OFF + i, K_OFF + j]``.
Grouped-query attention: q has G2 heads, k and v have G2 / group; query head
h reads key head ``h // group``.

Dense attention is one sequence per batch element (offsets 0, Q_ROWS = Nq);
``key_lengths``/``query_lengths`` set K_LEN/Q_LEN per batch element; packed
varlen attention views q as (B, H, Tq, d) with a zero stride over B and
gives each sequence its cu_seqlens offsets.
"""

from __future__ import annotations

import numpy as np

# The CPU kernels read the table by these names. Numba's on-disk cache is
# stamped with the content of the kernels' own file only, so a cached kernel
# keeps the numbers it was compiled with: changing them needs the cache
# cleared (numbattn/cpu/__pycache__, or NUMBA_CACHE_DIR).
Q_OFF, Q_LEN, Q_ROWS, K_OFF, K_LEN, ALIGN = range(6)
COLUMNS = 6


def dense_table(nq: int, nk: int, diagonal: int | None = None) -> np.ndarray:
    """One row: a full (nq x nk) sequence at offset 0 (bottom-right by default)."""
    off = nk - nq if diagonal is None else diagonal
    return np.array([0, nq, nq, 0, nk, off], dtype=np.int64)


def broadcast(table: np.ndarray, leading: tuple[int, ...], axis0: bool) -> np.ndarray:
    """View a (B, 6) table (or one (6,) row) as leading + (6,), zero strides elsewhere.

    ``axis0``: the table's rows index the first leading dimension.
    """
    if table.ndim == 1:
        return np.lib.stride_tricks.as_strided(
            table, leading + (COLUMNS,), (0,) * len(leading) + table.strides, writeable=False
        )
    strides = (table.strides[0],) + (0,) * (len(leading) - 1) + (table.strides[1],)
    assert axis0 and table.shape[0] == leading[0]
    return np.lib.stride_tricks.as_strided(table, leading + (COLUMNS,), strides, writeable=False)
