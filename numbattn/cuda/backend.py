"""Host side of the CUDA backend: availability, streams, buffers, launches.

Mirror of :mod:`numbattn.cpu.backend`. Importing this module never imports
numba.cuda (nor torch/CuPy); everything CUDA is imported lazily, so
:func:`cuda_problem` can explain what is missing.

Launches bypass the dispatcher's per-call argument typing: every kernel is
compiled once per (dtype, geometry) for layout-'A' arrays (any strides, one
compilation whatever the layouts) and launched through the compiled kernel
object, which keeps the host time per call close to the bare launch cost.
"""

from __future__ import annotations

import importlib.util
import math
import threading

import numpy as np

from .. import config
from . import limits
from .args import AttentionArgs, MergeArgs, ScoresArgs, SoftmaxArgs, signature

name = "cuda"

_ok = False
_lock = threading.Lock()
_kernels: dict = {}
_compiled: dict = {}
_streams: dict = {}
_dummies: dict = {}
_state: dict = {}


# --------------------------------------------------------------------------
# Availability


def _numpy_too_new() -> str | None:
    if np.lib.NumpyVersion(np.__version__) < "2.5.0":
        return None
    try:
        from importlib.metadata import version

        ver = version("numba-cuda")
    except Exception:
        return None
    parts = tuple(int(p) for p in ver.split(".")[:2] if p.isdigit())
    if parts < (0, 31):
        return (
            f"numba-cuda {ver} cannot compile kernels with NumPy {np.__version__} "
            "(it references np.row_stack, removed in NumPy 2.5); install numpy<2.5 "
            '(pip install "numbattn[cuda]" pins it) or a newer numba-cuda'
        )
    return None


def cuda_problem() -> str | None:
    """None when the CUDA backend is usable, else why not (one sentence)."""
    if importlib.util.find_spec("numba_cuda") is None:
        return (
            "numba-cuda is not installed (numba's own CUDA target is not supported); "
            'install it with: pip install "numbattn[cuda]"'
        )
    reason = _numpy_too_new()
    if reason:
        return reason
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - broken installations
        return f"importing numba.cuda failed: {type(exc).__name__}: {exc}"
    impl = getattr(cuda, "implementation", None)
    if impl != "NVIDIA":
        return (
            f"numba.cuda is numba's old built-in CUDA target (implementation={impl!r}), "
            'not numba-cuda; install numba-cuda: pip install "numbattn[cuda]"'
        )
    try:
        available = cuda.is_available()
    except Exception as exc:  # pragma: no cover
        return f"CUDA initialisation failed: {type(exc).__name__}: {exc}"
    if not available:
        return (
            "no usable NVIDIA GPU or driver was found (numba.cuda.is_available() is False); "
            "set NUMBA_ENABLE_CUDASIM=1 to run on the (slow) CUDA simulator"
        )
    return None


def require_cuda() -> None:
    """Raise RuntimeError with :func:`cuda_problem`'s reason unless usable."""
    global _ok
    if _ok:
        return
    reason = cuda_problem()
    if reason is not None:
        raise RuntimeError(f"numbattn's CUDA backend is unavailable: {reason}")
    _ok = True


def simulator() -> bool:
    """Whether numba-cuda runs on its CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``);
    the first call installs numbattn's simulator support (:mod:`numbattn.cuda._sim`)."""
    sim = _state.get("sim")
    if sim is None:
        from numba.cuda.core import config as ncfg

        sim = _state["sim"] = bool(ncfg.ENABLE_CUDASIM)
        if sim:
            from . import _sim

            _sim.install()
    return sim


# --------------------------------------------------------------------------
# Streams and arrays


def _library(obj) -> str:
    return type(obj).__module__.partition(".")[0]


def _external(ptr: int):
    from numba import cuda

    if not ptr:
        return 0
    if ptr == 1:
        return cuda.legacy_default_stream()
    if ptr == 2:
        return cuda.per_thread_default_stream()
    stream = _streams.get(ptr)
    if stream is None:
        stream = _streams[ptr] = cuda.external_stream(ptr)
    return stream


def resolve_stream(stream, arrays):
    """The Numba stream to launch on (never synchronises the host)."""
    if stream is not None:
        lib = _library(stream)
        if lib == "numba" or lib == "numba_cuda":
            return stream
        if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
            return _external(int(stream))
        ptr = getattr(stream, "cuda_stream", None)  # torch.cuda.Stream
        if ptr is None:
            ptr = getattr(stream, "ptr", None)  # cupy.cuda.Stream
        if ptr is None:
            raise TypeError(
                "stream must be a Numba stream, a CuPy or PyTorch CUDA stream, or an "
                f"integer stream handle; got {type(stream).__module__}.{type(stream).__qualname__}"
            )
        return _external(int(ptr))
    for obj in arrays:
        lib = _library(obj)
        if lib == "torch":
            import torch

            return _external(torch.cuda.current_stream(obj.device).cuda_stream)
        if lib == "cupy":
            import cupy

            with obj.device:
                return _external(cupy.cuda.get_current_stream().ptr)
    return 0


def _device_array_types():
    types_ = _state.get("devtypes")
    if types_ is None:
        if simulator():
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

            types_ = (FakeCUDAArray,)
        else:
            from numba.cuda.cudadrv.devicearray import DeviceNDArray

            types_ = (DeviceNDArray,)
        _state["devtypes"] = types_
    return types_


def _from_interface(obj):
    """DeviceNDArray view of a CUDA-array-interface object, without the
    stream wrapping/synchronisation of numba's ``as_cuda_array``."""
    from numba.cuda.api_util import prepare_shape_strides_dtype
    from numba.cuda.cudadrv import devicearray, driver
    from numba.cuda.cudadrv.devices import get_context

    desc = obj.__cuda_array_interface__
    if desc.get("mask") is not None:
        raise NotImplementedError("masked CUDA arrays are not supported")
    shape, strides, dtype = prepare_shape_strides_dtype(
        desc["shape"], desc.get("strides"), desc["typestr"], order="C"
    )
    if math.prod(shape) == 0 or desc["data"][0] == 0:
        return devicearray.DeviceNDArray(shape, strides, dtype)
    size = driver.memory_size_from_info(shape, strides, dtype.itemsize)
    data = driver.MemoryPointer(
        get_context(), driver.binding.CUdeviceptr(desc["data"][0]), size=size, owner=obj
    )
    return devicearray.DeviceNDArray(shape, strides, dtype, gpu_data=data)


def as_kernel_array(obj, stream=None):
    """A Numba device-array view (no copy) of a GPU array."""
    if isinstance(obj, _device_array_types()):
        return obj
    if simulator():
        from . import _sim

        return _sim.from_interface(obj)
    try:
        return _from_interface(obj)
    except ImportError:  # pragma: no cover - other numba-cuda versions
        from numba import cuda

        return cuda.as_cuda_array(obj, sync=False)


def to_host(obj) -> np.ndarray:
    """A host copy of a GPU array (synchronises)."""
    return as_kernel_array(obj).copy_to_host()


def empty(shape, dtype, like=None, stream=None):
    """New output in the caller's array library: ``(obj, kernel_array)``."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    lib = _library(like) if like is not None else ""
    if lib == "torch":
        import torch

        t = torch.empty(shape, dtype=getattr(torch, dtype.name), device=like.device)
        return t, as_kernel_array(t, stream)
    if lib == "cupy":
        import cupy

        with like.device:
            a = cupy.empty(shape, dtype=dtype)
        return a, as_kernel_array(a, stream)
    from numba import cuda

    arr = cuda.device_array(shape, dtype=dtype, stream=stream or 0)
    return arr, arr


def view_at(arr, offset: int, shape, strides):
    """A view of ``arr``'s memory whose element 0 lies ``offset`` bytes from
    ``arr``'s element 0, with the given shape and byte strides (any sign, 0
    included). O(1): Numba's own ``DeviceNDArray.__getitem__`` lists every
    contiguous extent of a non-contiguous result in Python, which took
    seconds per call for a column slice of a (32, 32768, 128) KV cache on the
    H200, and it refuses any slice of an empty array."""
    shape, strides = tuple(int(n) for n in shape), tuple(int(s) for s in strides)
    if simulator():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        host = arr._ary
        desc = {
            "shape": shape,
            "strides": strides,
            "typestr": host.dtype.str,
            "data": (host.__array_interface__["data"][0] + offset, False),
            "version": 3,
        }
        return FakeCUDAArray(np.asarray(_HostView(desc, host)), stream=arr.stream)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    if math.prod(shape) == 0:
        return DeviceNDArray(shape, strides, arr.dtype, stream=arr.stream)
    data = arr.gpu_data if offset == 0 else arr.gpu_data.view(offset)
    return DeviceNDArray(shape, strides, arr.dtype, stream=arr.stream, gpu_data=data)


class _HostView:
    """An ``__array_interface__`` that keeps the simulator's host buffer alive."""

    def __init__(self, desc, owner):
        self.__array_interface__ = desc
        self._owner = owner


def index(arr, idx):
    """``arr[idx]`` for basic indices (integers, slices), in O(1) (see :func:`view_at`)."""
    # Offsets, shape and strides from a NumPy array of the same geometry over
    # one element: as_strided never reads it, and basic indexing only does
    # pointer arithmetic.
    probe = np.lib.stride_tricks.as_strided(np.empty(1, arr.dtype), arr.shape, arr.strides)
    sub = probe[idx]
    offset = sub.__array_interface__["data"][0] - probe.__array_interface__["data"][0]
    return view_at(arr, offset, sub.shape, sub.strides)


def restride(arr, shape, strides):
    """A view of ``arr`` (same first-element address) with the given shape and byte strides."""
    if tuple(arr.shape) == tuple(shape) and tuple(arr.strides) == tuple(strides):
        return arr
    return view_at(arr, 0, shape, strides)


# --------------------------------------------------------------------------
# Kernel selection and launch


def _pos_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"numbattn.config.{name} must be a positive integer, got {value!r}")
    return int(value)


def _knob(name: str) -> int:
    return _pos_int(name, getattr(config, name))


def _divides(part: str, whole: str) -> tuple[int, int]:
    """(config.<part>, config.<whole>), both positive and ``part`` dividing ``whole``."""
    p, w = _knob(part), _knob(whole)
    if w % p:
        raise ValueError(
            f"numbattn.config.{part} must divide numbattn.config.{whole} = {w}, got {p}"
        )
    return p, w


def _check_block(kernel: str, dtype, geometry, threads: int, shared: int, hint: str) -> None:
    """ValueError unless a block of this geometry can launch (threads, static shared memory)."""
    problem = limits.launch_problem(threads, shared)
    if problem is not None:
        raise ValueError(
            f"numbattn.config gives the CUDA {kernel} kernel ({np.dtype(dtype).name}, "
            f"geometry {geometry}) {problem}; {hint}"
        )


_ATTENTION_HINT = (
    "lower numbattn.config.CUDA_QUERY_TILE{sfx}, CUDA_KEY_TILE{sfx}, CUDA_HEAD_CHUNK or "
    "CUDA_VALUE_CHUNK, or raise CUDA_ROWS_PER_THREAD{sfx} or CUDA_KEYS_PER_THREAD"
)


def attention_geometry(dtype) -> tuple:
    """(TY, TX, RQ, RK, DC, RC) of the fused kernel from numbattn.config.

    ValueError naming the knob for a non-positive or non-integer value, a
    per-thread count that does not divide its tile, or a block that cannot
    launch (threads or static shared memory).
    """
    dtype = np.dtype(dtype)
    sfx = "_F64" if dtype == np.float64 else ""
    rq, bq = _divides("CUDA_ROWS_PER_THREAD" + sfx, "CUDA_QUERY_TILE" + sfx)
    rk, bk = _divides("CUDA_KEYS_PER_THREAD", "CUDA_KEY_TILE" + sfx)
    dc = _knob("CUDA_HEAD_CHUNK")
    tx = bk // rk
    rc = -(-_knob("CUDA_VALUE_CHUNK") // tx)
    geo = (bq // rq, tx, rq, rk, dc, rc)
    from .kernels import attention_shared_bytes

    _check_block(
        "attention",
        dtype,
        geo,
        geo[0] * geo[1],
        attention_shared_bytes(dtype, *geo, hw=not simulator()),
        _ATTENTION_HINT.format(sfx=sfx),
    )
    return geo


def scores_geometry(dtype) -> int:
    """The tile edge T of the scores kernel (block = T*T threads)."""
    t = _knob("CUDA_SCORES_TILE")
    if t * t > limits.MAX_THREADS_PER_BLOCK:
        raise ValueError(
            f"numbattn.config.CUDA_SCORES_TILE must be at most 32 (T*T threads per "
            f"block, at most {limits.MAX_THREADS_PER_BLOCK}), got {t}"
        )
    _check_block("scores", dtype, (t,), t * t, scores_shared_bytes(dtype, t), "lower it")
    return t


def scores_shared_bytes(dtype, t: int) -> int:
    return 2 * t * (t + 1) * np.dtype(dtype).itemsize


def softmax_geometry(dtype) -> tuple[int, int]:
    """(threads per block, row elements cached in shared memory) of the softmax kernel."""
    dtype = np.dtype(dtype)
    nt = _knob("CUDA_SOFTMAX_THREADS")
    if nt > limits.MAX_THREADS_PER_BLOCK or nt & (nt - 1):
        raise ValueError(
            "numbattn.config.CUDA_SOFTMAX_THREADS must be a power of two between 1 and "
            f"{limits.MAX_THREADS_PER_BLOCK} (tree reductions), got {nt}"
        )
    cache = max(1, _knob("CUDA_SOFTMAX_CACHE_BYTES") // dtype.itemsize)
    nbytes = (cache + nt) * dtype.itemsize
    if nbytes > limits.MAX_STATIC_SHARED:
        raise ValueError(
            f"numbattn.config.CUDA_SOFTMAX_CACHE_BYTES is too large: {cache} cached "
            f"{dtype.name} elements plus {nt} reduction slots need {nbytes} bytes of shared "
            f"memory (the limit is {limits.MAX_STATIC_SHARED}); expected at most "
            f"{limits.MAX_STATIC_SHARED - nt * dtype.itemsize}, got "
            f"{config.CUDA_SOFTMAX_CACHE_BYTES}"
        )
    return nt, cache


def _attention_kernel(dtype, hw=None):
    """(kernel, geometry); ``hw``: the hardware path (default: unless on the simulator)."""
    dtype = np.dtype(dtype)
    geo = attention_geometry(dtype)
    hw = (not simulator()) if hw is None else bool(hw)
    key = ("attention", dtype, geo, hw)
    kern = _kernels.get(key)
    if kern is None:
        from . import kernels

        # float64 on the tensor cores where the geometry allows (DMMA on a
        # GPU, emulated on the simulator); otherwise the FMA kernel.
        ty, tx, rq, rk, dc, rc = geo
        mma = kernels.mma_ok(dtype, ty, tx, rq, rk, dc, rc)
        make = kernels.make_attention_mma if mma else kernels.make_attention
        with _lock:
            kern = _kernels.setdefault(key, make(dtype, ty, tx, rq, rk, dc, rc, hw=hw))
    return kern, geo


def _scores_kernel(dtype):
    t = scores_geometry(dtype)
    key = ("scores", np.dtype(dtype), t)
    kern = _kernels.get(key)
    if kern is None:
        from . import kernels

        with _lock:
            kern = _kernels.setdefault(key, kernels.make_scores(dtype, t))
    return kern, t


def _softmax_kernel(dtype):
    dtype = np.dtype(dtype)
    nt, cache = softmax_geometry(dtype)
    key = ("softmax", dtype, nt, cache)
    kern = _kernels.get(key)
    if kern is None:
        from . import kernels

        with _lock:
            kern = _kernels.setdefault(key, kernels.make_softmax(dtype, nt, cache))
    return kern, nt


def _core_stream(stream):
    if not stream:
        core = _state.get("core0")
        if core is None:
            from numba.cuda.cudadrv.driver import _to_core_stream

            core = _state["core0"] = _to_core_stream(0)
        return core
    from numba.cuda.cudadrv.driver import _to_core_stream

    return _to_core_stream(stream)


#: What to change in numbattn.config when a kernel's block cannot launch.
_HINTS = {
    "attention_kernel": _ATTENTION_HINT.format(sfx="[_F64]"),
    "scores_kernel": "lower numbattn.config.CUDA_SCORES_TILE",
    "softmax_kernel": "lower numbattn.config.CUDA_SOFTMAX_THREADS",
}


def check_compiled(kern, compiled, block: int) -> None:
    """ValueError unless ``compiled`` (a kernel compiled for this device) can
    run blocks of ``block`` threads: the driver's limit for it accounts for
    its registers and shared memory, which only the compiled code knows."""
    try:
        limit = int(compiled.max_threads_per_block)
    except Exception:  # pragma: no cover - other numba-cuda versions
        return
    if block <= limit:
        return
    facts = []
    for attr, what in (("regs_per_thread", "registers per thread"),
                       ("shared_mem_per_block", "bytes of shared memory")):  # fmt: skip
        try:
            facts.append(f"{int(getattr(compiled, attr))} {what}")
        except Exception:  # pragma: no cover
            pass
    fname = getattr(getattr(kern, "py_func", None), "__name__", "kernel")
    raise ValueError(
        f"the CUDA {fname} compiled for this device ({', '.join(facts)}) can run at most "
        f"{limit} threads per block, but numbattn.config asks for {block}; "
        f"{_HINTS.get(fname, 'change numbattn.config')}"
    )


def _launch(kern, sig: str, grid: int, block: int, stream, args) -> None:
    """Launch ``kern`` compiled for ``sig`` (layout-'A' arrays).

    On a GPU, the first launch of a (kernel, signature, block) checks that
    the compiled kernel can run blocks that size (:func:`check_compiled`).
    """
    if simulator() or _state.get("slow_launch"):
        kern[grid, block, stream](*args)
        return
    key = (id(kern), sig, block)
    compiled = _compiled.get(key)
    if compiled is None:
        with _lock:
            compiled = _compiled.get(key)
            if compiled is None:
                compiled = kern.compile(sig)
                check_compiled(kern, compiled, block)
                _compiled[key] = compiled
    try:
        core = _core_stream(stream)
    except ImportError:  # pragma: no cover - other numba-cuda versions
        _state["slow_launch"] = True
        kern[grid, block, stream](*args)
        return
    compiled.launch(args, (int(grid), 1, 1), (int(block), 1, 1), core, 0)


def compiled_kernel(kind: str, dtype):
    """The compiled kernel object (for register/local-memory reports)."""
    dtype = np.dtype(dtype)
    if kind == "attention":
        kern = _attention_kernel(dtype)[0]
    elif kind == "scores":
        kern = _scores_kernel(dtype)[0]
    elif kind == "merge":
        kern = _merge_kernel(dtype)
    else:
        kern = _softmax_kernel(dtype)[0]
    for (kid, *_), compiled in _compiled.items():
        if kid == id(kern):
            return compiled
    return None


def attention_signature(dtype) -> str:
    """The Numba signature the attention kernels are compiled for (:class:`AttentionArgs`)."""
    return signature(AttentionArgs, dtype)


def scores_signature(dtype) -> str:
    """The Numba signature the scores kernel is compiled for (:class:`ScoresArgs`)."""
    return signature(ScoresArgs, dtype)


def softmax_signature(dtype) -> str:
    """The Numba signature the softmax kernel is compiled for (:class:`SoftmaxArgs`)."""
    return signature(SoftmaxArgs, dtype)


def merge_signature(dtype) -> str:
    """The Numba signature the merge kernel is compiled for (:class:`MergeArgs`)."""
    return signature(MergeArgs, dtype)


def kernel_launches(dtype) -> list[dict]:
    """Every kernel the backend launches for ``dtype`` at the geometry of
    numbattn.config: ``{"kernel", "dispatcher", "args", "signature",
    "threads", "geometry"}`` (``args``: the typed description of the kernel's
    arguments, from which ``signature`` is built) and ``"path"`` where the simulator runs other code than a
    GPU (the attention kernel: ``"hardware"`` and ``"simulator"``), which
    ``python -m numbattn gpu-report`` compiles."""
    dtype = np.dtype(dtype)
    att, geo = _attention_kernel(dtype, hw=True)
    att_sim, _ = _attention_kernel(dtype, hw=False)
    sc, t = _scores_kernel(dtype)
    sm, nt = _softmax_kernel(dtype)
    ty, tx, rq, rk, dc, rc = geo
    attention_geo = dict(
        query_tile=ty * rq,
        key_tile=tx * rk,
        rows_per_thread=rq,
        keys_per_thread=rk,
        head_chunk=dc,
        value_chunk=tx * rc,
    )
    return [
        dict(
            kernel="attention",
            path=path,
            dispatcher=disp,
            args=AttentionArgs,
            signature=attention_signature(dtype),
            threads=ty * tx,
            geometry=attention_geo,
        )
        for path, disp in (("hardware", att), ("simulator", att_sim))
    ] + [
        dict(
            kernel="scores",
            dispatcher=sc,
            args=ScoresArgs,
            signature=scores_signature(dtype),
            threads=t * t,
            geometry=dict(tile=t),
        ),
        dict(
            kernel="softmax",
            dispatcher=sm,
            args=SoftmaxArgs,
            signature=softmax_signature(dtype),
            threads=nt,
            geometry=dict(threads=nt, cache=softmax_geometry(dtype)[1]),
        ),
        dict(
            kernel="merge",
            dispatcher=_merge_kernel(dtype),
            args=MergeArgs,
            signature=merge_signature(dtype),
            threads=_MERGE_THREADS,
            geometry=dict(threads=_MERGE_THREADS),
        ),
    ]


def _dummy(dtype, ndim):
    """A cached 1-element device array standing in for an absent argument."""
    key = (np.dtype(dtype), ndim)
    arr = _dummies.get(key)
    if arr is None:
        from numba import cuda

        arr = _dummies[key] = cuda.device_array((1,) * ndim, dtype=key[0])
    return arr


def constant(value, dtype):
    """A cached 1-element device array holding ``value`` (re-strided by the caller)."""
    dtype = np.dtype(dtype)
    host = np.full(1, value, dtype=dtype)
    key = ("constant", dtype, host.tobytes())
    arr = _dummies.get(key)
    if arr is None:
        from numba import cuda

        arr = _dummies[key] = cuda.to_device(host)
    return arr


#: Sequence tables up to this many bytes (distinct rows) stay cached on the
#: device, keyed by their contents and the stream that uploaded them (so a
#: cached table is always stream-ordered before its users); larger ones are
#: uploaded on every call.
_TABLE_CACHE_BYTES = 16384
_TABLE_CACHE_ENTRIES = 64
_tables: dict = {}


def _seq_table(seq, stream):
    """Device view (G1, G2, 6) of the host int64 sequence table ``seq``.

    Only the distinct rows are uploaded: a zero (or unit-extent) stride along
    G1 or G2 keeps one row there, and the device copy is re-strided with zero
    strides. Small tables are cached by their bytes (the dense case is the
    same 40-byte table every call).
    """
    g1, g2 = seq.shape[:2]
    base = seq
    if g1 == 1 or seq.strides[0] == 0:
        base = base[:1]
    if g2 == 1 or seq.strides[1] == 0:
        base = base[:, :1]
    raw = base.tobytes()
    key = (id(stream) if stream else 0, g1, g2, base.shape, raw)
    hit = _tables.get(key)
    if hit is not None:
        return hit[0]
    from numba import cuda

    compact = np.frombuffer(raw, dtype=np.int64).reshape(base.shape)
    dev = cuda.to_device(compact, stream=stream or 0)
    n1, n2, ncol = base.shape
    strides = (0 if n1 == 1 else n2 * ncol * 8, 0 if n2 == 1 else ncol * 8, 8)
    view = restride(dev, (g1, g2, ncol), strides)
    if len(raw) <= _TABLE_CACHE_BYTES:
        with _lock:
            while len(_tables) >= _TABLE_CACHE_ENTRIES:
                _tables.pop(next(iter(_tables)))
            _tables[key] = (view, stream)  # the stream ref keeps id(stream) unique
    return view


def _extras(dtype, bias, mask):
    has_bias, has_mask = bias is not None, mask is not None
    if bias is None:
        bias = _dummy(dtype, 4)
    if mask is None:
        mask = _dummy(np.bool_, 4)
    return bias, mask, has_bias, has_mask


def _window(w) -> int:
    w = int(w)
    return -1 if w < 0 else w


# --------------------------------------------------------------------------
# Kernels (arrays: numba device arrays shaped (G1, G2, ...), any strides;
# ``seq``: the host int64 sequence table of numbattn._sequences)


def scores_args(q, k, out, table, n_it, bias, mask, scale, window_left, window_right) -> ScoresArgs:
    """The scores kernel's arguments, built by name: ``table`` is the device
    sequence table, ``n_it`` the row tiles per sequence; ``bias``/``mask`` may
    be None (a cached dummy is passed and its flag is False)."""
    dtype = q.dtype  # a device array's: already a np.dtype
    bias, mask, has_bias, has_mask = _extras(dtype, bias, mask)
    return ScoresArgs(
        q=q,
        k=k,
        out=out,
        seq=table,
        bias=bias,
        mask=mask,
        scale=dtype.type(scale),
        n_it=n_it,
        wl=_window(window_left),
        wr=_window(window_right),
        has_bias=has_bias,
        has_mask=has_mask,
    )


def scores(q, k, out, seq, max_rows, bias, mask, scale, window_left, window_right, stream=None):
    """Masked, biased scores of every (sequence, query row, column)."""
    g1, g2 = q.shape[:2]
    ncol = out.shape[3]
    dtype = np.dtype(q.dtype)
    kern, t = _scores_kernel(dtype)
    n_it = -(-int(max_rows) // t)
    grid = g1 * g2 * n_it * (-(-ncol // t))
    if grid == 0:
        return
    table = _seq_table(seq, stream)
    args = scores_args(q, k, out, table, n_it, bias, mask, scale, window_left, window_right)
    _launch(kern, scores_signature(dtype), grid, t * t, stream, args)


def softmax(x, out, stream=None):
    g1, g2, n = x.shape
    if g1 * g2 == 0 or n == 0:
        return
    dtype = np.dtype(x.dtype)
    kern, nt = _softmax_kernel(dtype)
    _launch(kern, softmax_signature(dtype), g1 * g2, nt, stream, SoftmaxArgs(x=x, out=out))


def attention_args(
    q, k, v, out, lse, table, n_qt, bias, mask, scale, window_left, window_right
) -> AttentionArgs:
    """The attention kernels' arguments, built by name: ``table`` is the device
    sequence table, ``n_qt`` the query tiles per sequence; ``lse``, ``bias``
    and ``mask`` may be None (a cached dummy is passed and its flag is False)."""
    dtype = q.dtype  # a device array's: already a np.dtype
    bias, mask, has_bias, has_mask = _extras(dtype, bias, mask)
    write_lse = lse is not None
    return AttentionArgs(
        q=q,
        k=k,
        v=v,
        out=out,
        lse=lse if write_lse else _dummy(dtype, 3),
        seq=table,
        bias=bias,
        mask=mask,
        scale=dtype.type(scale),
        n_qt=n_qt,
        wl=_window(window_left),
        wr=_window(window_right),
        write_lse=write_lse,
        has_bias=has_bias,
        has_mask=has_mask,
    )


def attention(
    q, k, v, out, lse, seq, max_rows, bias, mask, scale, window_left, window_right, stream=None
):
    """Fused attention over the sequences of ``seq``; ``lse`` may be None (not written)."""
    g1, g2 = q.shape[:2]
    dv = v.shape[3]
    dtype = np.dtype(q.dtype)
    kern, (ty, tx, rq, _rk, _dc, rc) = _attention_kernel(dtype)
    bq, dvc = ty * rq, tx * rc
    n_qt = -(-int(max_rows) // bq)
    grid = g1 * g2 * n_qt
    if grid == 0:
        return
    table = _seq_table(seq, stream)
    args = attention_args(
        q, k, v, out, lse, table, n_qt, bias, mask, scale, window_left, window_right
    )
    sig = attention_signature(dtype)
    if dv <= dvc:
        _launch(kern, sig, grid, ty * tx, stream, args)
        return
    # dv wider than the register accumulators: one launch per column slice.
    for c0 in range(0, dv, dvc):
        c1 = min(dv, c0 + dvc)
        part = args._replace(
            v=index(v, (Ellipsis, slice(c0, c1))),
            out=index(out, (Ellipsis, slice(c0, c1))),
            write_lse=args.write_lse and c0 == 0,
        )
        _launch(kern, sig, grid, ty * tx, stream, part)


def bare_attention_launch(q, k, v, out, lse, stream=0):
    """A zero-argument callable launching the attention kernel on dense
    ``(B, H, N, d)`` device arrays (no bias, mask or window; scale
    ``1/sqrt(d)``; ``lse`` may be None) through Numba's own dispatcher,
    ``kernel[grid, block, stream](*args)``, with every argument prepared
    beforehand: the baseline of ``scripts/gpu_check.py``'s host time per call.

    ValueError when ``v``'s last dimension needs more than one launch (wider
    than numbattn.config's CUDA_VALUE_CHUNK, rounded up to the block width).
    """
    from .. import _sequences

    b, h, nq = q.shape[:3]
    nk, dv = k.shape[2], v.shape[3]
    dtype = np.dtype(q.dtype)
    kern, (ty, tx, rq, _rk, _dc, rc) = _attention_kernel(dtype)
    if dv > tx * rc:
        raise ValueError(
            f"bare_attention_launch needs one launch: v's last dimension {dv} is wider "
            f"than the kernel's value chunk {tx * rc} (numbattn.config.CUDA_VALUE_CHUNK)"
        )
    n_qt = -(-nq // (ty * rq))
    seq = _sequences.broadcast(_sequences.dense_table(nq, nk), (b, h), axis0=False)
    table = _seq_table(seq, stream)
    args = attention_args(
        q, k, v, out, lse, table, n_qt, None, None, 1.0 / math.sqrt(q.shape[3]), -1, -1
    )
    grid, block = b * h * n_qt, ty * tx
    return lambda: kern[grid, block, stream](*args)


_MERGE_THREADS = 128


def _merge_kernel(dtype):
    key = ("merge", np.dtype(dtype), _MERGE_THREADS)
    kern = _kernels.get(key)
    if kern is None:
        from . import kernels

        with _lock:
            kern = _kernels.setdefault(key, kernels.make_merge(dtype, _MERGE_THREADS))
    return kern


def merge(o1, l1, o2, l2, out, lse, stream=None):
    """Combine two partial results over disjoint key sets (``out``/``lse`` may
    be ``o1``/``l1``: in place); ``lse`` may be None (not written)."""
    g1, g2, nq = o1.shape[:3]
    rows = g1 * g2 * nq
    if rows == 0:
        return
    dtype = np.dtype(o1.dtype)
    kern = _merge_kernel(dtype)
    write_lse = lse is not None
    args = MergeArgs(
        o1=o1,
        l1=l1,
        o2=o2,
        l2=l2,
        out=out,
        lse=lse if write_lse else _dummy(dtype, 3),
        write_lse=write_lse,
    )
    grid = -(-rows // _MERGE_THREADS)
    _launch(kern, merge_signature(dtype), grid, _MERGE_THREADS, stream, args)
