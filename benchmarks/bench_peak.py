"""The machine's ceilings, and the fraction of them numbattn reaches.

- ``PeakCPU``: NumPy's GEMM rate (``matmul`` 4096^3, GFLOP/s) and the
  streaming bandwidth (``y = x * 1``, GB/s read + written) per dtype;
- ``FractionCPU``: numbattn's attention rate (4*B*H*N^2*d flop, halved if
  causal) over the GEMM rate measured in the same process, at the shapes of
  issue 12. The GEMM runs first, then the benchmark waits
  (``common.SETTLE_S``) so that OpenBLAS's spinning threads are asleep when
  numbattn is timed; asv runs every benchmark in a process of its own.
"""

import time

import numbattn

from . import common as C

FRACTION_SHAPES = ["1x8x2048x64", "4x8x512x64", "1x8x4096x128", "1x32x1024x64"]
FRACTION_PARAMS = C.grid([C.DTYPES, FRACTION_SHAPES, C.CAUSAL])
FRACTION_NAMES = ("dtype", "B x H x N x d", "causal")


class PeakCPU:
    timeout = C.TIMEOUT
    repeat = 1
    number = 1
    params = C.grid(C.DTYPES)
    param_names = ("dtype",)

    def track_gemm_gflops(self, dtype):
        return C.gemm_gflops(dtype)

    track_gemm_gflops.unit = "GFLOP/s"

    def track_stream_gbs(self, dtype):
        return C.stream_gbs(dtype, C.numba_threads())

    track_stream_gbs.unit = "GB/s"


class FractionCPU:
    timeout = C.TIMEOUT
    repeat = 1
    number = 1
    params = FRACTION_PARAMS
    param_names = FRACTION_NAMES

    def setup(self, dtype, shape, causal):
        b, h, n, d = map(int, shape.split("x"))
        pool = C.build_pool()
        self.q, self.k, self.v = C.attention_inputs(pool, dtype, b, h, n, d)
        self.flops = 4.0 * b * h * n * n * d / (2 if causal else 1)
        self.causal = causal
        numbattn.attention(self.q, self.k, self.v, causal=causal)  # compile / load

    def track_attention_of_gemm(self, dtype, shape, causal):
        gemm = C.gemm_gflops(dtype)
        time.sleep(C.SETTLE_S)
        sec = C._median_seconds(
            lambda: numbattn.attention(self.q, self.k, self.v, causal=self.causal), 5
        )
        return self.flops / sec / 1e9 / gemm

    track_attention_of_gemm.unit = "fraction of GEMM"
