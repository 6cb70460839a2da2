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
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import config
from .._checks import check_knob, check_knob_flag
from . import limits
from .args import (
    AttentionArgs,
    BackwardArgs,
    DecodeArgs,
    MergeArgs,
    ScoresArgs,
    SoftmaxArgs,
    SplitMergeArgs,
    signature,
)
from .geometry import TensorCoreGeometry, TensorCoreScoresGeometry, step_kind

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


def _knob(name: str) -> int:
    return check_knob(name, getattr(config, name))


def _flag(name: str) -> bool:
    return check_knob_flag(name, getattr(config, name))


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


def scores_geometry(dtype) -> tuple[int, int, int]:
    """(T, R, DC) of the scores kernel from numbattn.config: T x T output
    tiles, R x R outputs per thread ((T/R)**2 threads), d in chunks of DC.

    ValueError naming the knob for a non-positive or non-integer value, a
    per-thread count that does not divide the tile, or a block that cannot
    launch (threads or static shared memory).
    """
    r, t = _divides("CUDA_SCORES_PER_THREAD", "CUDA_SCORES_TILE")
    dc = _knob("CUDA_SCORES_HEAD_CHUNK")
    _check_block(
        "scores", dtype, (t, r, dc), (t // r) ** 2, scores_shared_bytes(dtype, t, dc),
        "lower numbattn.config.CUDA_SCORES_TILE or CUDA_SCORES_HEAD_CHUNK, or raise "
        "CUDA_SCORES_PER_THREAD",
    )  # fmt: skip
    return t, r, dc


def scores_shared_bytes(dtype, t: int, dc: int) -> int:
    from .kernels import scores_layout

    return scores_layout(dtype, t, dc)["TOTAL"] * np.dtype(dtype).itemsize


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


def _device_cc() -> tuple[int, int] | None:
    """The current GPU's compute capability; None on the simulator, which
    emulates every tensor-core step."""
    if simulator():
        return None
    cc = _state.get("cc")
    if cc is None:
        from numba import cuda

        cc = _state["cc"] = tuple(cuda.get_current_device().compute_capability)
    return cc


def float32_precision() -> str:
    """numbattn.config.CUDA_FLOAT32_PRECISION, checked: ``"fp32"`` or ``"tf32"``."""
    value = config.CUDA_FLOAT32_PRECISION
    if value not in ("fp32", "tf32"):
        raise ValueError(
            'numbattn.config.CUDA_FLOAT32_PRECISION must be "fp32" (float32 accuracy, '
            f'3xTF32 on the tensor cores) or "tf32" (one TF32 product), got {value!r}'
        )
    return value


def _tensor_core_step(dtype, cc) -> str | None:
    """The product step of the tensor-core kernels for ``dtype`` on ``cc``
    (None: the simulator), or None where ``CUDA_TENSOR_CORES`` is off or
    the device predates sm_80."""
    if not _flag("CUDA_TENSOR_CORES"):
        return None
    return step_kind(dtype, (9, 0) if cc is None else cc, float32_precision())


def tensor_core_geometry(dtype, cc=None) -> TensorCoreGeometry | None:
    """The tensor-core forward's geometry for ``dtype`` on compute capability
    ``cc`` (None: the simulator), or None where the FMA kernel runs instead:
    ``CUDA_TENSOR_CORES`` off, or a device before sm_80.

    ValueError naming the knobs when the configured geometry cannot run.
    """
    dtype = np.dtype(dtype)
    kind = _tensor_core_step(dtype, cc)
    if kind is None:
        return None
    sfx = "_F64" if dtype == np.float64 else ""
    geo = TensorCoreGeometry(
        dtype=dtype.name,
        kind=kind,
        warps=_knob("CUDA_TC_WARPS" + sfx),
        key_tile=_knob("CUDA_TC_KEY_TILE" + sfx),
        head_chunk=_knob("CUDA_HEAD_CHUNK"),
        value_chunk=_knob("CUDA_VALUE_CHUNK"),
    )
    problem = geo.problem(cc, hw=not simulator())
    if problem is not None:
        raise ValueError(
            f"numbattn.config gives the CUDA tensor-core attention kernel ({dtype.name}, "
            f"{geo}): {problem}; change CUDA_TC_WARPS{sfx}, CUDA_TC_KEY_TILE{sfx}, "
            "CUDA_HEAD_CHUNK or CUDA_VALUE_CHUNK, or set CUDA_TENSOR_CORES = False"
        )
    return geo


def tensor_core_scores_geometry(dtype, cc=None) -> TensorCoreScoresGeometry | None:
    """The tensor-core scores kernel's geometry for ``dtype`` on compute
    capability ``cc`` (None: the simulator), or None where the FMA kernel
    runs instead (as :func:`tensor_core_geometry`).

    ValueError naming the knobs when the configured geometry cannot run.
    """
    dtype = np.dtype(dtype)
    kind = _tensor_core_step(dtype, cc)
    if kind is None:
        return None
    geo = TensorCoreScoresGeometry(
        dtype=dtype.name,
        kind=kind,
        warps=_knob("CUDA_TC_SCORES_WARPS"),
        column_tile=_knob("CUDA_TC_SCORES_TILE"),
        head_chunk=_knob("CUDA_TC_SCORES_HEAD_CHUNK"),
    )
    problem = geo.problem(cc, hw=not simulator())
    if problem is not None:
        raise ValueError(
            f"numbattn.config gives the CUDA tensor-core scores kernel ({dtype.name}, "
            f"{geo}): {problem}; change CUDA_TC_SCORES_WARPS, CUDA_TC_SCORES_TILE or "
            "CUDA_TC_SCORES_HEAD_CHUNK, or set CUDA_TENSOR_CORES = False"
        )
    return geo


@dataclass(frozen=True)
class FusedLaunch:
    """What a launch of the fused forward needs to know of its kernel."""

    threads: int
    query_tile: int
    value_chunk: int
    geometry: Any  # TensorCoreGeometry, or the FMA kernel's (TY, TX, RQ, RK, DC, RC)


def _attention_kernel(dtype, hw=None, cc=None):
    """(kernel, :class:`FusedLaunch`) of the fused forward: on the tensor cores
    where :func:`tensor_core_geometry` allows, else the FMA kernel. ``hw``:
    the hardware path (default: unless on the simulator); ``cc``: the target
    (default: the current device's)."""
    dtype = np.dtype(dtype)
    hw = (not simulator()) if hw is None else bool(hw)
    if cc is None:
        cc = _device_cc()
    tc = tensor_core_geometry(dtype, cc)
    if tc is not None:
        key = ("attention_tc", tc, hw)
        launch = FusedLaunch(tc.threads, tc.query_tile, tc.value_chunk, tc)
    else:
        geo = attention_geometry(dtype)
        ty, tx, rq, _rk, _dc, rc = geo
        key = ("attention", dtype, geo, hw)
        launch = FusedLaunch(ty * tx, ty * rq, tx * rc, geo)
    kern = _kernels.get(key)
    if kern is None:
        with _lock:
            if tc is not None:
                from .tensor import make_attention_tc

                kern = _kernels.setdefault(key, make_attention_tc(tc, hw=hw))
            else:
                from .kernels import make_attention

                ty, tx, rq, rk, dc, rc = launch.geometry
                kern = _kernels.setdefault(
                    key, make_attention(dtype, ty, tx, rq, rk, dc, rc, hw=hw)
                )
    return kern, launch


@dataclass(frozen=True)
class ScoresLaunch:
    """What a launch of the scores kernel needs to know of its kernel."""

    threads: int
    row_tile: int
    column_tile: int
    geometry: Any  # TensorCoreScoresGeometry, or the FMA kernel's (T, R, DC)


def _scores_kernel(dtype, hw=None, cc=None):
    """(kernel, :class:`ScoresLaunch`) of ``scores``: on the tensor cores where
    :func:`tensor_core_scores_geometry` allows, else the FMA kernel. ``hw``
    and ``cc`` as for :func:`_attention_kernel`."""
    dtype = np.dtype(dtype)
    hw = (not simulator()) if hw is None else bool(hw)
    if cc is None:
        cc = _device_cc()
    tc = tensor_core_scores_geometry(dtype, cc)
    if tc is not None:
        key: tuple = ("scores_tc", tc, hw)
        launch = ScoresLaunch(tc.threads, tc.row_tile, tc.column_tile, tc)
    else:
        geo = scores_geometry(dtype)
        t, r, _dc = geo
        key = ("scores", dtype, geo)  # one kernel: its simulator path is the hardware's
        launch = ScoresLaunch((t // r) ** 2, t, t, geo)
    kern = _kernels.get(key)
    if kern is None:
        with _lock:
            if tc is not None:
                from .tensor import make_scores_tc

                kern = _kernels.setdefault(key, make_scores_tc(tc, hw=hw))
            else:
                from . import kernels

                kern = _kernels.setdefault(key, kernels.make_scores(dtype, *launch.geometry))
    return kern, launch


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
    "scores_kernel": "lower numbattn.config.CUDA_SCORES_TILE or raise CUDA_SCORES_PER_THREAD",
    "softmax_kernel": "lower numbattn.config.CUDA_SOFTMAX_THREADS",
    "backward_kernel": "lower numbattn.config.CUDA_BWD_ROW_TILE[_F64] or CUDA_BWD_COL_TILE[_F64]",
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
    elif kind == "decode":
        kern = _decode_kernel(dtype, decode_geometry(dtype, REPORT_HEAD_DIM, REPORT_HEAD_DIM))
    elif kind == "split_merge":
        kern = _split_merge_kernel(dtype)[0]
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


def kernel_launches(dtype, cc=None) -> list[dict]:
    """Every kernel the backend launches for ``dtype`` at the geometry of
    numbattn.config on compute capability ``cc`` (a ``(major, minor)`` pair;
    default: the current device's, or the simulator's choice): ``{"kernel",
    "dispatcher", "args", "signature", "threads", "geometry"}`` (``args``:
    the typed description of the kernel's arguments, from which
    ``signature`` is built; compute capability 9.0 without a usable GPU)
    and ``"path"`` where the simulator runs other code than a GPU (the
    tensor-core kernels and the streaming one: ``"hardware"`` and
    ``"simulator"``), which ``python -m numbattn gpu-report`` compiles; the
    backward kernels at d = dv = 64 (:func:`backward_launches`)."""
    dtype = np.dtype(dtype)
    if cc is None and not simulator():
        try:
            cc = _device_cc()
        except Exception:  # no usable GPU: gpu-report's default target
            cc = (9, 0)
    att, fused = _attention_kernel(dtype, hw=True, cc=cc)
    att_sim, _ = _attention_kernel(dtype, hw=False, cc=cc)
    sc, sc_launch = _scores_kernel(dtype, hw=True, cc=cc)
    sm, nt = _softmax_kernel(dtype)
    geo = fused.geometry
    if isinstance(geo, TensorCoreGeometry):
        attention_geo = dict(
            query_tile=geo.query_tile,
            key_tile=geo.key_tile,
            warps=geo.warps,
            step=geo.kind,
            head_chunk=geo.head_chunk,
            value_chunk=geo.value_chunk,
        )
    else:
        ty, tx, rq, rk, dc, rc = geo
        attention_geo = dict(
            query_tile=ty * rq,
            key_tile=tx * rk,
            rows_per_thread=rq,
            keys_per_thread=rk,
            head_chunk=dc,
            value_chunk=tx * rc,
        )
    return (
        [
            dict(
                kernel="attention",
                path=path,
                dispatcher=disp,
                args=AttentionArgs,
                signature=attention_signature(dtype),
                threads=fused.threads,
                geometry=attention_geo,
            )
            for path, disp in (("hardware", att), ("simulator", att_sim))
        ]
        + _scores_launches(dtype, sc, sc_launch, cc)
        + [
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
        + backward_launches(dtype, cc=cc)
        + _decode_launches(dtype)
    )


def _scores_launches(dtype, kern, launch: ScoresLaunch, cc) -> list[dict]:
    """``kernel_launches``' records of the scores kernel: the tensor-core
    kernel's hardware and simulator paths, or the FMA kernel (one path)."""
    geo = launch.geometry
    base = dict(
        kernel="scores", args=ScoresArgs, signature=scores_signature(dtype), threads=launch.threads
    )
    if not isinstance(geo, TensorCoreScoresGeometry):
        t, r, dc = geo
        return [dict(base, dispatcher=kern, geometry=dict(tile=t, per_thread=r, head_chunk=dc))]
    tc_geo = dict(
        row_tile=geo.row_tile,
        column_tile=geo.column_tile,
        warps=geo.warps,
        step=geo.kind,
        head_chunk=geo.head_chunk,
    )
    return [
        dict(base, path=path, dispatcher=disp, geometry=tc_geo)
        for path, disp in (("hardware", kern), ("simulator", _scores_kernel(dtype, False, cc)[0]))
    ]


#: Head dimension at which ``kernel_launches`` reports the streaming kernel
#: (one compiled variant per power of two of elements a lane holds).
REPORT_HEAD_DIM = 128


def _decode_launches(dtype) -> list[dict]:
    """The streaming kernel (both paths) at d = dv = REPORT_HEAD_DIM and the split merge."""
    from .decode import vector_width

    geo = decode_geometry(dtype, REPORT_HEAD_DIM, REPORT_HEAD_DIM)
    wl, nteam, rb, kb, epl = geo
    merge, nt = _split_merge_kernel(dtype)
    vw = vector_width(dtype, epl)
    geometry = dict(lanes=wl, teams=nteam, rows=rb, keys=kb, elements_per_lane=epl, vector=vw)
    # Aligned K/V rows (a contiguous or paged cache with d a multiple of the
    # vector width), read vw elements a load.
    return [
        dict(
            kernel="decode",
            path=path,
            dispatcher=_decode_kernel(dtype, geo, hw=hw, vec=True),
            args=DecodeArgs,
            signature=decode_signature(dtype),
            threads=wl * nteam,
            geometry=geometry,
        )
        for path, hw in (("hardware", True), ("simulator", False))
    ] + [
        dict(
            kernel="split_merge",
            dispatcher=merge,
            args=SplitMergeArgs,
            signature=split_merge_signature(dtype),
            threads=nt,
            geometry=dict(threads=nt),
        )
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
#: device, keyed by their contents and the stream handle that uploaded them (so a
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
    key = (_table_stream_key(stream), g1, g2, base.shape, raw)
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
            _tables[key] = (view, stream)  # the stream stays alive, so its handle is not reused
    return view


def _table_stream_key(stream) -> int:
    """The table cache's stream key: the raw handle, so that the new Numba
    ``Stream`` object that each ``stream=1`` call or each wrapper of one
    external stream makes still finds the table that stream uploaded (the
    simulator's streams have no handle: the object's identity there)."""
    if not stream:
        return 0
    return id(stream) if simulator() else _stream_handle(stream)


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
    kern, launch = _scores_kernel(dtype)
    n_it = -(-int(max_rows) // launch.row_tile)
    grid = g1 * g2 * n_it * (-(-ncol // launch.column_tile))
    if grid == 0:
        return
    table = _seq_table(seq, stream)
    args = scores_args(q, k, out, table, n_it, bias, mask, scale, window_left, window_right)
    _launch(kern, scores_signature(dtype), grid, launch.threads, stream, args)


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
    """Fused attention over the sequences of ``seq``; ``lse`` may be None (not
    written). Few rows per KV head (config.CUDA_STREAM_ROWS) take the
    streaming kernel instead, unsplit."""
    if _takes_streaming(q, k, max_rows):
        split_attention(
            q, k, v, out, lse, seq, max_rows, bias, mask, scale, window_left, window_right,
            1, None, stream=stream,
        )  # fmt: skip
        return
    g1, g2 = q.shape[:2]
    dv = v.shape[3]
    dtype = np.dtype(q.dtype)
    kern, fused = _attention_kernel(dtype)
    bq, dvc, block = fused.query_tile, fused.value_chunk, fused.threads
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
        _launch(kern, sig, grid, block, stream, args)
        return
    # dv wider than the register accumulators: one launch per column slice.
    for c0 in range(0, dv, dvc):
        c1 = min(dv, c0 + dvc)
        part = args._replace(
            v=index(v, (Ellipsis, slice(c0, c1))),
            out=index(out, (Ellipsis, slice(c0, c1))),
            write_lse=args.write_lse and c0 == 0,
        )
        _launch(kern, sig, grid, block, stream, part)


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
    kern, fused = _attention_kernel(dtype)
    if dv > fused.value_chunk:
        raise ValueError(
            f"bare_attention_launch needs one launch: v's last dimension {dv} is wider "
            f"than the kernel's value chunk {fused.value_chunk} (numbattn.config.CUDA_VALUE_CHUNK)"
        )
    n_qt = -(-nq // fused.query_tile)
    seq = _sequences.broadcast(_sequences.dense_table(nq, nk), (b, h), axis0=False)
    table = _seq_table(seq, stream)
    args = attention_args(
        q, k, v, out, lse, table, n_qt, None, None, 1.0 / math.sqrt(q.shape[3]), -1, -1
    )
    grid, block = b * h * n_qt, fused.threads
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


# --------------------------------------------------------------------------
# Backward (numbattn/cuda/backward.py)


_bwd_geometries: dict = {}


def backward_geometry(dtype, d: int, dv: int) -> tuple:
    """(TR, TC, RR, RC, DP, DVP) of the backward kernels for head dims d, dv.

    From numbattn.config's CUDA_BWD_* knobs (ValueError naming the knob for
    a non-positive value or a per-thread count that does not divide its
    tile); when whole rows of that width do not fit 48 KiB of shared memory,
    the streamed tile and then the own tile are halved (while the per-thread
    counts still divide them); ValueError if even the smallest does not fit.
    """
    from .backward import backward_shared_bytes, padded_dim

    dtype = np.dtype(dtype)
    sfx = "_F64" if dtype == np.float64 else ""
    rr, br = _divides("CUDA_BWD_ROWS_PER_THREAD" + sfx, "CUDA_BWD_ROW_TILE" + sfx)
    rc, bc = _divides("CUDA_BWD_COLS_PER_THREAD" + sfx, "CUDA_BWD_COL_TILE" + sfx)
    key = (dtype, int(d), int(dv), rr, br, rc, bc)
    geo = _bwd_geometries.get(key)
    if geo is not None:
        return geo
    while True:
        tr, tc = br // rr, bc // rc
        dp, dvp = padded_dim(d, dtype, tc), padded_dim(dv, dtype, tc)
        geo = (tr, tc, rr, rc, dp, dvp)
        shared = backward_shared_bytes(dtype, True, *geo)
        problem = limits.launch_problem(tr * tc, shared)
        if problem is None:
            _bwd_geometries[key] = geo
            return geo
        if bc // 2 >= rc and (bc // 2) % rc == 0 and bc > rc:
            bc //= 2
        elif br // 2 >= rr and (br // 2) % rr == 0 and br > rr:
            br //= 2
        else:
            raise ValueError(
                f"numbattn.config gives the CUDA backward kernels ({dtype.name}, head "
                f"dimensions d={d}, dv={dv}, geometry {geo}) {problem}; lower "
                f"numbattn.config.CUDA_BWD_ROWS_PER_THREAD{sfx} or "
                f"CUDA_BWD_COLS_PER_THREAD{sfx} (whole head rows are kept in shared memory)"
            )


def _backward_tc_geometry(dtype, d: int, dv: int, kind: str) -> tuple | None:
    """(TR, TC, RR, RC, DP, DVP) of the backward kernels on the tensor cores
    (16 own rows a warp, :func:`numbattn.cuda.backward.backward_tc_ok`), from
    CUDA_BWD_TC_WARPS[_F64] and CUDA_BWD_TC_COL_TILE[_F64]; the streamed
    tile and then the warps are halved until whole rows of width d and dv
    fit 48 KiB of shared memory; None if even one warp with 8-row tiles
    does not (the FMA kernels take it)."""
    from .backward import backward_shared_bytes, backward_tc_ok, padded_dim

    dtype = np.dtype(dtype)
    sfx = "_F64" if dtype == np.float64 else ""
    warps = _knob("CUDA_BWD_TC_WARPS" + sfx)
    bc = _knob("CUDA_BWD_TC_COL_TILE" + sfx)
    if bc % 8:
        raise ValueError(
            f"numbattn.config.CUDA_BWD_TC_COL_TILE{sfx} must be a multiple of 8 "
            f"(the tensor cores' n-tiles), got {bc}"
        )
    key = (dtype, int(d), int(dv), warps, bc, kind)
    if key in _bwd_geometries:
        return _bwd_geometries[key]
    geo = None
    while warps >= 1 and geo is None:
        cols = bc
        while cols >= 8 and cols % 8 == 0:
            # 32 * warps threads as TR x TC = 4 warps x 8, 4 own rows a thread.
            cand = (4 * warps, 8, 4, cols // 8, padded_dim(d, dtype, 8), padded_dim(dv, dtype, 8))
            shared = backward_shared_bytes(dtype, True, *cand, kind=kind)
            if backward_tc_ok(*cand) and limits.launch_problem(32 * warps, shared) is None:
                geo = cand
                break
            cols //= 2
        warps //= 2
    _bwd_geometries[key] = geo
    return geo


def backward_plan(dtype, d: int, dv: int, cc=None) -> tuple[tuple, str | None]:
    """(geometry, product step) of the backward kernels for head dims d, dv
    on compute capability ``cc`` (default: the current device's; None on the
    simulator): on the tensor cores where CUDA_TENSOR_CORES, the device and
    shared memory allow (step: :func:`numbattn.cuda.geometry.step_kind`),
    else the FMA kernels of :func:`backward_geometry` (step None)."""
    dtype = np.dtype(dtype)
    if cc is None:
        cc = _device_cc()
    kind = _tensor_core_step(dtype, cc)
    if kind is not None:
        geo = _backward_tc_geometry(dtype, d, dv, kind)
        if geo is not None:
            return geo, kind
    return backward_geometry(dtype, d, dv), None


def _backward_kernel(dtype, kv: bool, geo: tuple, hw=None, kind=None):
    hw = (not simulator()) if hw is None else bool(hw)
    fast = _flag("CUDA_BWD_FAST_LOOP")
    key = ("backward", np.dtype(dtype), bool(kv), geo, hw, fast, kind)
    kern = _kernels.get(key)
    if kern is None:
        from .backward import make_backward

        with _lock:
            tr, tc, rr, rc, dp, dvp = geo
            kern = _kernels.setdefault(
                key, make_backward(dtype, kv, tr, tc, rr, rc, dp, dvp, hw=hw, fast=fast, kind=kind)
            )
    return kern


def backward_signature(dtype) -> str:
    """The Numba signature the backward kernels are compiled for (:class:`BackwardArgs`)."""
    return signature(BackwardArgs, dtype)


def backward_launches(dtype, d: int = 64, dv: int = 64, cc=None) -> list[dict]:
    """The backward kernels' hardware paths for head dims (d, dv) at
    numbattn.config's geometry, described as :func:`kernel_launches`
    describes the others (their simulator paths differ only by launch
    bounds and shared-memory alignment)."""
    dtype = np.dtype(dtype)
    geo, kind = backward_plan(dtype, d, dv, cc)
    tr, tc, rr, rc, dp, dvp = geo
    geometry = dict(
        own_tile=tr * rr,
        streamed_tile=tc * rc,
        rows_per_thread=rr,
        cols_per_thread=rc,
        head_dims=dp,
        value_dims=dvp,
        step=kind,
    )
    return [
        dict(
            kernel=name,
            dispatcher=_backward_kernel(dtype, kv, geo, hw=True, kind=kind),
            args=BackwardArgs,
            signature=backward_signature(dtype),
            threads=tr * tc,
            geometry=geometry,
        )
        for name, kv in (("backward_dq", False), ("backward_dkdv", True))
    ]


def attention_backward(
    q,
    k,
    v,
    out,
    lse,
    dout,
    delta,
    dq,
    dk,
    dv,
    seq,
    max_rows,
    key_rows,
    max_keys,
    bias,
    mask,
    scale,
    window_left,
    window_right,
    stream=None,
):
    """Gradients of fused attention (see :class:`numbattn._backend.Backend`).

    Two launches on ``stream``, no atomics (deterministic): the query kernel
    (D into ``delta``, then dq), then the key kernel (dk, dv, summed over each
    group of query heads in a fixed order). See :mod:`numbattn.cuda.backward`.
    """
    g1, hq = q.shape[:2]
    hk = k.shape[1]
    d, dvw = q.shape[3], v.shape[3]
    dtype = np.dtype(q.dtype)
    geo, kind = backward_plan(dtype, d, dvw)
    _flag("CUDA_BWD_FAST_LOOP")  # read again per kernel; checked before either launch
    tr, tc, rr, _rc, _dp, _dvp = geo
    br, nthreads = tr * rr, tr * tc
    n_qt = -(-int(max_rows) // br)
    n_kt = -(-int(max_keys) // br)
    if g1 * hq == 0 or (n_qt == 0 and n_kt == 0):
        return
    table = _seq_table(seq, stream)
    bias, mask, has_bias, has_mask = _extras(dtype, bias, mask)
    args = BackwardArgs(
        q=q,
        k=k,
        v=v,
        out=out,
        dout=dout,
        lse=lse,
        delta=delta,
        dq=dq,
        dk=dk,
        dv=dv,
        seq=table,
        bias=bias,
        mask=mask,
        scale=dtype.type(scale),
        n_tiles=n_qt,
        k_rows=int(key_rows),
        wl=_window(window_left),
        wr=_window(window_right),
        has_bias=has_bias,
        has_mask=has_mask,
    )
    sig = backward_signature(dtype)
    if n_qt:
        kern = _backward_kernel(dtype, False, geo, kind=kind)
        _launch(kern, sig, g1 * hq * n_qt, nthreads, stream, args)
    if n_kt and hk:
        kv = args._replace(n_tiles=n_kt)
        kern = _backward_kernel(dtype, True, geo, kind=kind)
        _launch(kern, sig, g1 * hk * n_kt, nthreads, stream, kv)


# --------------------------------------------------------------------------
# Split-K and paged KV caches (numbattn._backend.Backend): the
# streaming kernel and the merge of its splits (numbattn/cuda/decode.py).

_DECODE_HINT = "lower numbattn.config.CUDA_DECODE_TEAMS, CUDA_DECODE_ROWS or CUDA_DECODE_KEYS[_F64]"
_HINTS["decode_kernel"] = _DECODE_HINT
_HINTS["split_merge_kernel"] = "lower numbattn.config.CUDA_SPLIT_MERGE_THREADS"


def _pow2(name: str, limit: int) -> int:
    value = _knob(name)
    if value > limit or value & (value - 1):
        raise ValueError(
            f"numbattn.config.{name} must be a power of two between 1 and {limit}, got {value}"
        )
    return value


def decode_geometry(dtype, d: int, dv: int, rows: int | None = None) -> tuple:
    """(WL, NTEAM, RB, KB, EPL) of the streaming kernel for head dimensions
    ``d`` and ``dv`` and ``rows`` rows per KV head (query heads of the group
    x queries; None: the configured maximum): EPL, the elements a lane
    holds per row, is the smallest power of two with ``WL * EPL >= max(d,
    dv)``, RB the smallest power of two >= rows up to CUDA_DECODE_ROWS (one
    compiled kernel per combination), and KB = CUDA_DECODE_KEYS[_F64],
    halved per doubling of RB past 2 and of EPL past 4 (the key and value
    fragments and the rows' scores stay within the registers of 2 rows at
    EPL = 4).

    ValueError naming the knob for a bad value or a block that cannot launch.
    """
    dtype = np.dtype(dtype)
    wl = _pow2("CUDA_DECODE_LANES", limits.WARP)
    nteam = _knob("CUDA_DECODE_TEAMS")
    rb = _knob("CUDA_DECODE_ROWS")
    kb = _knob("CUDA_DECODE_KEYS_F64" if dtype == np.float64 else "CUDA_DECODE_KEYS")
    epl = 1
    while wl * epl < max(int(d), int(dv), 1):
        epl *= 2
    if rows is not None:
        need = 1
        while need < min(int(rows), rb):
            need *= 2
        rb = min(rb, need)
    # Keys x rows x elements per lane stay within the registers of the
    # configured keys at 2 rows and EPL = 4 (each row's scores, q and
    # accumulators and the K/V fragments share them).
    kb = max(1, kb * 8 // (max(epl, 4) * max(rb, 2)))
    geo = (wl, nteam, rb, kb, epl)
    from .decode import decode_shared_bytes

    _check_block(
        "streaming attention",
        dtype,
        geo,
        wl * nteam,
        decode_shared_bytes(dtype, *geo, hw=not simulator()),
        _DECODE_HINT,
    )
    return geo


def _decode_kernel(dtype, geo, hw=None, vec=False):
    dtype = np.dtype(dtype)
    hw = (not simulator()) if hw is None else bool(hw)
    key = ("decode", dtype, geo, hw, bool(vec))
    kern = _kernels.get(key)
    if kern is None:
        from . import decode

        with _lock:
            wl, nteam, rb, kb, epl = geo
            kern = _kernels.setdefault(
                key, decode.make_decode(dtype, wl, nteam, rb, kb, epl, hw=hw, vec=bool(vec))
            )
    return kern


def _address(arr) -> int:
    """Device address of ``arr``'s first element (host address on the simulator)."""
    host = getattr(arr, "_ary", None)  # the simulator's FakeCUDAArray
    if host is not None:
        return int(host.__array_interface__["data"][0])
    ptr = arr.device_ctypes_pointer.value
    return int(ptr or 0)


def vector_ok(arrays, vw: int) -> bool:
    """Whether the streaming kernel may read rows of ``arrays`` (k and v, in
    the kernel's (blocks, slots, Hk, d) order) ``vw`` elements at a time:
    unit last stride, head dimensions multiples of vw, and the first
    element and every other stride (of axes longer than 1) multiples of
    vw elements in bytes, so that every chunk a lane reads is aligned."""
    if vw <= 1:
        return False
    for arr in arrays:
        size = arr.dtype.itemsize
        align = vw * size
        if arr.shape[3] % vw or (arr.shape[3] > 1 and arr.strides[3] != size):
            return False
        if any(n > 1 and st % align for n, st in zip(arr.shape[:3], arr.strides[:3])):
            return False
        if math.prod(arr.shape) and _address(arr) % align:
            return False
    return True


def _split_merge_kernel(dtype):
    nt = _pow2("CUDA_SPLIT_MERGE_THREADS", limits.MAX_THREADS_PER_BLOCK)
    key = ("split_merge", np.dtype(dtype), nt)
    kern = _kernels.get(key)
    if kern is None:
        from . import decode

        with _lock:
            kern = _kernels.setdefault(key, decode.make_split_merge(dtype, nt))
    return kern, nt


def decode_signature(dtype) -> str:
    """The Numba signature the streaming kernel is compiled for (:class:`DecodeArgs`)."""
    return signature(DecodeArgs, dtype)


def split_merge_signature(dtype) -> str:
    """The Numba signature the split-merge kernel is compiled for (:class:`SplitMergeArgs`)."""
    return signature(SplitMergeArgs, dtype)


def _stream_rows() -> int:
    """config.CUDA_STREAM_ROWS (0 allowed: never stream from :func:`attention`)."""
    return check_knob("CUDA_STREAM_ROWS", config.CUDA_STREAM_ROWS, minimum=0)


def _sm_count() -> int:
    sms = _state.get("sms")
    if sms is None:
        sms = 1
        if not simulator():
            from numba import cuda

            sms = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
        _state["sms"] = sms
    return sms


def default_splits(batch, heads, group, max_rows, max_keys, *, paged=False):
    """The split count of ``num_splits=None``.

    Calls the streaming kernel takes (``group * max_rows <=
    config.CUDA_STREAM_ROWS``) have ``units = batch * (heads / group) *
    ceil(group * max_rows / CUDA_DECODE_ROWS)`` blocks; when that is under
    two blocks per SM, the keys are split into ``ceil(2 * SMs / units)``
    chunks, at most one per ``CUDA_MIN_SPLIT_KEYS`` keys (and at most 64).
    Otherwise 1: the fused kernel (many queries) does not split. ``paged``
    does not matter here (a block reads one key head's pieces of the rows).
    """
    rows = int(group) * int(max_rows)
    if rows == 0 or rows > _stream_rows():
        return 1
    rb = min(_knob("CUDA_DECODE_ROWS"), rows)  # a power of two >= that in decode_geometry
    units = int(batch) * (int(heads) // max(int(group), 1)) * (-(-rows // rb))
    target = 2 * _sm_count()
    if units <= 0 or units >= target:
        return 1
    cap = max(1, min(64, int(max_keys) // _knob("CUDA_MIN_SPLIT_KEYS")))
    return max(1, min(-(-target // units), cap))


def _head_group(seq, group: int) -> int:
    """Query heads a block takes together: the whole GQA group when the
    sequence table is the same for every head of a group, else 1."""
    g2 = seq.shape[1]
    if group == 1 or g2 == 1 or seq.strides[1] == 0:
        return group
    t = np.asarray(seq).reshape(seq.shape[0], g2 // group, group, seq.shape[2])
    return group if bool((t == t[:, :, :1]).all()) else 1


def _stream_handle(stream) -> int:
    """The raw CUDA handle of a Numba stream (0: the default stream)."""
    return int(stream) if stream else 0


def _workspace(n: int, dtype, like, stream):
    """A new 1-d device array of ``n`` elements that one call owns, allocated
    on its launch stream by the library of ``like`` (the caller's array).

    Nothing is cached: the array dies with the call, so two calls never
    share it, whichever threads queue their launches on one stream, and
    device memory stays flat over any number of calls and streams. torch's
    and CuPy's caching allocators keep freed blocks per stream and hand the
    block to the next call on the same stream (stream-ordered after this
    call's kernels); Numba frees its arrays only after pending work.
    """
    dtype = np.dtype(dtype)
    n = max(int(n), 1)
    lib = _library(like) if like is not None and not simulator() else ""
    if lib == "torch":
        import torch

        device, handle = like.device, _stream_handle(stream)
        tdtype = getattr(torch, dtype.name)
        if handle == torch.cuda.current_stream(device).cuda_stream:
            return as_kernel_array(torch.empty(n, dtype=tdtype, device=device))
        with torch.cuda.stream(torch.cuda.ExternalStream(handle, device=device)):
            return as_kernel_array(torch.empty(n, dtype=tdtype, device=device))
    if lib == "cupy":
        import cupy

        handle = _stream_handle(stream)
        with like.device:
            if handle == cupy.cuda.get_current_stream().ptr:
                return as_kernel_array(cupy.empty(n, dtype=dtype))
            with cupy.cuda.ExternalStream(handle):
                return as_kernel_array(cupy.empty(n, dtype=dtype))
    from numba import cuda

    return cuda.device_array(n, dtype=dtype, stream=stream or 0)


def _block_table_dummy():
    key = ("int32", 2)
    arr = _dummies.get(key)
    if arr is None:
        from numba import cuda

        arr = _dummies[key] = cuda.device_array((1, 1), dtype=np.int32)
    return arr


def split_attention(
    q,
    k,
    v,
    out,
    lse,
    seq,
    max_rows,
    bias,
    mask,
    scale,
    window_left,
    window_right,
    num_splits,
    block_table,
    stream=None,
    like=None,
):
    """:func:`attention` split over keys, over a contiguous or paged cache
    (numbattn._backend.Backend.split_attention): the streaming kernel
    (numbattn/cuda/decode.py), then, for more than one split, the device
    merge of the partials (scratch ``num_splits * G1 * Hq * Tq * (dv + 1)``
    elements, a single G1 slab when out repeats over G1, owned by the call:
    :func:`_workspace`, in ``like``'s array library)."""
    g1, hq, tq, d = q.shape
    dv = v.shape[3]
    dtype = np.dtype(q.dtype)
    if block_table is None:
        hk = k.shape[1]
        # (G1, Hk, Tk, d) viewed as (G1, Tk, Hk, d): the paged kernel's index order.
        k = restride(k, (g1, k.shape[2], hk, d), _swap12(k.strides))
        v = restride(v, (g1, v.shape[2], hk, dv), _swap12(v.strides))
        table, block_size, paged = _block_table_dummy(), 1, False
    else:
        hk = k.shape[2]
        table, block_size, paged = block_table, k.shape[1], True
    gh = _head_group(seq, hq // hk)
    geo = decode_geometry(dtype, d, dv, gh * int(max_rows))
    wl, nteam, rb, _kb, _epl = geo
    n_rt = -(-(gh * int(max_rows)) // rb)
    n_split = max(1, int(num_splits))
    grid = g1 * (hq // gh) * n_rt * n_split
    if grid == 0:
        return
    dev_seq = _seq_table(seq, stream)
    bias, mask, has_bias, has_mask = _extras(dtype, bias, mask)
    from .decode import vector_width

    kern = _decode_kernel(dtype, geo, vec=vector_ok((k, v), vector_width(dtype, geo[4])))
    args = DecodeArgs(
        q=q,
        k=k,
        v=v,
        out=out,
        lse=lse if lse is not None else _dummy(dtype, 3),
        seq=dev_seq,
        table=table,
        bias=bias,
        mask=mask,
        scale=dtype.type(scale),
        gh=gh,
        n_rt=n_rt,
        n_split=n_split,
        split_rows=0,
        block_size=block_size,
        wl=_window(window_left),
        wr=_window(window_right),
        write_lse=lse is not None,
        has_bias=has_bias,
        has_mask=has_mask,
        paged=paged,
    )
    if n_split == 1:
        _launch(kern, decode_signature(dtype), grid, wl * nteam, stream, args)
        return
    # Partials: rows s*Tq + r of a (G1, Hq, n_split*Tq, dv) slab (one slab,
    # zero stride over G1, when out repeats over G1: packed sequences).
    slabs = 1 if g1 == 1 or out.strides[0] == 0 else g1
    rows = n_split * tq
    n_o = slabs * hq * rows * dv
    n_l = slabs * hq * rows
    buf = _workspace(n_o + n_l, dtype, like, stream)
    isz = dtype.itemsize
    s0 = 0 if slabs == 1 else hq * rows * dv * isz
    part_o = restride(buf, (g1, hq, rows, dv), (s0, rows * dv * isz, dv * isz, isz))
    s0 = 0 if slabs == 1 else hq * rows * isz
    part_l = restride(index(buf, slice(n_o, n_o + n_l)), (g1, hq, rows), (s0, rows * isz, isz))
    args = args._replace(out=part_o, lse=part_l, split_rows=tq, write_lse=True)
    _launch(kern, decode_signature(dtype), grid, wl * nteam, stream, args)
    merge_kern, nt = _split_merge_kernel(dtype)
    margs = SplitMergeArgs(
        part_o=part_o,
        part_l=part_l,
        out=out,
        lse=lse if lse is not None else _dummy(dtype, 3),
        seq=dev_seq,
        n_split=n_split,
        split_rows=tq,
        write_lse=lse is not None,
    )
    mgrid = g1 * hq * int(max_rows)
    if mgrid:
        _launch(merge_kern, split_merge_signature(dtype), mgrid, nt, stream, margs)


def _swap12(strides):
    return (strides[0], strides[2], strides[1], strides[3])


def _takes_streaming(q, k, max_rows: int) -> bool:
    """Whether :func:`attention` takes the streaming kernel: few rows per KV head."""
    group = q.shape[1] // max(k.shape[1], 1)
    return 0 < group * int(max_rows) <= _stream_rows()
