"""Tuning knobs, read at call time (never baked into compiled code).

Kernels receive these as ordinary arguments, so tests can shrink them to
force multi-tile paths on tiny inputs without triggering a recompilation::

    monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", 8)

Every knob is checked when a call reads it, before anything is written: a
ValueError names the knob unless it is a positive integer (CPU_STREAM_ROWS,
CPU_BWD_SPLIT_BYTES, CPU_SERIAL_WORK and CUDA_STREAM_ROWS may also be 0;
CUDA_BWD_FAST_LOOP and CUDA_TENSOR_CORES are bools; CUDA_FLOAT32_PRECISION is
"fp32" or "tf32").
"""

# --- CPU (numbattn.cpu) ----------------------------------------------------
#: Query rows handled by one parallel work item of the fused kernel and of
#: ``scores``. Also the granularity of load balancing across threads. Each
#: work item packs its K and V tiles again, so taller tiles amortise the
#: packing: 128 ran 1.03-1.5x faster than 64 at (1, 8, 2048, 64), (4, 8, 512,
#: 64), (1, 8, 4096, 128) and (1, 32, 1024, 64), fp32 and fp64, causal too
#: (2-vCPU AMD EPYC Zen 4 VM, 2 threads, 2026-11-28; docs/performance.md). The fused kernel's
#: items take up to four query tiles of a head that share each packed K / V
#: tile (numbattn.cpu.kernels._tile_group).
CPU_QUERY_TILE = 128
#: Keys per online-softmax step of the fused kernel (and per ``scores`` tile).
#: The working set is about CPU_QUERY_TILE x CPU_KEY_TILE scores plus a
#: packed K and V tile, sized to stay in L1/L2.
CPU_KEY_TILE = 128
#: Query rows per work item of ``scores`` (its K tiles are packed once per
#: item). 256 ran 0.97-1.1x as fast as 512 and 0.99-1.05x as fast as 128 at
#: (4, 8, 512, 64) and (1, 8, 2048, 64), causal and not, fp32 and fp64
#: (Zen 4, one thread, CPU time, 2026-11-28; the settings alternated in one
#: process).
CPU_SCORES_QUERY_TILE = 256
#: Keys per tile of ``scores``. Its 4-row blocks are written straight into
#: the output rows; longer runs of a row per tile write the output at nearly
#: the rate of a scratch tile (512: 0.9-1.0x of a scratch tile, 128: 0.75x;
#: Zen 4, one thread; 256 against 512: 0.93-1.15x). The packed K tile
#: (d x 512) stays in L2.
CPU_SCORES_KEY_TILE = 512
#: Query rows per step of the backward pass (rounded up to a multiple of 4).
#: 128 x 128 tiles (S, dP, the packed K, K^T, V^T and the dK / dV scratch:
#: 64 KiB each in float32, in L2) ran as fast as 64 x 128 non-causal and
#: up to 5% faster causal (Zen 4, one thread, CPU time, 2026-11-28).
CPU_BWD_QUERY_TILE = 128
#: Keys per work unit of the backward pass: each key tile's dK and dV stay
#: in registers-sized scratch while the query tiles that see it stream by.
CPU_BWD_KEY_TILE = 128
#: Bytes of dQ accumulators the backward may use to split one head's key
#: tiles across threads (few heads, many threads); one dq-sized array is
#: always allowed.
CPU_BWD_SPLIT_BYTES = 32 << 20
#: Few queries (decoding): calls whose longest query count is at most this run
#: the streaming kernel (K and V rows read in place, the query heads of a key
#: head together, split over keys); longer ones the tiled kernel above.
CPU_STREAM_ROWS = 16
#: Keys per online-softmax step of the streaming kernel.
CPU_STREAM_KEY_TILE = 256
#: Query rows per key head (GQA group x queries) from which the streaming
#: kernel runs P @ V through a 4 x 4 register block (arithmetic-bound);
#: fewer rows read two V rows per pass in address order (bound by the read).
#: 4 rows were 1.2x slower through the register block (32 q / 8 kv decode).
CPU_STREAM_WIDE_ROWS = 8
#: ``num_splits=None`` never makes a key chunk shorter than this.
CPU_MIN_SPLIT_KEYS = 512
#: Forward calls of at most this many multiply-adds (rows x keys x (d + dv)
#: per head) run on the calling thread (the kernels' serial twins, same
#: results): waking Numba's threads took 5.4 us of an 8 us kernel call at
#: (1, 8, 1, 1, 64) float32 (AMD EPYC Zen 4, 2 threads, 2026-12-05), where
#: the serial kernel took 2.6 us. 0: always parallel.
CPU_SERIAL_WORK = 1 << 14

# --- CUDA (numbattn.cuda) --------------------------------------------------
# Checked at call time, before any launch (ValueError naming the knob): each
# is a positive integer, *_PER_THREAD divides its tile, CUDA_SOFTMAX_THREADS
# is a power of two, and every kernel's block fits 1024 threads and 48 KiB of
# static shared memory (numbattn/cuda/limits.py). On a GPU, the first launch
# also checks the compiled kernel's registers x threads against the register
# file. `python -m numbattn gpu-report` shows what a geometry compiles to.
#: Query rows per thread block of the fused attention kernel (float32).
CUDA_QUERY_TILE = 64
#: Keys staged in shared memory per step of the fused attention kernel (float32;
#: 64 would exceed the 48 KiB static shared-memory budget with CUDA_HEAD_CHUNK=64).
CUDA_KEY_TILE = 32
#: Threads per block for the row-wise softmax kernel.
CUDA_SOFTMAX_THREADS = 128
#: Square output tile edge of the ``scores`` kernel (rows and columns per block).
CUDA_SCORES_TILE = 64
#: Each ``scores`` thread computes CUDA_SCORES_PER_THREAD**2 outputs (a register
#: micro-tile), so a block has (CUDA_SCORES_TILE / CUDA_SCORES_PER_THREAD)**2 threads.
CUDA_SCORES_PER_THREAD = 4
#: Head dimensions of q and k staged in shared memory per step of ``scores``
#: (zero-padded: a fixed, unrolled trip count).
CUDA_SCORES_HEAD_CHUNK = 16

# Geometry of the fused CUDA attention kernel (see numbattn/cuda/kernels.py).
# For float32, CUDA_QUERY_TILE and CUDA_KEY_TILE above apply; float64 has its
# own (smaller: twice the bytes, same 48 KiB static shared-memory budget).
# Each thread owns CUDA_ROWS_PER_THREAD query rows and scores
# CUDA_KEYS_PER_THREAD keys per tile (a register micro-tile), so a block has
# (QUERY_TILE / ROWS_PER_THREAD) * (KEY_TILE / KEYS_PER_THREAD) threads.
# The defaults give 256 (float32) and 128 (float64) threads whose hardware
# paths fit 16 warps per SM on cc 9.0 without spills (launch bounds cap the
# registers at 128; `gpu-report` shows the figures).
CUDA_QUERY_TILE_F64 = 32
CUDA_KEY_TILE_F64 = 16
CUDA_ROWS_PER_THREAD = 2
CUDA_ROWS_PER_THREAD_F64 = 1
CUDA_KEYS_PER_THREAD = 4
#: Head dimensions staged per step; Q stays resident in shared memory when
#: d <= CUDA_HEAD_CHUNK (larger d works, re-staging Q per chunk: slower).
CUDA_HEAD_CHUNK = 64
#: Value columns per launch of the fused kernel (register accumulators);
#: larger dv runs several launches over column slices (slower).
CUDA_VALUE_CHUNK = 64
#: Bytes of shared memory caching one softmax row (longer rows re-read it).
CUDA_SOFTMAX_CACHE_BYTES = 16384

# The fused forward on the tensor cores (compute capability 8.0 and up, and
# the simulator's emulation): each warp owns 16 query rows, so a block of
# CUDA_TC_WARPS[_F64] warps takes 16 x that many rows, and steps over keys
# CUDA_TC_KEY_TILE[_F64] at a time (a multiple of 8); CUDA_HEAD_CHUNK and
# CUDA_VALUE_CHUNK (multiples of 8) apply. Off, or before sm_80, the FMA
# kernel above runs.
CUDA_TENSOR_CORES = True
#: float32 products on the tensor cores: "fp32" splits each operand in two
#: TF32 halves and takes three products (3xTF32, float32 accuracy); "tf32"
#: rounds each operand to TF32 and takes one (about 1e-3 relative error,
#: faster; opt-in, like torch's allow_tf32).
CUDA_FLOAT32_PRECISION = "fp32"
CUDA_TC_WARPS = 4
CUDA_TC_KEY_TILE = 32
CUDA_TC_WARPS_F64 = 2
CUDA_TC_KEY_TILE_F64 = 16
# ``scores`` on the tensor cores (where the forward takes them): a block of
# CUDA_TC_SCORES_WARPS warps writes 16 x that many rows by
# CUDA_TC_SCORES_TILE columns (a multiple of 8), staging q and k
# CUDA_TC_SCORES_HEAD_CHUNK head dimensions (a multiple of 8) at a time;
# float32 and float64 alike (float64 at 64 x 64 x 32: 36 KiB of shared memory).
CUDA_TC_SCORES_WARPS = 4
CUDA_TC_SCORES_TILE = 64
CUDA_TC_SCORES_HEAD_CHUNK = 32

# Geometry of the CUDA backward kernels (numbattn/cuda/backward.py): a block
# keeps ROW_TILE of its own rows (queries for dQ, keys for dK/dV) resident
# and streams COL_TILE rows of the other side per step; each thread computes
# ROWS_PER_THREAD x COLS_PER_THREAD scores, so a block has
# (ROW_TILE / ROWS_PER_THREAD) * (COL_TILE / COLS_PER_THREAD) threads. Whole
# head rows stay in shared memory: for wide heads the backend halves the
# tiles (COL_TILE first) until the block fits 48 KiB. float64 runs on the
# tensor cores (DMMA) when the block is 4 threads per own row and the
# streamed tile a multiple of 8 (the defaults: 64 threads, 16 x 16 tiles).
CUDA_BWD_ROW_TILE = 32
CUDA_BWD_COL_TILE = 32
CUDA_BWD_ROWS_PER_THREAD = 2
CUDA_BWD_COLS_PER_THREAD = 4
CUDA_BWD_ROW_TILE_F64 = 16
CUDA_BWD_COL_TILE_F64 = 16
CUDA_BWD_ROWS_PER_THREAD_F64 = 2
CUDA_BWD_COLS_PER_THREAD_F64 = 2
#: float32 backward: run the interior tiles (whole tiles, every pair visible,
#: no mask or bias, head dims <= 64) in the unrolled fast loop; False runs
#: every tile in the general loop (same results up to summation order).
CUDA_BWD_FAST_LOOP = True
# The backward kernels on the tensor cores (CUDA_TENSOR_CORES; the product
# step and CUDA_FLOAT32_PRECISION as the forward's): 16 own rows a warp,
# CUDA_BWD_TC_WARPS[_F64] warps a block, streamed tiles of
# CUDA_BWD_TC_COL_TILE[_F64] rows (a multiple of 8), halved while whole
# rows do not fit 48 KiB of shared memory; the FMA kernels above otherwise.
CUDA_BWD_TC_WARPS = 2
CUDA_BWD_TC_COL_TILE = 32
CUDA_BWD_TC_WARPS_F64 = 1
CUDA_BWD_TC_COL_TILE_F64 = 8
# Streaming split-K attention for few queries (numbattn/cuda/decode.py).
# A block is CUDA_DECODE_TEAMS teams of CUDA_DECODE_LANES lanes (a lane per
# head dimension modulo the team width); it owns CUDA_DECODE_ROWS rows
# (query heads of one KV head x queries) and a team takes
# CUDA_DECODE_KEYS[_F64] keys per step.
#: ``attention`` runs the streaming kernel when (query heads per KV head) x
#: (longest query count) is at most this; larger calls the fused kernel.
CUDA_STREAM_ROWS = 16
#: Lanes per team (a power of two <= 32: the lanes of one warp on a GPU).
CUDA_DECODE_LANES = 32
#: Teams (warps) per block.
CUDA_DECODE_TEAMS = 4
#: Rows (query head x query pairs) per block, at most (a call with fewer rows
#: per KV head uses the next power of two above them).
CUDA_DECODE_ROWS = 4
#: Keys per team and step, float32 / float64, at up to 2 rows per block
#: (halved per doubling of the rows past 2, and as elements per lane grow
#: past 4: more loads in flight, more registers; float32 at d = 128: 4 keys
#: of 1 or 2 rows, 2 keys of 4 rows fit 128 registers, 16 warps per SM on cc
#: 9.0, see numbattn/cuda/decode.py).
CUDA_DECODE_KEYS = 4
CUDA_DECODE_KEYS_F64 = 2
#: ``num_splits=None`` never makes a key chunk shorter than this.
CUDA_MIN_SPLIT_KEYS = 256
#: Threads per block of the kernel merging the splits (over value columns).
CUDA_SPLIT_MERGE_THREADS = 128


# --- Change tracking ----------------------------------------------------------
# Calls cache a plan per signature (numbattn._plans), with this count in it:
# every assignment to a knob, and every execution of this module (a reload),
# starts a new generation, so a changed knob makes a new plan.
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


class _Knobs(_types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        _types.ModuleType.__setattr__(self, name, value)
        _types.ModuleType.__setattr__(self, "_generation", self.__dict__["_generation"] + 1)

    def __delattr__(self, name: str) -> None:
        _types.ModuleType.__delattr__(self, name)
        _types.ModuleType.__setattr__(self, "_generation", self.__dict__["_generation"] + 1)


_generation = globals().get("_generation", 0) + 1
_module = _sys.modules.get(__name__)
if _module is not None and _module.__dict__ is globals():  # not a copy loaded from the file
    _module.__class__ = _Knobs
