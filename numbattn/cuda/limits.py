"""Hardware limits the CUDA backend and ``gpu-report`` reason with, in one place.

Per-block limits (every compute capability numbattn targets, 7.0 and up)
    ``MAX_THREADS_PER_BLOCK`` threads, ``MAX_STATIC_SHARED`` bytes of static
    shared memory (``cuda.shared.array``; more needs dynamic shared memory
    and an opt-in, which numbattn does not use), ``MAX_REGS_PER_THREAD``
    registers (ptxas spills beyond), and a register file of
    ``REGS_PER_BLOCK``: a block of ``w`` warps needs
    ``ceil(regs * 32 / 256) * 256 * ceil(w / 4) * 4`` registers of it (the
    hardware check rounds the warps up to the four sub-partitions).

Per-SM limits (:data:`SM_LIMITS`, by compute capability)
    From the CUDA C++ Programming Guide's "Technical Specifications per
    Compute Capability" and the occupancy rules of ``cuda_occupancy.h``
    (CUDA 13), which :func:`blocks_per_sm` follows:

    cc    threads/SM  blocks/SM  shared/SM  shared/block (opt-in)  registers/SM
    8.0   2048        32         164 KiB    163 KiB                64 Ki
    8.6   1536        16         100 KiB    99 KiB                 64 Ki
    8.9   1536        24         100 KiB    99 KiB                 64 Ki
    9.0   2048        32         228 KiB    227 KiB                64 Ki

    The driver reserves 1 KiB of shared memory per block (cc >= 8.0);
    shared memory is allocated in 128-byte units, registers in 256 per warp,
    per sub-partition (4 per SM, 16 Ki registers each). The shared-memory
    limit assumes the default carveout (the driver gives the kernel as much
    shared memory as the SM has).
"""

from __future__ import annotations

MAX_THREADS_PER_BLOCK = 1024
MAX_STATIC_SHARED = 48 * 1024
MAX_REGS_PER_THREAD = 255
REGS_PER_BLOCK = 65536
WARP = 32
REG_ALLOC_UNIT = 256  # registers, per warp
SUB_PARTITIONS = 4
SHARED_ALLOC_UNIT = 128  # bytes (cc >= 8.0)

#: Per-SM limits by compute capability ("major.minor"); see the module docstring.
SM_LIMITS: dict[str, dict[str, int]] = {
    "8.0": dict(
        threads=2048,
        blocks=32,
        regs=65536,
        shared=164 * 1024,
        shared_per_block_optin=163 * 1024,
        reserved_shared_per_block=1024,
    ),
    "8.6": dict(
        threads=1536,
        blocks=16,
        regs=65536,
        shared=100 * 1024,
        shared_per_block_optin=99 * 1024,
        reserved_shared_per_block=1024,
    ),
    "8.9": dict(
        threads=1536,
        blocks=24,
        regs=65536,
        shared=100 * 1024,
        shared_per_block_optin=99 * 1024,
        reserved_shared_per_block=1024,
    ),
    "9.0": dict(
        threads=2048,
        blocks=32,
        regs=65536,
        shared=228 * 1024,
        shared_per_block_optin=227 * 1024,
        reserved_shared_per_block=1024,
    ),
}


#: The most shared memory per SM among the supported capabilities. Launch
#: bounds are fixed when a kernel is built, before its target is known, so
#: the resident blocks they ask for are capped by the largest SM (on a
#: smaller one, fewer fit: the bound only sets the register budget).
SHARED_PER_SM_MAX = max(lim["shared"] for lim in SM_LIMITS.values())
RESERVED_SHARED_PER_BLOCK = max(lim["reserved_shared_per_block"] for lim in SM_LIMITS.values())


def launch_blocks(want: int, shared: int) -> int:
    """Resident blocks per SM to ask of ptxas (``launch_bounds``): ``want``,
    as far as blocks of ``shared`` bytes of static shared memory fit in
    :data:`SHARED_PER_SM_MAX`; at least 1."""
    per_block = shared + RESERVED_SHARED_PER_BLOCK
    return max(1, min(want, SHARED_PER_SM_MAX // per_block))


def cc_key(cc) -> str:
    """ "9.0" from "9.0", "90", "sm_90", (9, 0) or 9.0; ValueError if unknown."""
    if isinstance(cc, tuple | list):
        key = f"{int(cc[0])}.{int(cc[1])}"
    else:
        text = str(cc).strip().lower().removeprefix("sm_").removeprefix("compute_")
        if "." not in text and text.isdigit() and len(text) >= 2:
            text = f"{text[:-1]}.{text[-1]}"
        key = text
    if key not in SM_LIMITS:
        raise ValueError(
            f"unknown compute capability {cc!r}: expected one of {', '.join(SM_LIMITS)}"
        )
    return key


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def regs_per_block(regs: int, threads: int) -> int:
    """Registers a block takes from the register file, as the launch check counts them."""
    warps = -(-threads // WARP)
    per_warp = _round_up(regs * WARP, REG_ALLOC_UNIT)
    return per_warp * _round_up(warps, SUB_PARTITIONS)


def launch_problem(threads: int, shared: int, regs: int | None = None) -> str | None:
    """Why a block of ``threads`` threads using ``shared`` bytes of static
    shared memory (and ``regs`` registers per thread, when known) cannot
    launch on any supported GPU; None when it can."""
    if threads > MAX_THREADS_PER_BLOCK:
        return f"{threads} threads per block (the limit is {MAX_THREADS_PER_BLOCK})"
    if shared > MAX_STATIC_SHARED:
        return f"{shared} bytes of static shared memory (the limit is {MAX_STATIC_SHARED})"
    if regs is not None:
        if regs > MAX_REGS_PER_THREAD:
            return f"{regs} registers per thread (the limit is {MAX_REGS_PER_THREAD})"
        need = regs_per_block(regs, threads)
        if need > REGS_PER_BLOCK:
            return (
                f"{regs} registers x {threads} threads = {need} registers per block "
                f"(allocated per warp; the register file holds {REGS_PER_BLOCK})"
            )
    return None


def blocks_per_sm(cc, threads: int, regs: int, shared: int) -> dict:
    """Resident blocks per SM of a kernel (static shared memory only), as
    ``cuda_occupancy.h`` computes it: ``{"blocks_per_sm", "warps_per_sm",
    "occupancy" (resident warps / the SM's maximum), "limited_by"
    (the limits reaching that minimum: "registers", "shared", "threads",
    "blocks"; or the reason the block cannot launch at all)}``."""
    lim = SM_LIMITS[cc_key(cc)]
    warps = -(-threads // WARP)
    problem = launch_problem(threads, shared, regs)
    by: dict[str, int] = {}
    if problem is None:
        per_warp = _round_up(regs * WARP, REG_ALLOC_UNIT)
        if per_warp:
            warps_per_part = (lim["regs"] // SUB_PARTITIONS) // per_warp
            by["registers"] = (warps_per_part * SUB_PARTITIONS) // warps
        smem = _round_up(shared + lim["reserved_shared_per_block"], SHARED_ALLOC_UNIT)
        by["shared"] = lim["shared"] // smem
        by["threads"] = (lim["threads"] // WARP) // warps
        by["blocks"] = lim["blocks"]
        blocks = min(by.values())
        limited = [k for k, v in by.items() if v == blocks]
    else:
        blocks, limited = 0, [problem]
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": round(blocks * warps / (lim["threads"] // WARP), 4),
        "limited_by": limited,
    }
