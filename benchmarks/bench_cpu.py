"""numbattn on the CPU: time over the parameter grids, peak memory.

Compilation (or the load of the ``cache=True`` kernels) happens in ``setup``
with the benchmark's own inputs, never inside a timed call. Inputs are cut
from one random pool built once per run (``setup_cache``).

scores and softmax (N x N outputs) are timed two ways: ``time_scores`` /
``time_softmax`` with a new output each call (as NumPy and torch, in
bench_baselines, allocate theirs; the first touch of fresh pages is counted),
and ``time_scores_out`` / ``time_softmax_out`` into an output allocated in
``setup`` (as the machine's ceilings in bench_peak write into existing
arrays).
"""

import numpy as np

import numbattn

from . import common as C


class _Base:
    timeout = C.TIMEOUT
    repeat = C.REPEAT
    setup_cache = staticmethod(C.build_pool)  # shared by every suite (one key)


class AttentionCPU(_Base):
    """Fused attention ``numbattn.attention(q, k, v, causal=...)``."""

    params = C.ATTENTION_PARAMS
    param_names = C.ATTENTION_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        b, h = C.split_bh(bh)
        C.check_size(b, h, n)
        self.q, self.k, self.v = C.attention_inputs(pool, dtype, b, h, n, d)
        self.causal = causal
        numbattn.attention(self.q, self.k, self.v, causal=causal)  # compile / load

    def time_attention(self, pool, dtype, bh, n, d, causal):
        numbattn.attention(self.q, self.k, self.v, causal=self.causal)


class ScoresCPU(_Base):
    """Blocked pairwise scores ``numbattn.scores(q, k, causal=...)``."""

    params = C.SCORES_PARAMS
    param_names = C.SCORES_NAMES

    def setup(self, pool, dtype, bh, n, d, causal):
        b, h = C.split_bh(bh)
        C.check_size(b, h, n)
        self.q, self.k = C.attention_inputs(pool, dtype, b, h, n, d, count=2)
        self.causal = causal
        self.out = np.empty((b, h, n, n), dtype)
        numbattn.scores(self.q, self.k, causal=causal)
        numbattn.scores(self.q, self.k, causal=causal, out=self.out)  # first touch

    def time_scores(self, pool, dtype, bh, n, d, causal):
        """A new output each call."""
        numbattn.scores(self.q, self.k, causal=self.causal)

    def time_scores_out(self, pool, dtype, bh, n, d, causal):
        """Into a preallocated ``out=``."""
        numbattn.scores(self.q, self.k, causal=self.causal, out=self.out)


class SoftmaxCPU(_Base):
    """Row-wise softmax over a (B, H, N, N) array."""

    params = C.SOFTMAX_PARAMS
    param_names = C.SOFTMAX_NAMES

    def setup(self, pool, dtype, bh, n):
        b, h = C.split_bh(bh)
        C.check_size(b, h, n)
        self.x = C.softmax_input(pool, dtype, b, h, n)
        self.out = np.empty_like(self.x)
        numbattn.softmax(self.x)
        numbattn.softmax(self.x, out=self.out)  # first touch

    def time_softmax(self, pool, dtype, bh, n):
        """A new output each call."""
        numbattn.softmax(self.x)

    def time_softmax_out(self, pool, dtype, bh, n):
        """Into a preallocated ``out=``."""
        numbattn.softmax(self.x, out=self.out)


MEMORY_SHAPES = ["1x1x16384x64", "1x8x4096x64"]


class MemoryCPU(_Base):
    """Peak memory of attention. ``peakmem_*`` is the whole process's peak
    resident size (interpreter, Numba, inputs included); ``track_*_extra_mib``
    is the peak above the resident set just before the call, i.e. what the
    call itself needs, its output included. Target at 1x1x16384x64: < 64 MiB
    above the inputs (the output is 4 MiB)."""

    params = C.grid(MEMORY_SHAPES)
    param_names = ("B x H x N x d (float32)",)
    repeat = 1
    number = 1

    def setup(self, pool, shape):
        b, h, n, d = map(int, shape.split("x"))
        numbattn.attention(*C.attention_inputs(pool, "float32", 1, 1, 8, d))  # compile only
        self.q, self.k, self.v = C.attention_inputs(pool, "float32", b, h, n, d)

    def peakmem_attention(self, pool, shape):
        numbattn.attention(self.q, self.k, self.v)

    def track_attention_extra_mib(self, pool, shape):
        return C.peak_rss_increase_mib(lambda: numbattn.attention(self.q, self.k, self.v))

    track_attention_extra_mib.unit = "MiB"


class ScoresMemoryCPU(_Base):
    """Peak memory of scores at 1x8x2048x64 float32: its output alone is
    1x8x2048x2048 float32 = 128 MiB."""

    repeat = 1
    number = 1

    def setup(self, pool):
        numbattn.scores(*C.attention_inputs(pool, "float32", 1, 1, 8, 64, count=2))
        self.q, self.k = C.attention_inputs(pool, "float32", 1, 8, 2048, 64, count=2)

    def peakmem_scores(self, pool):
        numbattn.scores(self.q, self.k)

    def track_scores_extra_mib(self, pool):
        return C.peak_rss_increase_mib(lambda: numbattn.scores(self.q, self.k))

    track_scores_extra_mib.unit = "MiB"


class DecodeCPU(_Base):
    """Few queries over a long KV cache (issue 11): ``numbattn.attention`` on a
    contiguous cache and ``numbattn.paged_attention`` on a shuffled paged one
    (float32). Skipped on commits without them. K+V of the largest case: 256
    MiB (built from the pool, not pickled)."""

    params = C.DECODE_PARAMS
    param_names = C.DECODE_NAMES

    def setup(self, pool, case, cache):
        import numpy as np

        if not hasattr(numbattn, "paged_attention"):
            raise NotImplementedError("no decode path in this commit")
        b, h, hk, nq, nk = (int(x) for x in case.split("x"))
        if cache != "contiguous" and nq > 1:
            raise NotImplementedError("paged: decode cases only")
        d = 128
        self.causal = nq > 1
        self.q = C.from_pool(pool, (b, h, nq, d), np.float32, which=0)
        k = C.from_pool(pool, (b, hk, nk, d), np.float32, which=1)
        v = C.from_pool(pool, (b, hk, nk, d), np.float32, which=2)
        self.lengths = np.full(b, nk)
        if cache == "contiguous":
            self.k, self.v, self.table = k, v, None
        else:
            bs = int(cache[len("paged") :])
            nb = b * nk // bs
            perm = np.random.default_rng(0).permutation(nb)
            self.k = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).reshape(nb, bs, hk, d)[perm]
            self.v = np.ascontiguousarray(v.transpose(0, 2, 1, 3)).reshape(nb, bs, hk, d)[perm]
            self.table = np.argsort(perm).reshape(b, -1).astype(np.int32)
        self.time_decode(pool, case, cache)  # compile / load

    def time_decode(self, pool, case, cache):
        if self.table is None:
            numbattn.attention(self.q, self.k, self.v, causal=self.causal)
        else:
            numbattn.paged_attention(self.q, self.k, self.v, self.table, self.lengths)
