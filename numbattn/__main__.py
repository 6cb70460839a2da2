"""Command line: ``python -m numbattn {info,bench,plot,gpu-report,cpu-report}`` (also the ``numbattn`` script).

``info``
    Versions (numbattn, numba, llvmlite, numpy, numba-cuda, torch), the Numba
    threading layer and thread count, and whether CUDA is usable (and which
    device).
``bench``
    (``--kernel decode``: few queries over long KV caches, contiguous and
    paged, with the machine's streaming read bandwidth measured in the same
    run and K+V GB/s as a fraction of it, torch SDPA side by side.)
    Checks every kernel against :mod:`numbattn.reference` on a problem set
    (outputs poisoned with NaN first; relative error ||out-ref||/||ref|| within
    1e-5 for float32, 1e-12 for float64), then times it and the baselines
    (batched NumPy; torch, SDPA for attention, when installed) and prints a
    table, or JSON with ``--json``. Progress goes to stderr. On the CPU each
    kernel's fraction of the machine's ceiling ("of peak") is measured in the
    same rounds as the kernel: each of ``--rounds`` rounds (default 3) takes
    the kernel's samples, then one sample of the ceiling for its dtype
    (NumPy matmul 4096^3 in a persistent worker process for the GEMM rate;
    softmax: ``y = x * 1`` over 128 MiB in this process, 3x as many rounds),
    and "of peak" is the median over rounds of the two rates' ratio; the row
    also gives the ceiling's median ("ceiling"). Each implementation is timed
    after a short wait (``--settle``) so no other thread pool spins beside it.
    scores and softmax (N x N outputs) are timed twice: into a preallocated
    ``out=`` (the "median" the rate and "of peak" use: the ceilings, too,
    write into existing arrays) and with a new output each call ("new out",
    JSON ``new_out_s``: what the NumPy / torch ratios use, since the
    baselines allocate too; a new output adds page faults and the zeroing of
    fresh pages). attention and backward are timed with a new output only.

    ``--plot FILE.png`` also draws the run (``numbattn._plot``; needs
    matplotlib, the ``plot`` extra).
``plot``
    ``plot RESULTS.json --out FILE.png`` draws a saved ``bench --json`` run:
    median time per call of numbattn, NumPy and torch against N, one panel
    per dtype, the machine in the title.

``gpu-report``
    Compiles every CUDA kernel at its production geometry for a compute
    capability (``--cc``, default 9.0; no GPU needed) and prints registers,
    spills, shared memory, occupancy and the instruction mix of the hottest
    loop, as a table or, with ``--json``, a list with one object per kernel
    variant (fields: :mod:`numbattn.cuda.report`). With a GPU, the current
    device is covered too. Needs NVIDIA's tools (``pip install
    "numbattn[test]"``); ``--save DIR`` keeps the PTX, cubins and SASS.

``cpu-report``
    Compiles the CPU hot loops (forward micro-kernel, exp row passes, K
    packing, decode streaming loops) for named CPUs (``--cpu``, LLVM names;
    default sapphirerapids, znver4, znver5, haswell and this host; no such
    CPU needed) and runs ``llvm-mca`` on each: cycles and uops per
    iteration, bottleneck, vector width, FMAs, spills, FLOPs per cycle
    against the CPU's FMA peak (fields: :mod:`numbattn.cpu.report`).

Exit status: 0 success; 1 a check failed; 2 bad usage, ``--device cuda``
where CUDA is not usable, or ``gpu-report`` / ``cpu-report`` where it
cannot compile or simulate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _threading() -> dict:
    """Numba's threading layer as numbattn's kernels get it (runs a tiny one)."""
    import numba
    import numpy as np

    import numbattn

    info = {
        "threads": numba.get_num_threads(),
        "max_threads": numba.config.NUMBA_NUM_THREADS,
        "requested_layer": numba.config.THREADING_LAYER,
        "layer": None,
        "cpu_count": os.cpu_count(),
    }
    try:
        numbattn.softmax(np.zeros((1, 1, 4)))
        info["layer"] = numba.threading_layer()
    except Exception as exc:  # report, don't crash `info`
        info["layer"] = f"unknown ({type(exc).__name__}: {exc})"
    return info


def _cuda_info() -> dict:
    from ._bench import cuda_problem

    problem = cuda_problem()
    info: dict = {"usable": problem is None, "reason": problem, "device": None}
    if problem is None:
        try:
            from numba import cuda

            dev = cuda.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
            info["device"] = {
                "id": dev.id,
                "name": name,
                "compute_capability": list(dev.compute_capability),
            }
        except Exception as exc:
            info["device"] = f"unknown ({type(exc).__name__}: {exc})"
    return info


def _cpu_model() -> dict:
    """The CPU's model name, family and model (Linux /proc/cpuinfo; else platform)."""
    fields: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model") and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine() or None,
        "cpu_family": fields.get("cpu family"),
        "cpu_model": fields.get("model"),
    }


def collect_machine(device: str) -> dict:
    """What the bench records about the machine: CPU model, CPU count, OS, GPU name."""
    machine = {**_cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    machine["gpu"] = None
    if device == "cuda":
        dev = _cuda_info()["device"]
        machine["gpu"] = dev.get("name") if isinstance(dev, dict) else None
    return machine


def collect_info() -> dict:
    import numbattn

    from . import _pools
    from ._bench import _torch

    # torch (where installed) before Numba starts its threads, as a program
    # using both should import it (see numbattn._pools), so that its OpenMP
    # pool is listed too.
    _torch()
    threading = _threading()
    pools = _pools.thread_pools()
    warnings = _pools.conflicts(pools, threading["layer"])
    return {
        "numbattn": numbattn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numba": _version("numba"),
        "llvmlite": _version("llvmlite"),
        "numpy": _version("numpy"),
        "numba-cuda": _version("numba-cuda"),
        "torch": _version("torch"),
        "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR") or None,
        "threading": threading,
        "thread_pools": pools,
        "warnings": warnings,
        "cuda": _cuda_info(),
    }


def cmd_info(args) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    na = "not installed"
    th, cu = info["threading"], info["cuda"]
    lines = [
        f"numbattn    {info['numbattn']}",
        f"python      {info['python']} ({info['platform']})",
        f"numba       {info['numba'] or na}",
        f"llvmlite    {info['llvmlite'] or na}",
        f"numpy       {info['numpy'] or na}",
        f"numba-cuda  {info['numba-cuda'] or na}",
        f"torch       {info['torch'] or na}",
        f"threading   layer {th['layer']} (NUMBA_THREADING_LAYER={th['requested_layer']}), "
        f"{th['threads']} threads of {th['max_threads']} (os.cpu_count() = {th['cpu_count']})",
    ]
    if cu["usable"]:
        dev = cu["device"]
        if isinstance(dev, dict):
            cc = ".".join(map(str, dev["compute_capability"]))
            dev = f"device {dev['id']}: {dev['name']} (compute capability {cc})"
        lines.append(f"cuda        usable: {dev}")
    else:
        lines.append(f"cuda        not usable: {cu['reason']}")
    pools = info["thread_pools"]
    if pools is None:
        lines.append("pools       (install threadpoolctl to list the BLAS / OpenMP thread pools)")
    for n, p in enumerate(pools or []):
        what = " ".join(str(p[k]) for k in ("internal_api", "version", "architecture") if p.get(k))
        lines.append(
            f"{'pools' if n == 0 else '':12s}{p.get('user_api')}: {what}, "
            f"{p.get('num_threads')} threads ({os.path.basename(p.get('filepath') or '?')})"
        )
    for w in info["warnings"]:
        lines.append(f"warning     {w}")
    print("\n".join(lines))
    return 0


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(x) for x in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected B,H,N,d (four positive integers), got {text!r}")
    return parts[0], parts[1], parts[2], parts[3]


def _shape3(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected B,Q,K (three positive integers), got {text!r}")
    return parts[0], parts[1], parts[2]


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return items

    return parse


def cmd_bench_dask(args) -> int:
    """``bench --dask``: numbattn.dask on a LocalCluster vs the in-memory call."""
    from . import _dask_bench as D

    shape = args.shape[0] if args.shape else (D.QUICK_SHAPE if args.quick else D.DEFAULT_SHAPE)
    causal = {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal or "both"]
    say = (lambda msg: None) if args.no_progress else (lambda msg: print(msg, file=sys.stderr))
    doc = D.run(
        shape=shape,
        dtype=(args.dtype or ["float32"])[0],
        causals=causal,
        chunks=args.dask_chunks,
        workers=args.dask_workers,
        threads=args.threads or None,
        repeat=args.min_repeat,
        say=say,
    )
    if args.json:
        print(json.dumps(_finite(doc), indent=2, allow_nan=False, default=_json_default))
    else:
        print(D.table(doc))
    from ._bench import RTOL

    bad = [r for r in doc["results"] if not r["rel_error_vs_in_memory"] <= RTOL[doc["dtype"]]]
    return 1 if bad else 0


def cmd_bench(args) -> int:
    if args.plot:
        if args.dask or (args.kernel and "decode" in args.kernel):
            print("numbattn bench: --plot draws attention, scores, softmax and backward "
                  "runs, not --dask or --kernel decode", file=sys.stderr)  # fmt: skip
            return 2
        from . import _plot

        try:
            _plot.figure_class()  # before the run: a missing matplotlib fails fast
        except _plot.PlotError as exc:
            print(f"numbattn bench: {exc}", file=sys.stderr)
            return 2
    if args.dask:
        return cmd_bench_dask(args)
    import numba

    from . import _bench as B

    progress_on = not args.no_progress
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def say(msg: str) -> None:
        if progress_on:
            print(msg, file=sys.stderr, flush=True)

    # torch must be imported before Numba starts its OpenMP thread pool (which
    # get_num_threads does): imported after, torch's own OpenMP threads ran
    # ~20x slower here (two OpenMP runtimes in one process).
    torch = None if (args.no_baselines or args.no_torch) else B._torch()
    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()

    if args.device == "cuda":
        problem = B.cuda_problem()
        if problem is not None:
            print(f"numbattn bench: CUDA is not usable here: {problem}", file=sys.stderr)
            return 2
        backend: B.CpuBackend = B.CudaBackend()
    else:
        backend = B.CpuBackend()

    if args.kernel and "decode" in args.kernel:
        return _bench_decode(args, B, torch, threads, say)
    if args.shape or args.kernel or args.dtype or args.causal:
        shapes = args.shape or (
            [(2, 2, 160, 32)] if args.quick else [(1, 8, 2048, 64), (4, 8, 512, 64)]
        )
        causal = {"no": [False], "yes": [True], "both": [False, True]}[args.causal or "both"]
        problems = B.build_problems(
            args.kernel or B.KERNELS, shapes, args.dtype or ["float32"], causal
        )
    else:
        problems = B.quick_problems() if args.quick else B.default_problems()

    torch_runner = None
    torch_note = "not installed"
    if args.no_baselines or args.no_torch:
        torch_note = "skipped"
    elif torch is not None:
        if args.device == "cuda" and not torch.cuda.is_available():
            torch_note = f"torch {torch.__version__} has no CUDA here"
        else:
            torch_runner = B.TorchRunner(torch, args.device, threads)
            torch_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads"

    opts = B.Options(
        min_time=args.min_time if args.min_time is not None else (0.02 if args.quick else 0.5),
        min_repeat=args.min_repeat,
        max_repeat=args.max_repeat,
        baselines=not args.no_baselines,
        threads=threads,
        settle=args.settle if args.settle is not None else (0.02 if args.quick else 0.3),
        rounds=args.rounds,
    )
    say(
        f"numbattn bench: {len(problems)} problems on {backend.name}, numba "
        f"{numba.__version__} with {threads} threads; baselines: "
        f"{'NumPy, ' + torch_note if opts.baselines else 'skipped'}"
    )
    # The ceilings are sampled in the rounds of each row (see numbattn._bench):
    # the GEMM in a worker process started (and pre-warmed) here.
    peaks: dict = {}
    ceilings = None
    if not args.no_peak and backend.name == "cpu":  # a host ceiling rates host kernels only
        size = args.peak_size or (512 if args.quick else 4096)
        gemm_dtypes = [p.dtype for p in problems if p.work()[1] == "GFLOP/s"]
        if gemm_dtypes:
            say(f"ceilings: starting the GEMM worker (NumPy matmul {size}^3) ...")
        try:
            ceilings = B.Ceilings(threads, gemm_dtypes, size)
        except (RuntimeError, OSError, ValueError) as exc:
            say(f"ceilings: not measured ({exc})")
        opts.ceilings = ceilings
    records = []
    try:
        for i, p in enumerate(problems, 1):
            prefix = f"[{i}/{len(problems)}] {p.label}:"
            say(f"{prefix} compiling/checking ...")
            opts.progress = (lambda pre: lambda msg: say(f"{pre} {msg}"))(prefix)
            records.append(B.run_problem(p, backend, torch_runner, opts))
    finally:
        if ceilings is not None:
            peaks = ceilings.summary()
            ceilings.close()
    if peaks:
        say(B.peaks_text(peaks))

    failed = [r for r in records if not r["check"]["ok"]]
    if args.json or args.plot:
        doc = {
            "numbattn": collect_versions(),
            "device": backend.name,
            "threads": threads,
            "machine": collect_machine(backend.name),
            "date": started,
            "peaks": peaks,
            "rate_units": {
                "GFLOP/s": "attention 4*B*H*N*N*d (halved if causal), scores 2*B*H*N*N*d, "
                "backward 10*B*H*N*N*d (halved if causal)",
                "GB/s": "softmax: 2*elements*itemsize bytes (read + write)",
            },
            "ratios": "vs_numpy / vs_torch = baseline median / numbattn new_out_s (>1: "
            "numbattn faster)",
            "timings": "median_s (rate, of_peak): scores and softmax into a preallocated out= "
            "(out_given true), others a new output each call; new_out_s: a new output each "
            "call (the baselines allocate theirs too)",
            "of_peak": "median over the row's rounds of (numbattn's rate in the round, from "
            "the median of its median_s samples there) / (the ceiling's rate in the same "
            "round): the GEMM (NumPy matmul n^3, worker process) for GFLOP/s rows, the "
            "stream (y = x * 1, this process) for GB/s rows; of_peak_rounds: each round's "
            "fraction; ceiling_rate: the median of the ceiling's rates over the rounds "
            "(ceiling: what, unit, rates, rounds); peaks: each ceiling's medians over all "
            "of the run's samples",
            "all_ok": not failed,
            "results": records,
        }
        text = json.dumps(_finite(doc), indent=2, allow_nan=False, default=_json_default)
    if args.json:
        print(text)
    else:
        print(B.table(records))
        print(
            "\nmedian of repeated calls, * into a preallocated out= (scores, softmax: like the "
            "ceilings, into existing memory), else a new output each call; new out: median "
            "with a new output each call;\nrate (from median): GFLOP/s (attention "
            "4*B*H*N^2*d, halved if causal; scores 2*B*H*N^2*d; backward 10*B*H*N^2*d, halved "
            "if causal) or GB/s (softmax, 2 x bytes of x);\nvs NumPy / vs torch: baseline "
            "time / numbattn new-out time (both allocate their output; above 1: numbattn "
            "faster; backward: torch's SDPA autograd backward, without its forward); "
            f"NumPy baseline runs on the host; torch: {torch_note}."
        )
        if peaks:
            print(
                "of peak: median over rounds of numbattn's rate / the machine's ceiling "
                "for the dtype in the same round (each round: numbattn's samples, then one "
                "sample of the ceiling): the GEMM rate (NumPy matmul, in a worker process, "
                "with waits so no thread pool spins beside another) or, softmax, the "
                "streaming bandwidth; ceiling: its median over the rounds (GFLOP/s or "
                "GB/s). Over the whole run:\n" + B.peaks_text(peaks)
            )
    if args.plot:
        from . import _plot

        _plot.draw(json.loads(text), args.plot)
        say(f"numbattn bench: plot written to {args.plot}")
    if failed:
        print(f"numbattn bench: {len(failed)} check(s) FAILED", file=sys.stderr)
        return 1
    return 0


def _bench_decode(args, B, torch, threads: int, say) -> int:
    """``bench --kernel decode``: the issue-11 decode cases on the CPU, with
    the streaming read bandwidth measured in the same run and torch SDPA."""
    if args.device != "cpu":
        print("numbattn bench: --kernel decode runs on the CPU only", file=sys.stderr)
        return 2
    opts = B.Options(
        min_time=args.min_time if args.min_time is not None else (0.02 if args.quick else 0.5),
        min_repeat=args.min_repeat,
        max_repeat=args.max_repeat,
        baselines=not args.no_baselines,
        threads=threads,
    )
    torch_use = None if (args.no_baselines or args.no_torch) else torch
    if torch_use is not None:
        torch_use.set_num_threads(threads)
    reader = B.StreamRead(threads)
    bandwidth = B.stream_read_gbs(threads, opts=opts, reader=reader)
    say(f"numbattn bench decode: streaming read {bandwidth:.1f} GB/s on {threads} threads")
    records = []
    cases = B.decode_cases(args.quick)
    for i, c in enumerate(cases, 1):
        prefix = f"[{i}/{len(cases)}] decode {c.label}:"
        say(f"{prefix} compiling/checking ...")
        opts.progress = (lambda pre: lambda msg: say(f"{pre} {msg}"))(prefix)
        records.append(B.run_decode(c, torch_use, bandwidth, opts, reader))
    failed = [r for r in records if not r["check"]["ok"]]
    if args.json:
        doc = {
            "numbattn": collect_versions(),
            "device": "cpu",
            "threads": threads,
            "stream_read_gbs": bandwidth,
            "ratios": "vs_torch = torch median / numbattn median (>1: numbattn faster)",
            "all_ok": not failed,
            "decode": records,
        }
        print(json.dumps(_finite(doc), indent=2, allow_nan=False, default=_json_default))
    else:
        print(B.decode_table(records, bandwidth, threads))
        print(
            "\nfloat32, median of repeated calls; K+V GB/s: bytes of K and V / time; of "
            f"stream: median over {B.DECODE_ROUNDS} rounds of that rate over the streaming "
            "read's rate in the same round (each round: numbattn's samples, then one pass "
            "of the read); torch: SDPA on the contiguous cache (causal: a bottom-right "
            "boolean mask)."
        )
    if failed:
        print(f"numbattn bench: {len(failed)} check(s) FAILED", file=sys.stderr)
        return 1
    return 0


def cmd_plot(args) -> int:
    from . import _plot

    try:
        _plot.draw(args.results, args.out)
    except _plot.PlotError as exc:
        print(f"numbattn plot: {exc}", file=sys.stderr)
        return 2
    return 0


def _finite(o):
    """JSON has no inf/NaN: non-finite floats (a failed check's error) become null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


def collect_versions() -> dict:
    import numbattn

    return {
        "version": numbattn.__version__,
        "numba": _version("numba"),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
    }


def _print_report(name: str, module, make, as_json: bool) -> int:
    """Run a report (``make()``), print it as a table or JSON; 2 on its ReportError."""
    try:
        records = make()
    except module.ReportError as exc:
        print(f"numbattn {name}: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(records, indent=2, default=_json_default))
    else:
        print(module.table(records))
    return 0


def cmd_gpu_report(args) -> int:
    from .cuda import report as R

    make = lambda: R.report(args.cc, save_dir=args.save, device=not args.no_device)  # noqa: E731
    return _print_report("gpu-report", R, make, args.json)


def cmd_cpu_report(args) -> int:
    from .cpu import report as R

    return _print_report("cpu-report", R, lambda: R.report(args.cpu or R.DEFAULT_CPUS), args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m numbattn", description="numbattn: information and benchmarks"
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{info,bench,plot,gpu-report,cpu-report}"
    )

    p_info = sub.add_parser("info", help="versions, threading layer, CUDA device")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_info.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "bench",
        help="check every kernel against the reference, then time it",
        description=(
            "Check each kernel against numbattn.reference, then time it against the "
            "NumPy and torch baselines. Without --shape/--kernel/--dtype/--causal it runs "
            "the default problem set (attention 1x8x2048x64 and 4x8x512x64 float32, causal "
            "and not; scores and softmax 4x8x512x64), or --quick's tiny one."
        ),
    )
    p.add_argument("--quick", action="store_true", help="tiny CI-sized problems (both dtypes)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--shape",
        type=_shape,
        action="append",
        metavar="B,H,N,d",
        help="problem size (repeatable); softmax runs on B x H x N x N",
    )
    p.add_argument("--kernel", type=_csv(("attention", "scores", "softmax", "backward", "decode")),
                   metavar="LIST",
                   help="comma-separated kernels (default all but decode); decode: the "
                        "few-queries / long-KV-cache cases with the streaming read "
                        "bandwidth (CPU)")  # fmt: skip
    p.add_argument("--dtype", type=_csv(("float32", "float64")), metavar="LIST",
                   help="float32, float64 or both comma-separated (default float32)")  # fmt: skip
    p.add_argument("--causal", choices=("no", "yes", "both"), help="default both")
    p.add_argument("--threads", type=int, default=0, help="Numba (and torch) threads")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of samples per timing (default 0.5; 0.02 with --quick)")  # fmt: skip
    p.add_argument("--min-repeat", type=int, default=3)
    p.add_argument("--max-repeat", type=int, default=50)
    p.add_argument("--no-baselines", action="store_true", help="time numbattn only")
    p.add_argument("--no-peak", action="store_true",
                   help="skip measuring the machine's GEMM rate and bandwidth")  # fmt: skip
    p.add_argument("--peak-size", type=int, default=0, metavar="N",
                   help="matmul size for the GEMM rate (default 4096; 512 with --quick)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, metavar="R",
                   help="rounds per row, each closed by one sample of the ceiling (one "
                   "matmul; softmax: 3R rounds of the stream); default 3")  # fmt: skip
    p.add_argument("--settle", type=float, default=None, metavar="SECONDS",
                   help="wait before timing each implementation, so the previous one's "
                   "threads stop spinning (default 0.3; 0.02 with --quick)")  # fmt: skip
    p.add_argument("--no-torch", action="store_true", help="skip the torch baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw the run (numbattn, NumPy and torch against N, one panel "
                   "per dtype) into FILE.png; needs matplotlib (the plot extra)")  # fmt: skip
    p.add_argument("--dask", action="store_true",
                   help="numbattn.dask on a LocalCluster vs the in-memory call (attention; "
                   "default shape 8,16,4096,64, --quick 2,4,512,32; repeats: --min-repeat)")  # fmt: skip
    p.add_argument("--dask-chunks", type=_shape3, default=(4, 1, 4), metavar="B,Q,K",
                   help="--dask: chunks over batch, queries and keys (default 4,1,4)")  # fmt: skip
    p.add_argument("--dask-workers", type=int, default=2,
                   help="--dask: single-threaded process workers (default 2)")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "plot",
        help="draw a saved `bench --json` run (needs matplotlib: the plot extra)",
        description=(
            "Draw the JSON that `python -m numbattn bench --json` printed: median time per "
            "call of numbattn, NumPy and torch against N, one panel per dtype, the machine "
            "in the title; the same picture as `bench --plot`."
        ),
    )
    p.add_argument("results", metavar="RESULTS.json", help="output of `bench --json`")
    p.add_argument("--out", "-o", metavar="FILE.png", required=True,
                   help="the picture to write (PNG, or SVG / PDF by suffix)")  # fmt: skip
    p.set_defaults(func=cmd_plot)

    from .cuda.limits import SM_LIMITS

    p = sub.add_parser(
        "gpu-report",
        help="static facts of the compiled CUDA kernels (no GPU needed)",
        description=(
            "Compile every CUDA kernel at the geometry of numbattn.config for a compute "
            "capability (numba-cuda -> PTX -> ptxas -> SASS, no GPU needed) and report "
            "registers, spills, shared memory, occupancy and the instruction mix of the "
            "hottest loop. With a usable GPU, the current device is covered too."
        ),
    )
    p.add_argument("--cc", choices=tuple(SM_LIMITS), default="9.0",
                   help="target compute capability (default 9.0)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON list on stdout instead of the table")
    p.add_argument("--save", metavar="DIR", help="keep each variant's PTX, cubin and SASS in DIR")
    p.add_argument("--no-device", action="store_true", help="skip the current GPU, if any")
    p.set_defaults(func=cmd_gpu_report)

    p = sub.add_parser(
        "cpu-report",
        help="llvm-mca figures of the CPU hot loops for named CPUs (no such CPU needed)",
        description=(
            "Compile the CPU hot loops for each named CPU (a fresh process with "
            "NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) and run llvm-mca on each loop: cycles, "
            "uops, bottleneck, vector width, FMAs, spills, FLOPs per cycle vs the FMA peak."
        ),
    )
    p.add_argument("--cpu", action="append", metavar="NAME",
                   help="LLVM CPU name or 'host' (repeatable; default sapphirerapids, znver4, "
                   "znver5, haswell, host)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON list on stdout instead of the table")
    p.set_defaults(func=cmd_cpu_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(getattr(args, k, 1) for k in ("min_repeat", "max_repeat", "rounds")) < 1:
        print(
            "numbattn bench: --min-repeat, --max-repeat and --rounds must be >= 1",
            file=sys.stderr,
        )
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
