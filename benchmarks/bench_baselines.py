"""Baselines as benchmarks of their own, on the same grids as numbattn, so
asv's pages show numbattn and its baselines side by side over time:

- ``NumpyCPU``: the correct batched NumPy implementation
  (``s = q @ k.swapaxes(-1, -2) * scale``, stable softmax by subtracting the
  row maximum, ``@ v``), never the reshape-to-(B*N, d) shortcut;
- ``TorchCPU`` / ``TorchGPU``: ``torch.nn.functional.scaled_dot_product_attention``,
  ``torch.matmul`` for scores and ``torch.softmax``, where torch is importable
  (skipped otherwise; ``TorchGPU`` also needs torch with CUDA). torch uses as
  many threads as Numba.
"""

import math

from . import common as C


class _Base:
    timeout = C.TIMEOUT
    repeat = C.REPEAT
    setup_cache = staticmethod(C.build_pool)


class NumpyCPU(_Base):
    params = C.ATTENTION_PARAMS
    param_names = C.ATTENTION_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        b, h = C.split_bh(bh)
        C.check_size(b, h, n)
        self.q, self.k, self.v = C.attention_inputs(pool, dtype, b, h, n, d)
        self.scale = 1.0 / math.sqrt(d)
        self.causal = causal
        C.numpy_attention(self.q, self.k, self.v, self.scale, causal)

    def time_attention(self, pool, dtype, bh, n, d, causal):
        C.numpy_attention(self.q, self.k, self.v, self.scale, self.causal)


class NumpyScoresCPU(_Base):
    params = C.SCORES_PARAMS
    param_names = C.SCORES_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        b, h = C.split_bh(bh)
        C.check_size(b, h, n)
        self.q, self.k = C.attention_inputs(pool, dtype, b, h, n, d, count=2)
        self.scale = 1.0 / math.sqrt(d)
        self.causal = causal
        C.numpy_scores(self.q, self.k, self.scale, causal)

    def time_scores(self, pool, dtype, bh, n, d, causal):
        C.numpy_scores(self.q, self.k, self.scale, self.causal)


class NumpySoftmaxCPU(_Base):
    params = C.SOFTMAX_PARAMS
    param_names = C.SOFTMAX_NAMES

    def setup(self, pool, dtype, bh, n):
        b, h = C.split_bh(bh)
        C.check_size(b, h, n)
        self.x = C.softmax_input(pool, dtype, b, h, n)
        C.numpy_softmax(self.x)

    def time_softmax(self, pool, dtype, bh, n):
        C.numpy_softmax(self.x)


class _TorchBase(_Base):
    device = "cpu"

    def _tensors(self, *arrays):
        if self.device != "cpu" and not C.nvidia_present():
            raise NotImplementedError("no NVIDIA GPU")
        if self.device == "cpu":
            torch = C.import_torch()
            torch.set_num_threads(C.numba_threads())
        else:
            torch = C.require_torch_cuda()
        self.torch = torch
        self.F = torch.nn.functional
        out = tuple(torch.from_numpy(a).to(self.device) for a in arrays)
        self._sync()
        return out

    def _sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def _mask(self, n):
        return self.torch.from_numpy(~C.causal_mask(n, n)).to(self.device)


class TorchCPU(_TorchBase):
    """SDPA (is_causal for causal; Nq == Nk, so top-left = bottom-right)."""

    params = C.ATTENTION_PARAMS
    param_names = C.ATTENTION_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        b, h = C.split_bh(bh)
        if self.device == "cpu":
            C.check_size(b, h, n)
        self.q, self.k, self.v = self._tensors(*C.attention_inputs(pool, dtype, b, h, n, d))
        self.causal = causal
        self.time_attention(pool, dtype, bh, n, d, causal)

    def time_attention(self, pool, dtype, bh, n, d, causal):
        self.F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.causal)
        self._sync()


class TorchScoresCPU(_TorchBase):
    params = C.SCORES_PARAMS
    param_names = C.SCORES_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        b, h = C.split_bh(bh)
        if self.device == "cpu":
            C.check_size(b, h, n)
        self.q, self.k = self._tensors(*C.attention_inputs(pool, dtype, b, h, n, d, count=2))
        self.kt = self.k.transpose(-1, -2)
        self.scale = 1.0 / math.sqrt(d)
        self.mask = self._mask(n) if causal else None
        self.time_scores(pool, dtype, bh, n, d, causal)

    def time_scores(self, pool, dtype, bh, n, d, causal):
        s = self.torch.matmul(self.q, self.kt).mul_(self.scale)
        if self.mask is not None:
            s.masked_fill_(self.mask, float("-inf"))
        self._sync()


class TorchSoftmaxCPU(_TorchBase):
    params = C.SOFTMAX_PARAMS
    param_names = C.SOFTMAX_NAMES

    def setup(self, pool, dtype, bh, n):
        b, h = C.split_bh(bh)
        if self.device == "cpu":
            C.check_size(b, h, n)
        (self.x,) = self._tensors(C.softmax_input(pool, dtype, b, h, n))
        self.time_softmax(pool, dtype, bh, n)

    def time_softmax(self, pool, dtype, bh, n):
        self.torch.softmax(self.x, dim=-1)
        self._sync()


class TorchGPU(TorchCPU):
    device = "cuda"
    params = C.gpu_grid(C.ATTENTION_PARAMS)


class TorchScoresGPU(TorchScoresCPU):
    device = "cuda"
    params = C.gpu_grid(C.SCORES_PARAMS)


class TorchSoftmaxGPU(TorchSoftmaxCPU):
    device = "cuda"
    params = C.gpu_grid(C.SOFTMAX_PARAMS)
