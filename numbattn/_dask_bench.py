"""``python -m numbattn bench --dask``: numbattn.dask on a LocalCluster vs the in-memory call.

Private: the command line is the interface. Starts a
``distributed.LocalCluster`` of single-threaded process workers (their
Numba thread count is numbattn.dask's default, one per worker thread), puts
q, k and v in worker memory (persisted, chunked as asked), then alternates
timed runs of

- dask: ``numbattn.dask.attention`` persisted on the workers (the result
  stays there, as in a pipeline; building the graph is included), and
- in-memory: ``numbattn.attention`` on the same arrays in this process,
  with ``--threads`` Numba threads (default: the number of workers),

and reports medians and their ratio (and the median of each round's
ratio, the robust figure on a busy machine), the causal/non-causal ratio of the
dask runs, each worker's peak resident memory during the dask runs
(sampled every 5 ms) above what it held before, and the relative error of
the dask result against the in-memory one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: The issue's case: (B, H, N, d) float32, 4 batch chunks x 1 query chunk x 4 key chunks.
DEFAULT_SHAPE = (8, 16, 4096, 64)
QUICK_SHAPE = (2, 4, 512, 32)
DEFAULT_CHUNKS = (4, 1, 4)


def _sampler_start(dask_worker: Any = None) -> int:
    """In a worker: sample this process's RSS every 5 ms in a thread; returns the current RSS."""
    import threading

    import psutil  # a dependency of distributed

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "stop": threading.Event()}

    def loop() -> None:
        while not state["stop"].wait(0.005):
            state["peak"] = max(state["peak"], proc.memory_info().rss)

    thread = threading.Thread(target=loop, daemon=True)
    state["thread"] = thread
    _sampler_start.state = state  # type: ignore[attr-defined]
    thread.start()
    return int(state["peak"])


def _sampler_stop(dask_worker: Any = None) -> int:
    state = _sampler_start.state  # type: ignore[attr-defined]
    state["stop"].set()
    state["thread"].join()
    return int(state["peak"])


def _split(n: int, parts: int) -> tuple[int, ...]:
    parts = max(1, min(parts, n)) if n else 1
    return tuple(len(c) for c in np.array_split(np.arange(n), parts)) if n else (0,)


def run(
    shape: tuple[int, int, int, int] = DEFAULT_SHAPE,
    dtype: str = "float32",
    causals: tuple[bool, ...] = (False, True),
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS,
    workers: int = 2,
    threads: int | None = None,
    repeat: int = 3,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    import dask.array as da
    import numba
    from distributed import Client, LocalCluster, wait

    import numbattn
    import numbattn.dask as nd
    from numbattn.reference import relative_error

    b, h, n, d = shape
    threads = threads or workers
    bc, qc, kc = chunks
    q_chunks = (_split(b, bc), h, _split(n, qc), d)
    k_chunks = (_split(b, bc), h, _split(n, kc), d)
    itemsize = np.dtype(dtype).itemsize
    per_task = {
        "q chunk": max(q_chunks[0]) * h * max(q_chunks[2]) * d * itemsize,
        "k+v chunk": 2 * max(k_chunks[0]) * h * max(k_chunks[2]) * d * itemsize,
        "partial (out+lse)": max(q_chunks[0]) * h * max(q_chunks[2]) * (d + 1) * itemsize,
        "pair scores (never formed)": max(q_chunks[0]) * h * max(q_chunks[2]) * max(k_chunks[2]) * itemsize,
    }  # fmt: skip
    numba.set_num_threads(threads)
    say(
        f"bench --dask: {'x'.join(map(str, shape))} {dtype}, chunks batch x query x key = "
        f"{bc} x {qc} x {kc}; LocalCluster of {workers} single-threaded process workers "
        f"vs in-memory on {threads} Numba threads"
    )
    results = []
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        # Generated on the workers (a big NumPy array in the graph would be shipped with
        # it); this process gets a copy for the in-memory call.
        rng = da.random.default_rng(0)
        dq, dk, dv = (
            client.persist(rng.standard_normal(shape, dtype=dtype, chunks=c))
            for c in (q_chunks, k_chunks, k_chunks)
        )
        wait([dq, dk, dv])
        q, k, v = client.compute([dq, dk, dv], sync=True)
        for causal in causals:
            label = "causal" if causal else "non-causal"

            def on_cluster(causal: bool = causal) -> Any:
                out = client.persist(nd.attention(dq, dk, dv, causal=causal))
                wait(out)
                return out

            say(f"  {label}: warm-up (compiles or loads the kernels in each worker) ...")
            check = on_cluster().compute()
            expected = numbattn.attention(q, k, v, causal=causal)
            error = relative_error(check, expected)
            del check
            t_dask: list[float] = []
            t_mem: list[float] = []
            peaks: dict[str, int] = {}
            for r in range(repeat):
                before = client.run(_sampler_start)
                t0 = time.perf_counter()
                out = on_cluster()
                t_dask.append(time.perf_counter() - t0)
                after = client.run(_sampler_stop)
                del out
                for w in after:
                    peaks[w] = max(peaks.get(w, 0), after[w] - before[w])
                t0 = time.perf_counter()
                numbattn.attention(q, k, v, causal=causal)
                t_mem.append(time.perf_counter() - t0)
                say(
                    f"  {label} run {r + 1}/{repeat}: dask {t_dask[-1]:.3f} s, in-memory {t_mem[-1]:.3f} s"
                )
            record: dict[str, Any] = {
                "causal": causal,
                "dask_s": statistics.median(t_dask),
                "in_memory_s": statistics.median(t_mem),
                "dask_runs_s": t_dask,
                "in_memory_runs_s": t_mem,
                "worker_peak_above_held_MiB": sorted(p / 2**20 for p in peaks.values()),
                "rel_error_vs_in_memory": error,
            }
            record["dask_over_in_memory"] = record["dask_s"] / record["in_memory_s"]
            # Each round's pair ran back to back: their ratio is the robust one on a busy host.
            record["round_ratios"] = [a / b for a, b in zip(t_dask, t_mem)]
            record["median_round_ratio"] = statistics.median(record["round_ratios"])
            results.append(record)
    doc: dict[str, Any] = {
        "shape": shape,
        "dtype": dtype,
        "chunks_batch_query_key": chunks,
        "workers": workers,
        "in_memory_threads": threads,
        "per_task_MiB": {key: val / 2**20 for key, val in per_task.items()},
        "results": results,
    }
    by_causal = {r["causal"]: r for r in results}
    if True in by_causal and False in by_causal:
        doc["causal_over_non_causal_dask"] = by_causal[True]["dask_s"] / by_causal[False]["dask_s"]
    return doc


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"{'case':<12} {'dask s':>8} {'in-memory s':>12} {'dask/in-mem':>12} {'per round':>10} "
        f"{'worker peak MiB (above held)':>30} {'rel err':>9}"
    ]
    for r in doc["results"]:
        peaks = ", ".join(f"{p:.0f}" for p in r["worker_peak_above_held_MiB"])
        lines.append(
            f"{'causal' if r['causal'] else 'non-causal':<12} {r['dask_s']:>8.3f} "
            f"{r['in_memory_s']:>12.3f} {r['dask_over_in_memory']:>12.2f} "
            f"{r['median_round_ratio']:>10.2f} {peaks:>30} "
            f"{r['rel_error_vs_in_memory']:>9.1e}"
        )
    if "causal_over_non_causal_dask" in doc:
        lines.append(f"causal / non-causal (dask): {doc['causal_over_non_causal_dask']:.2f}")
    sizes = ", ".join(f"{k} {v:.1f}" for k, v in doc["per_task_MiB"].items())
    lines.append(f"per-task sizes (MiB): {sizes}")
    return "\n".join(lines)
