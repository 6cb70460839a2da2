"""Why a stream sample needs a wait after a numbattn call: softmax's fraction
of the streaming bandwidth under four round designs, alternated in one process.

Usage::

    NUMBA_NUM_THREADS=2 PYTHONPATH=. python scripts/stream_wait.py 1,8,2048,2048 float32 [ROUNDS]

Designs (rotated from round to round): the bench's (18 kernel samples, a
50 ms wait, one stream sample), the same without the wait, one kernel sample
then the wait and the stream, and the stream first then one kernel sample.
Without the wait the stream runs beside Numba's still-spinning pool (up to
~25 ms after a call) and reads low, so the fraction reads high (Zen 4 VM,
2 threads: stream 20-23 GB/s against 26-29, fractions 100-127 % against
71-95 %).
"""

import statistics as st
import sys
import time

import numba
import numpy as np

import numbattn
from numbattn._bench import StreamCeiling

shape = tuple(int(v) for v in sys.argv[1].split(","))
dt = sys.argv[2]
x = np.random.default_rng(0).standard_normal(shape).astype(dt)
o = np.empty_like(x)
sc = StreamCeiling(dt, numba.get_num_threads())


def k():
    t0 = time.perf_counter()
    numbattn.softmax(x, out=o)
    return time.perf_counter() - t0


def s(sleep):
    if sleep:
        time.sleep(0.05)
    t0 = time.perf_counter()
    sc._pass()
    return time.perf_counter() - t0


k()
k()
kb, sb = x.nbytes * 2, sc.bytes
res = {}


def design(name, nk, sleep, stream_first):
    ks = []
    ss = s(sleep) if stream_first else None
    for _ in range(nk):
        ks.append(k())
    if not stream_first:
        ss = s(sleep)
    res.setdefault(name, []).append(
        ((kb / st.median(ks)) / (sb / ss), kb / st.median(ks) / 1e9, sb / ss / 1e9)
    )


designs = [
    ("bench: 18 k, sleep, s", 18, True, False),
    ("18 k, s (no sleep)", 18, False, False),
    ("1 k, sleep, s", 1, True, False),
    ("script: s, 1 k", 1, False, True),
]
for r in range(int(sys.argv[3]) if len(sys.argv) > 3 else 12):
    for d in designs[r % 4 :] + designs[: r % 4]:
        design(*d)
for name, v in res.items():
    print(
        f"{name:24s} fraction {st.median(a for a, _, _ in v):.0%}  kernel {st.median(b for _, b, _ in v):.1f} GB/s  stream {st.median(c for _, _, c in v):.1f} GB/s"
    )
