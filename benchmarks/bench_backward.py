"""The attention backward pass on the CPU, torch's beside it, peak memory.

``BackwardCPU`` times ``numbattn.attention_backward`` from a forward's
``out`` and ``lse`` (computed in ``setup``); ``TorchBackwardCPU`` times
``out.backward(dout)`` of torch's SDPA, its forward run untimed before each
sample (``setup`` of a ``number = 1`` benchmark). Commits without the
backward skip (NotImplementedError in ``setup``).
"""

import math

import numpy as np

import numbattn

from . import common as C

N_BACKWARD = [128, 512, 2048]
BACKWARD_PARAMS = C.grid([C.DTYPES, C.BATCH_HEADS, N_BACKWARD, [64], C.CAUSAL])
BACKWARD_NAMES = C.ATTENTION_NAMES


def _require_backward():
    if not hasattr(numbattn, "attention_backward"):
        raise NotImplementedError("this commit has no attention_backward")


class _Base:
    timeout = C.TIMEOUT
    repeat = C.REPEAT
    setup_cache = staticmethod(C.build_pool)


def _inputs(pool, dtype, b, h, n, d, causal):
    q, k, v, dout = C.attention_inputs(pool, dtype, b, h, n, d, count=4)
    lse = np.empty((b, h, n), dtype)
    out = numbattn.attention(q, k, v, causal=causal, lse=lse)
    return q, k, v, out, lse, dout


class BackwardCPU(_Base):
    """``numbattn.attention_backward(q, k, v, out, lse, dout, causal=...)``."""

    params = BACKWARD_PARAMS
    param_names = BACKWARD_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        _require_backward()
        b, h = C.split_bh(bh)
        C.check_size(b, h, n)
        self.args = _inputs(pool, dtype, b, h, n, d, causal)
        self.causal = causal
        numbattn.attention_backward(*self.args, causal=causal)  # compile / load

    def time_backward(self, pool, dtype, bh, n, d, causal):
        numbattn.attention_backward(*self.args, causal=self.causal)


class TorchBackwardCPU(_Base):
    """torch SDPA's autograd backward, ``out.backward(dout)``, without the forward."""

    params = BACKWARD_PARAMS
    param_names = BACKWARD_NAMES
    number = 1  # setup (the forward) runs before every sample
    warmup_time = 0  # a warm-up call would backward through the graph again

    def setup(self, pool, dtype, bh, n, d, causal):
        b, h = C.split_bh(bh)
        C.check_size(b, h, n)
        torch = C.import_torch()
        torch.set_num_threads(C.numba_threads())
        q, k, v, dout = C.attention_inputs(pool, dtype, b, h, n, d, count=4)
        self.leaves = [torch.from_numpy(x).requires_grad_(True) for x in (q, k, v)]
        self.dout = torch.from_numpy(dout)
        self.out = torch.nn.functional.scaled_dot_product_attention(
            *self.leaves, is_causal=causal, scale=1.0 / math.sqrt(d)
        )

    def time_backward(self, pool, dtype, bh, n, d, causal):
        # retain_graph: a repeated call in one setup (asv's calibration) still works.
        self.out.backward(self.dout, retain_graph=True)


class BackwardMemoryCPU(_Base):
    """Peak memory of the backward at 1x1x16384x64 float32 above the resident
    set before the call (inputs, out, lse and dout already there); the three
    gradients it returns are 12 MiB. Target: < 64 MiB beyond the gradients."""

    repeat = 1
    number = 1

    def setup(self, pool):
        _require_backward()
        numbattn.attention_backward(*_inputs(pool, "float32", 1, 1, 8, 64, False))
        self.args = _inputs(pool, "float32", 1, 1, 16384, 64, False)

    def track_backward_extra_mib(self, pool):
        return C.peak_rss_increase_mib(lambda: numbattn.attention_backward(*self.args))

    track_backward_extra_mib.unit = "MiB"
