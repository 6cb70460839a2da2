"""Time per call of small attention calls: numbattn with warm plans, numbattn's
full path (plans off), and torch SDPA, alternated in rounds in one process.

    python scripts/call_overhead.py [--rounds 9] [--threads 2] [--json]

Each round times every implementation, after a pause in which the other
library's spinning threads fall asleep, over a fixed number of calls into the
same ``out=`` / ``lse=`` buffers (torch SDPA allocates its output, as it
always does); the table gives each one's median over the rounds and the
ratio of the medians. Shapes are (B, H, Nq, Nk, d), float32, as a decode step
or a short sentence. The machine is named by ``lscpu``'s model name.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import numpy as np

SHAPES = [(1, 1, 1, 1, 64), (1, 8, 1, 1, 64), (1, 8, 16, 16, 64), (1, 32, 1, 4096, 128)]


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def _per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settle", type=float, default=0.2, help="seconds before each sample")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    # torch first: imported after Numba's OpenMP threads started, torch's CPU SDPA
    # shares that libgomp and took 15-17 ms per call at (1, 8, 16, 16, 64)
    # instead of 25-45 us (AMD EPYC, torch 2.13, numba 0.68.1).
    try:
        import torch

        torch.set_num_threads(args.threads)
        sdpa = torch.nn.functional.scaled_dot_product_attention
    except ImportError:
        torch = None
    import numba

    import numbattn
    from numbattn import _plans

    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for b, h, nq, nk, d in SHAPES:
        q = rng.standard_normal((b, h, nq, d)).astype(np.float32)
        k = rng.standard_normal((b, h, nk, d)).astype(np.float32)
        v = rng.standard_normal((b, h, nk, d)).astype(np.float32)
        out, lse = np.empty_like(q), np.empty((b, h, nq), np.float32)
        calls = max(20, int(2e5 // max(1, h * nk * d // 64)))
        saved = _plans.signature

        def full_path(q=q, k=k, v=v, out=out, lse=lse, saved=saved):
            _plans.signature = lambda *a: None
            try:
                numbattn.attention(q, k, v, out=out, lse=lse)
            finally:
                _plans.signature = saved

        impls = {
            "numbattn": lambda q=q, k=k, v=v, out=out, lse=lse: numbattn.attention(
                q, k, v, out=out, lse=lse
            ),
            "full path": full_path,
        }
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            impls["torch SDPA"] = lambda tq=tq, tk=tk, tv=tv: sdpa(tq, tk, tv)
        samples: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                fn()
                time.sleep(args.settle)  # the other library's thread pool falls asleep
                n = calls if name != "full path" else max(10, calls // 5)
                samples[name].append(_per_call_us(fn, n))
        med = {name: statistics.median(s) for name, s in samples.items()}
        rows.append({"shape": (b, h, nq, nk, d), "median_us": med})
    machine = _machine()
    if args.json:
        print(json.dumps({"machine": machine, "threads": args.threads, "rows": rows}))
        return
    print(f"{machine}, {args.threads} threads, median of {args.rounds} rounds, µs per call")
    names = list(rows[0]["median_us"])
    print(f"{'(B, H, Nq, Nk, d)':<24}" + "".join(f"{n:>12}" for n in names) + "   plan/torch")
    for row in rows:
        med = row["median_us"]
        ratio = med["numbattn"] / med["torch SDPA"] if "torch SDPA" in med else float("nan")
        cells = "".join(f"{med[n]:>12.1f}" for n in names)
        print(f"{row['shape']!s:<24}{cells}   {ratio:>9.2f}")


if __name__ == "__main__":
    main()
