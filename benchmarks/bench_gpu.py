"""numbattn on an NVIDIA GPU (numba-cuda device arrays).

Every benchmark is skipped (NotImplementedError in setup) where numbattn
cannot use a GPU: no numba-cuda, no driver or device, a commit without the
CUDA backend, or Numba's CUDA simulator. On a machine without an NVIDIA
driver the grids shrink to one (skipped) point, see ``common.gpu_grid``. Inputs are copied to the device in ``setup``, which also
compiles (or loads) the kernels; each timed call ends with
``cuda.synchronize()`` so the time covers the kernel, not just its launch.
scores and softmax are also timed into an output allocated in ``setup``
(``time_scores_out``, ``time_softmax_out``; the plain names allocate a new
output each call).
"""

import numbattn

from . import common as C


class _Base:
    timeout = C.TIMEOUT
    repeat = C.REPEAT
    setup_cache = staticmethod(C.build_pool)

    def _to_device(self, *arrays):
        self.cuda = C.require_gpu()
        out = tuple(self.cuda.to_device(a) for a in arrays)
        self.cuda.synchronize()
        return out


class AttentionGPU(_Base):
    params = C.gpu_grid(C.ATTENTION_PARAMS)
    param_names = C.ATTENTION_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        C.require_gpu()
        b, h = C.split_bh(bh)
        self.q, self.k, self.v = self._to_device(*C.attention_inputs(pool, dtype, b, h, n, d))
        self.causal = causal
        numbattn.attention(self.q, self.k, self.v, causal=causal)
        self.cuda.synchronize()

    def time_attention(self, pool, dtype, bh, n, d, causal):
        numbattn.attention(self.q, self.k, self.v, causal=self.causal)
        self.cuda.synchronize()


class ScoresGPU(_Base):
    params = C.gpu_grid(C.SCORES_PARAMS)
    param_names = C.SCORES_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        C.require_gpu()
        b, h = C.split_bh(bh)
        self.q, self.k = self._to_device(*C.attention_inputs(pool, dtype, b, h, n, d, count=2))
        self.causal = causal
        self.out = self.cuda.device_array((b, h, n, n), dtype)
        numbattn.scores(self.q, self.k, causal=causal)
        numbattn.scores(self.q, self.k, causal=causal, out=self.out)
        self.cuda.synchronize()

    def time_scores(self, pool, dtype, bh, n, d, causal):
        numbattn.scores(self.q, self.k, causal=self.causal)
        self.cuda.synchronize()

    def time_scores_out(self, pool, dtype, bh, n, d, causal):
        numbattn.scores(self.q, self.k, causal=self.causal, out=self.out)
        self.cuda.synchronize()


class SoftmaxGPU(_Base):
    params = C.gpu_grid(C.SOFTMAX_PARAMS)
    param_names = C.SOFTMAX_NAMES

    def setup(self, pool, dtype, bh, n):
        C.require_gpu()
        b, h = C.split_bh(bh)
        (self.x,) = self._to_device(C.softmax_input(pool, dtype, b, h, n))
        self.out = self.cuda.device_array(self.x.shape, self.x.dtype)
        numbattn.softmax(self.x)
        numbattn.softmax(self.x, out=self.out)
        self.cuda.synchronize()

    def time_softmax(self, pool, dtype, bh, n):
        numbattn.softmax(self.x)
        self.cuda.synchronize()

    def time_softmax_out(self, pool, dtype, bh, n):
        numbattn.softmax(self.x, out=self.out)
        self.cuda.synchronize()


MEMORY_SHAPES = ["1x1x16384x64", "4x8x4096x64"]


class MemoryGPU(_Base):
    """Peak GPU memory allocated through Numba's context during one call
    (``track_*``, MiB above what was in use before; inputs excluded). Numba
    device arrays are freed as soon as they are unreferenced, but Numba may
    defer deallocation, so the number is an upper bound."""

    params = C.gpu_grid([MEMORY_SHAPES])
    param_names = ("B x H x N x d (float32)",)
    repeat = 1
    number = 1

    def setup(self, pool, shape):
        C.require_gpu()
        b, h, n, d = map(int, shape.split("x"))
        self.q, self.k, self.v = self._to_device(*C.attention_inputs(pool, "float32", b, h, n, d))
        numbattn.attention(self.q, self.k, self.v)
        self.cuda.synchronize()

    def track_attention_gpu_mem_mib(self, pool, shape):
        ctx = self.cuda.current_context()
        free0, _total = ctx.get_memory_info()
        out = numbattn.attention(self.q, self.k, self.v)
        self.cuda.synchronize()
        free1, _ = ctx.get_memory_info()
        del out
        return max(0, free0 - free1) / 2**20

    track_attention_gpu_mem_mib.unit = "MiB"

    def peakmem_attention_host(self, pool, shape):
        """Host peak RSS of the process while driving the GPU call."""
        numbattn.attention(self.q, self.k, self.v)
        self.cuda.synchronize()
