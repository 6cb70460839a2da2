"""Issue-11 decode cases, an older numbattn against this checkout, alternated
in one process (same arrays, same machine state), with torch SDPA and a
streaming read of the same run.

The older version is imported as ``numbattn_old`` from a directory given by
``OLD``, made from any commit with::

    mkdir -p /tmp/old && git archive <commit> numbattn | tar -x -C /tmp/old
    mv /tmp/old/numbattn /tmp/old/numbattn_old

Then::

    OLD=/tmp/old PYTHONPATH=. python scripts/decode_ab.py --threads 2

One thread is timed in thread CPU time (robust on a shared machine), more
threads in wall time, or with ``--clock process`` in the process's CPU time
(all threads; run with ``OMP_WAIT_POLICY=passive`` so that idle threads do
not spin): on a loaded host, where wall times mostly measure the scheduler.
Prints medians and the old / new time ratio per case.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

CASES = {
    "A": ((1, 8, 8, 1, 32768, 128), False, None),
    "B": ((4, 8, 8, 1, 8192, 128), False, None),
    "GQA": ((1, 32, 8, 1, 32768, 128), False, None),
    "causal": ((1, 32, 32, 16, 16384, 128), True, None),
    "paged16": ((1, 8, 8, 1, 32768, 128), False, 16),
    "paged256": ((1, 8, 8, 1, 32768, 128), False, 256),
}


def run_case(name, old, new, threads, rounds, torch, read, x, rng, clock) -> str:
    """One case: check old == new, time them alternated, one line of results."""
    from numbattn._bench import _paged_from
    from numbattn.reference import visible

    (b, h, hk, nq, nk, d), causal, block = CASES[name]
    q = rng.standard_normal((b, h, nq, d), dtype=np.float32)
    k = rng.standard_normal((b, hk, nk, d), dtype=np.float32)
    v = rng.standard_normal((b, hk, nk, d), dtype=np.float32)
    if block:
        kc, vc, table = _paged_from(k, v, block)
        lens = np.full(b, nk)
        calls = {
            "old": lambda: old.paged_attention(q, kc, vc, table, lens),
            "new": lambda: new.paged_attention(q, kc, vc, table, lens),
        }
    else:
        calls = {
            "old": lambda: old.attention(q, k, v, causal=causal),
            "new": lambda: new.attention(q, k, v, causal=causal),
        }
    calls["stream"] = lambda: read(x, threads)
    if torch is not None:
        import torch.nn.functional as F

        tq, tk, tv = (torch.from_numpy(t) for t in (q, k, v))
        mask = torch.from_numpy(visible(nq, nk, causal=True)) if causal else None
        calls["torch"] = lambda: F.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=mask, enable_gqa=h != hk
        )
    diff = np.abs(calls["old"]() - calls["new"]()).max()
    assert diff < 1e-4, (name, diff)
    times: dict[str, list[float]] = {n: [] for n in calls}
    for _ in range(rounds):
        for n, f in calls.items():
            t0 = clock()
            f()
            times[n].append(clock() - t0)
    med = {n: float(np.median(t)) for n, t in times.items()}
    gbs = x.nbytes / med["stream"] / 1e9
    kv = (k.nbytes + v.nbytes) / 1e9
    line = (
        f"{name:9s} old {med['old'] * 1e3:8.2f} ms  new {med['new'] * 1e3:8.2f} ms"
        f"  old/new {med['old'] / med['new']:.2f}"
        f"  K+V of stream: old {kv / med['old'] / gbs:.2f}"
        f" new {kv / med['new'] / gbs:.2f} (stream {gbs:.1f} GB/s)"
    )
    if "torch" in med:
        line += f"  torch/new {med['torch'] / med['new']:.2f}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--clock", choices=["auto", "process"], default="auto")
    a = ap.parse_args()
    sys.path.insert(0, os.environ["OLD"])
    import numba
    import numbattn_old  # type: ignore[import-not-found]

    import numbattn
    from numbattn._bench import _stream_read_kernel

    numba.set_num_threads(a.threads)
    torch = None
    if not a.no_torch:
        import torch

        torch.set_num_threads(a.threads)
    read = _stream_read_kernel()
    x = np.ones(64 << 20, np.float32)
    rng = np.random.default_rng(0)
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    if a.clock == "process":
        clock = time.process_time
    print(f"numbattn_old: {numbattn_old.__file__}\nnumbattn: {numbattn.__file__}")
    for name in a.cases.split(","):
        line = run_case(
            name, numbattn_old, numbattn, a.threads, a.rounds, torch, read, x, rng, clock
        )
        print(line, flush=True)


if __name__ == "__main__":
    main()
