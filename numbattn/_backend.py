"""The backend interface: what :mod:`numbattn.api` asks of a backend.

:mod:`numbattn.cpu.backend` and :mod:`numbattn.cuda.backend` are modules
that both satisfy :class:`Backend` (mypy checks it where ``api`` picks one;
``tests/test_backend_protocol.py`` checks names, parameters and defaults).
A leaf module: it imports no backend.

Conventions shared by both:

* Kernel arrays are the backend's own (NumPy arrays on the CPU, Numba
  device arrays on CUDA) with exactly two leading batch axes (G1, G2) and
  any strides; ``seq`` is the host int64 sequence table of
  :mod:`numbattn._sequences`.
* ``stream`` is what :meth:`Backend.resolve_stream` returned; ``None`` (the
  default everywhere) means the device's default stream (CUDA) or no stream
  (CPU).
* ``lse=None`` in :meth:`Backend.attention` and :meth:`Backend.merge`: the
  log-sum-exp is not wanted (the CPU merge writes it to scratch).
* ``bias`` / ``mask`` ``None``: absent.
* Split-K and paged KV caches: :meth:`Backend.default_splits`
  and :meth:`Backend.split_attention`. The backward pass:
  :meth:`Backend.attention_backward`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

#: A backend's kernel array (numpy.ndarray or a Numba device array).
KernelArray = Any


class Backend(Protocol):
    """One device's host glue, called by :mod:`numbattn.api` only."""

    #: "cpu" or "cuda" (reported by the benchmark).
    name: str

    def resolve_stream(self, stream: Any, arrays: Sequence[Any]) -> Any:
        """The stream to run on, from the public ``stream=`` argument and the
        call's arrays (CPU: refuses any stream, returns None)."""
        ...

    def as_kernel_array(self, obj: Any, stream: Any = None) -> KernelArray:
        """A view (no copy) of a public array that the kernels accept."""
        ...

    def to_host(self, obj: Any) -> np.ndarray:
        """A host NumPy copy (or the array itself on the CPU) of a small
        argument that must be read on the host, such as integer lengths."""
        ...

    def empty(
        self, shape: Sequence[int], dtype: Any, like: Any = None, stream: Any = None
    ) -> tuple[Any, KernelArray]:
        """A new output ``(public_object, kernel_array)``, in ``like``'s library."""
        ...

    def index(self, arr: KernelArray, idx: Any) -> KernelArray:
        """``arr[idx]`` as a view."""
        ...

    def restride(
        self, arr: KernelArray, shape: tuple[int, ...], strides: tuple[int, ...]
    ) -> KernelArray:
        """A view of ``arr``'s memory with the given shape and byte strides."""
        ...

    def constant(self, value: float, dtype: Any) -> KernelArray:
        """A read-only 1-element array holding ``value``."""
        ...

    def scores(
        self,
        q: KernelArray,
        k: KernelArray,
        out: KernelArray,
        seq: np.ndarray,
        max_rows: int,
        bias: KernelArray | None,
        mask: KernelArray | None,
        scale: float,
        window_left: int,
        window_right: int,
        stream: Any = None,
    ) -> None:
        """Masked, biased scores ``scale * q @ k^T`` of every sequence."""
        ...

    def softmax(self, x: KernelArray, out: KernelArray, stream: Any = None) -> None:
        """Row-wise softmax (``out`` may be ``x``)."""
        ...

    def attention(
        self,
        q: KernelArray,
        k: KernelArray,
        v: KernelArray,
        out: KernelArray,
        lse: KernelArray | None,
        seq: np.ndarray,
        max_rows: int,
        bias: KernelArray | None,
        mask: KernelArray | None,
        scale: float,
        window_left: int,
        window_right: int,
        stream: Any = None,
    ) -> None:
        """Fused attention over the sequences of ``seq``."""
        ...

    def merge(
        self,
        o1: KernelArray,
        l1: KernelArray,
        o2: KernelArray,
        l2: KernelArray,
        out: KernelArray,
        lse: KernelArray | None,
        stream: Any = None,
    ) -> None:
        """Combine two partial results over disjoint key sets (``out``/``lse``
        may be ``o1``/``l1``: in place)."""
        ...

    def attention_backward(
        self,
        q: KernelArray,
        k: KernelArray,
        v: KernelArray,
        out: KernelArray,
        lse: KernelArray,
        dout: KernelArray,
        delta: KernelArray,
        dq: KernelArray,
        dk: KernelArray,
        dv: KernelArray,
        seq: np.ndarray,
        max_rows: int,
        key_rows: int,
        max_keys: int,
        bias: KernelArray | None,
        mask: KernelArray | None,
        scale: float,
        window_left: int,
        window_right: int,
        stream: Any = None,
    ) -> None:
        """Gradients of fused attention over the sequences of ``seq``
        (FlashAttention-2's backward).

        Arrays are (G1, G2, ...) as in :meth:`attention`: ``q``, ``out``,
        ``dout``, ``dq`` have G2 query heads, ``k``, ``v``, ``dk``, ``dv``
        G2 / group key heads (query head h reads key head h // group);
        ``lse`` and ``delta`` are (G1, G2, rows) like the forward's lse.
        Inputs: ``out`` and ``lse`` as :meth:`attention` wrote them (lse is
        the natural log of the sum over visible keys of ``exp(s)``, ``s =
        scale * q.k (+ bias)``; -inf for a row with no visible key) and
        ``dout`` = dL/d(out). ``delta`` is call-owned scratch of q's dtype,
        uninitialised on entry, for ``D = rowsum(dout * out)`` of every real
        row (the backend fills and reads it; the API never reads it).

        For every batch element (a, h), with the table's columns and the
        visibility rule of :mod:`numbattn._sequences` (``off`` is the
        ALIGN column, read in one place), P = exp(s - lse) over visible keys
        (exactly 0 elsewhere, and for a row whose lse is -inf), dP = dout
        V^T, dS = P * (dP - D), and the backend writes, overwriting:

        * ``dq`` rows Q_OFF .. Q_OFF + Q_ROWS - 1: ``scale * dS @ K`` for
          the first Q_LEN rows, zeros for the rest (and for rows with no
          visible key);
        * ``dk`` / ``dv`` rows K_OFF .. K_OFF + max(K_LEN, key_rows) - 1 of
          key head kb: ``scale * sum_h dS_h^T @ Q_h`` / ``sum_h P_h^T @
          dout_h`` summed over the query heads h of kb's group (all
          heads of a group share K_OFF and K_LEN), zeros for rows at or past
          K_LEN and for keys no row sees. Dense calls pass ``key_rows`` =
          Nk (one sequence owns every key row); packed varlen calls pass 0
          (each sequence writes its own keys only: rows of other sequences
          must not be touched, dk/dv views have a zero stride over G1).

        ``max_rows`` is the largest Q_ROWS, ``max_keys`` the largest
        ``max(K_LEN, key_rows)`` (the grids' sizes). The dQ sum over key
        tiles may use atomics (say whether the backend is deterministic);
        dK and dV must not race across the query heads of a group.
        ``bias`` / ``mask``: constants, as in :meth:`attention`.
        """
        ...

    def default_splits(
        self,
        batch: int,
        heads: int,
        group: int,
        max_rows: int,
        max_keys: int,
        *,
        paged: bool = False,
    ) -> int:
        """The split count that ``num_splits=None`` uses (>= 1).

        ``batch``: product of the leading axes before the heads axis (dense;
        the sequence count for varlen and paged calls); ``heads``: query
        heads; ``group``: query heads per key head; ``max_rows``: the
        largest Q_ROWS of the table; ``max_keys``: the largest K_LEN;
        ``paged``: a paged cache (key heads interleaved in each row).
        1 when the backend's work grid already fills the hardware (CPU
        threads, GPU SMs). Pure function of its arguments and the machine
        (thread count, device), never of the data. The API caps the result
        (and an explicit ``num_splits``) at ``max(1, max_keys)``.
        """
        ...

    def split_attention(
        self,
        q: KernelArray,
        k: KernelArray,
        v: KernelArray,
        out: KernelArray,
        lse: KernelArray | None,
        seq: np.ndarray,
        max_rows: int,
        bias: KernelArray | None,
        mask: KernelArray | None,
        scale: float,
        window_left: int,
        window_right: int,
        num_splits: int,
        block_table: KernelArray | None,
        stream: Any = None,
        like: Any = None,
    ) -> None:
        """:meth:`attention`, with each sequence's keys split into chunks whose
        partial results are merged exactly, inside the call; optionally over a
        paged KV cache.

        Writes exactly what :meth:`attention` writes (every row < Q_ROWS of
        every sequence: ``out`` (zeros past Q_LEN or with no visible key),
        ``lse`` when not None (-inf there)), with the same visibility rules
        (numbattn._sequences), bias / mask / window / GQA semantics and NaN
        behaviour (a masked key's value is never read).

        ``num_splits`` >= 1 (already capped at ``max(1, max K_LEN)`` by the
        API): the key range each work item can see under the window is cut
        into at most ``num_splits`` contiguous chunks (how is the backend's
        choice; chunks may be empty). Each chunk gives a partial (o, lse);
        the partials of a row are combined with the merge_attention math
        (``m = max lse_s``, ``e_s = exp(lse_s - m)``, ``out = sum e_s o_s /
        sum e_s``, ``lse = m + log(sum e_s)``; all -inf: zeros and -inf;
        any NaN: NaN) in a fixed order, so the result is bitwise
        reproducible for a given ``num_splits``. Scratch: O(num_splits *
        rows * dv), never O(rows * keys). ``num_splits == 1`` must equal the
        unsplit computation (it may be the same kernel as :meth:`attention`).
        The scratch belongs to the call: never shared with another call (on
        any thread or stream) and never kept after it; a device backend
        allocates it with the array library of ``like`` (the caller's public
        ``q``) on ``stream``.

        ``block_table`` None: ``k``, ``v`` are (G1, Hk, Nk, d) / (G1, Hk,
        Nk, dv) exactly as for :meth:`attention`. Otherwise a paged cache:
        ``k`` (num_blocks, block_size, Hk, d), ``v`` (num_blocks,
        block_size, Hk, dv) (the caller's arrays, any strides, never
        copied) and ``block_table`` an int32 (G1, max_blocks) kernel array
        (on the device for CUDA). Key j of the sequence at (a, h) has the
        logical position ``p = seq[a, h, K_OFF] + j`` and lives at
        ``k[block_table[a, p // block_size], p % block_size, h // group, :]``
        (same for v), ``group = G2 // Hk``. The API has checked that every
        entry a call can read (``p < K_OFF + K_LEN``) is in
        [0, num_blocks); entries past that are never read. ``bias`` and
        ``mask`` are indexed by logical positions, as in the dense case.

        The diagonal offset is ``seq[a, h, ALIGN]``, as for :meth:`attention`.
        The table is constant over heads except when the only leading axis is
        both batch and heads (``q`` (H, Nq, d) with lengths): a kernel that
        shares one table row among the query heads of a key head must check
        (the CPU backend then runs one query head at a time). Paged calls
        always have a (B, H) table constant over heads.
        """
        ...
