"""Kernel geometries: frozen tile configurations with their derived sizes and
the check, made before compiling, that a device can run them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import limits

#: Step kinds by element type; the first is the default where the device has it.
KINDS = {"float32": ("tf32x3", "tf32"), "float64": ("f64", "f64x4")}


def step_kind(dtype, cc: tuple[int, int], precision: str = "fp32") -> str | None:
    """The product step for ``dtype`` on compute capability ``cc``, or None
    where the tensor cores cannot take it (before sm_80).

    ``precision`` (float32 only): ``"fp32"`` (3xTF32, float32 accuracy) or
    ``"tf32"`` (one TF32 product).
    """
    if tuple(cc) < (8, 0):
        return None
    if np.dtype(dtype) == np.float64:
        return "f64" if tuple(cc) >= (9, 0) else "f64x4"
    return "tf32" if precision == "tf32" else "tf32x3"


def scratch_elements(kind: str) -> int:
    """Shared-memory elements a warp's emulated step uses (A then B, with the
    ``small`` halves after them for ``"tf32x3"``)."""
    return 2 * (128 + 64) if kind == "tf32x3" else 128 + 64


#: Resident threads per SM the tensor-core kernels' launch bounds ask for
#: where shared memory allows (at most 128 registers a thread).
TC_THREADS_PER_SM = 512


def _stride(n: int, rem: int, period: int) -> int:
    """Smallest row stride >= n elements that is ``rem`` modulo ``period``."""
    return n + (rem - n) % period


@dataclass(frozen=True)
class TensorCoreGeometry:
    """The fused forward on the tensor cores (:mod:`numbattn.cuda.tensor`).

    Each warp owns 16 query rows (one m16 tile); a block of ``warps`` warps
    takes ``query_tile = 16 * warps`` rows, steps over keys ``key_tile`` at a
    time (n-tiles of 8), the head dimension ``head_chunk`` at a time (k-steps
    of 8) and accumulates ``value_chunk`` output columns in registers.
    ``kind`` is the product step (:func:`step_kind`).
    """

    dtype: str
    kind: str
    warps: int
    key_tile: int
    head_chunk: int
    value_chunk: int

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def query_tile(self) -> int:
        return 16 * self.warps

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def layout(self, hw: bool) -> dict[str, int]:
        """Shared-memory regions (element offsets) and row strides.

        The strides make the fragment reads conflict-free: a warp reads
        ``X[g][t]`` of Q and K (``g`` < 8 rows, ``t`` < 4 columns) and
        ``V[2t][g]``. Four-byte elements need ``4g + t`` and ``8t + g``
        distinct modulo 32 banks: both strides 4 mod 32. Eight-byte elements
        are read a half-warp (``g`` < 4) at a time over 16 bank pairs: the
        Q/K stride 4 and the V stride 2, modulo 16. P, when it goes through
        shared memory (a non-finite value in V), reuses K's region.
        """
        wide = self.itemsize == 8
        BQ, BK = self.query_tile, self.key_tile
        qs = _stride(self.head_chunk, 4, 16 if wide else 32)
        vs = _stride(self.value_chunk, 2 if wide else 4, 16 if wide else 32)
        ps = BK + 1
        lay = dict(QS=qs, VS=vs, PS=ps)
        off = 0
        for name, size in (
            ("Q", BQ * qs),
            ("K", max(BK * qs, BQ * ps)),
            ("V", BK * vs),
            ("R1", 0 if hw else BQ * 4),  # row reductions without shuffles
            ("R2", 0 if hw else BQ * 4),
            ("X", 0 if hw else self.warps * scratch_elements(self.kind)),
        ):
            lay["OFF_" + name] = off
            off += -(-size // 2) * 2  # keeps eight-byte alignment of four-byte regions
        lay["TOTAL"] = max(off, 1)
        return lay

    def shared_bytes(self, hw: bool) -> int:
        return self.layout(hw)["TOTAL"] * self.itemsize

    def launch_bounds(self, cc: str = "9.0") -> tuple[int, int]:
        """(threads, minimum resident blocks) for ``cuda.jit(launch_bounds=...)``."""
        return _launch_bounds(self, cc)

    def problem(self, cc: tuple[int, int] | None, hw: bool = True) -> str | None:
        """Why this geometry cannot run on compute capability ``cc`` (None:
        it can). ``cc`` None: the simulator, which emulates every step."""
        if self.key_tile % 8 or self.head_chunk % 8 or self.value_chunk % 8:
            return (
                "the tensor-core kernel needs key tile, head chunk and value chunk "
                f"multiples of 8, got {self.key_tile}, {self.head_chunk}, {self.value_chunk}"
            )
        return _block_problem(self, cc, hw)

    def can_implement(self, cc: tuple[int, int] | None, hw: bool = True) -> bool:
        return self.problem(cc, hw) is None


@dataclass(frozen=True)
class TensorCoreScoresGeometry:
    """``scores`` on the tensor cores (:func:`numbattn.cuda.tensor.make_scores_tc`).

    Each warp owns 16 rows (one m16 tile); a block of ``warps`` warps writes
    ``row_tile = 16 * warps`` rows by ``column_tile`` columns (n-tiles of 8),
    taking the head dimension ``head_chunk`` at a time (k-steps of 8).
    ``kind`` is the product step (:func:`step_kind`).
    """

    dtype: str
    kind: str
    warps: int
    column_tile: int
    head_chunk: int

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def row_tile(self) -> int:
        return 16 * self.warps

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def layout(self, hw: bool) -> dict[str, int]:
        """Shared-memory regions (element offsets) and row strides: ``QS`` of
        Q and K, conflict-free for the fragment reads ``X[g][t]`` as in
        :meth:`TensorCoreGeometry.layout`; ``PS`` of the finished tile S,
        which takes Q's and K's place for the coalesced writes."""
        qs = _stride(self.head_chunk, 4, 16 if self.itemsize == 8 else 32)
        ps = self.column_tile + 1
        lay = dict(QS=qs, PS=ps)
        off = 0
        for name, size in (
            ("Q", self.row_tile * qs),
            ("K", max(self.column_tile * qs, self.row_tile * ps - self.row_tile * qs)),
            ("X", 0 if hw else self.warps * scratch_elements(self.kind)),
        ):
            lay["OFF_" + name] = off
            off += -(-size // 2) * 2
        lay["TOTAL"] = max(off, 1)
        return lay

    def shared_bytes(self, hw: bool) -> int:
        return self.layout(hw)["TOTAL"] * self.itemsize

    def launch_bounds(self, cc: str = "9.0") -> tuple[int, int]:
        """(threads, minimum resident blocks) for ``cuda.jit(launch_bounds=...)``."""
        return _launch_bounds(self, cc)

    def problem(self, cc: tuple[int, int] | None, hw: bool = True) -> str | None:
        """Why this geometry cannot run on compute capability ``cc`` (None:
        it can). ``cc`` None: the simulator, which emulates every step."""
        if self.column_tile % 8 or self.head_chunk % 8:
            return (
                "the tensor-core scores kernel needs a column tile and head chunk "
                f"multiples of 8, got {self.column_tile}, {self.head_chunk}"
            )
        return _block_problem(self, cc, hw)

    def can_implement(self, cc: tuple[int, int] | None, hw: bool = True) -> bool:
        return self.problem(cc, hw) is None


def _launch_bounds(geo, cc: str) -> tuple[int, int]:
    want = max(1, -(-TC_THREADS_PER_SM // geo.threads))
    per_block = geo.shared_bytes(True) + limits.SM_LIMITS[cc]["reserved_shared_per_block"]
    fit = limits.SM_LIMITS[cc]["shared"] // per_block
    return geo.threads, max(1, min(want, fit))


def _block_problem(geo, cc: tuple[int, int] | None, hw: bool) -> str | None:
    """What keeps a tensor-core block of ``geo`` from running (threads, static
    shared memory, the step's compute capability), or None."""
    if geo.threads > limits.MAX_THREADS_PER_BLOCK:
        return f"{geo.threads} threads exceed {limits.MAX_THREADS_PER_BLOCK} a block"
    if geo.shared_bytes(hw) > limits.MAX_STATIC_SHARED:
        return (
            f"{geo.shared_bytes(hw)} bytes of shared memory exceed the static "
            f"limit {limits.MAX_STATIC_SHARED}"
        )
    if cc is not None:
        need = (9, 0) if geo.kind == "f64" else (8, 0)
        if tuple(cc) < need:
            return f"step {geo.kind!r} needs compute capability {need[0]}.{need[1]}"
    return None
