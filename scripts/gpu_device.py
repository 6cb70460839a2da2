"""The GPU checks that need a real device, in one process (see scripts/gpu_device_run.sh).

    python scripts/gpu_device.py timings [--out DIR]   # scripts/gpu_check.py at (4, 16, 4096, 64) and more
    python scripts/gpu_device.py varlen                # packed varlen batch vs torch SDPA padded
    python scripts/gpu_device.py scores                # numbattn.scores: check, time vs torch matmul
    python scripts/gpu_device.py decode                # few queries over a long KV cache
    python scripts/gpu_device.py sanitize              # small multi-tile case with tails, every kernel
    python scripts/gpu_device.py profile               # one fp32 attention launch (for ncu)
    python scripts/gpu_device.py hostprof              # where the host time of a small call goes
    python scripts/gpu_device.py dask                  # numbattn.dask on CuPy-backed chunks
    python scripts/gpu_device.py backward              # attention_backward: checks, timings vs torch
    python scripts/gpu_device.py sanitize_backward     # the backward kernels, for compute-sanitizer
    python scripts/gpu_device.py torch                 # numbattn.torch on CUDA tensors vs SDPA autograd

``--tiny`` shrinks every shape so that the script runs under the CUDA
simulator (NUMBA_ENABLE_CUDASIM=1). Correctness is judged by
||out - ref|| / ||ref|| against a float64 reference; a failure makes the
exit status 1.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RTOL = {"float32": 1e-5, "float64": 1e-12}
FAILURES: list[str] = []


def log(*parts) -> None:
    print(" ".join(str(p) for p in parts), flush=True)


@functools.cache
def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _torch():
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def _sim() -> bool:
    from numbattn.cuda import backend

    return backend.simulator()


def _time_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median CUDA-event time (wall clock on the simulator): gpu_check's timer."""
    return _gpu_check().Timer(_sim()).median_ms(fn, reps, warmup)


def _check(label: str, err: float, dtype) -> None:
    tol = RTOL[np.dtype(dtype).name]
    ok = err <= tol
    log(f"check {label}: rel err {err:.2e} (tol {tol:.0e}) {'OK' if ok else 'FAIL'}")
    if not ok:
        FAILURES.append(label)


# ------------------------------------------------------------------ timings


def cmd_timings(args) -> None:
    """gpu_check.py at each shape of issue 10, in one process (kernels compile once)."""
    gc = _gpu_check()
    shapes = [
        ["--batch", "4", "--heads", "16", "--n", "4096", "--d", "64"],
        ["--batch", "16", "--heads", "16", "--n", "512", "--d", "64"],
        ["--batch", "1", "--heads", "16", "--n", "16384", "--d", "128", "--reps", "5"],
    ]
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    if args.tiny:
        shapes = [["--tiny"]]
    merged = []
    for i, shape in enumerate(shapes):
        out = Path(args.out or "/tmp/gpu_check") / f"shape{i}"
        rc = gc.main(shape + ["--out", str(out)])
        merged.append(json.loads((out / "gpu_check.json").read_text()))
        if rc:
            FAILURES.append(f"gpu_check {' '.join(shape)}")
    if args.out:
        Path(args.out, "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))


# ------------------------------------------------------------------ varlen


def cmd_varlen(args) -> None:
    """A ragged packed batch: numbattn.varlen_attention against torch SDPA on the
    padded batch with a key mask, and against a float64 reference per sequence."""
    import numbattn
    from numbattn import reference

    torch = _torch()
    rng = np.random.default_rng(1)
    b, h, n, d = (3, 2, 13, 5) if args.tiny else (8, 16, 4096, 64)
    lens = rng.integers(max(1, n // 8), n + 1, size=b)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    tot = int(cu[-1])
    useful = float(np.sum(lens.astype(np.float64) ** 2))
    log(f"# varlen: B={b} H={h} d={d} lengths {lens.tolist()}")
    from numba import cuda

    for dtype in (np.float32, np.float64):
        q, k, v = (rng.standard_normal((tot, h, d)).astype(dtype) for _ in range(3))
        dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
        out = cuda.device_array((tot, h, d), dtype)
        for causal in (False, True):
            numbattn.varlen_attention(dq, dk, dv, cu, cu, causal=causal, out=out)
            got = out.copy_to_host()
            num = den = 0.0
            for s in range(b):
                sl = slice(cu[s], cu[s + 1])
                if torch is not None:
                    t = [
                        torch.as_tensor(x[sl].swapaxes(0, 1), device="cuda", dtype=torch.float64)
                        for x in (q, k, v)
                    ]
                    ref = torch.nn.functional.scaled_dot_product_attention(*t, is_causal=causal)
                    ref = ref.cpu().numpy()
                else:
                    ref = reference.attention(
                        *(x[sl].swapaxes(0, 1) for x in (q, k, v)), causal=causal
                    )[0]
                g = got[sl].swapaxes(0, 1)
                num += float(np.sum((g - ref) ** 2))
                den += float(np.sum(ref**2))
            _check(
                f"varlen {np.dtype(dtype).name} causal={int(causal)}", math.sqrt(num / den), dtype
            )
            ms = _time_ms(
                lambda c=causal: numbattn.varlen_attention(dq, dk, dv, cu, cu, causal=c, out=out),
                3 if args.tiny else 10,
            )
            flops = 4.0 * h * d * useful * (0.5 if causal else 1.0)
            row = f"time varlen {np.dtype(dtype).name} causal={int(causal)}: numbattn {ms:.3f} ms "
            row += f"{flops / ms / 1e9:.2f} TFLOP/s (useful)"
            if torch is not None:
                tdt = getattr(torch, np.dtype(dtype).name)
                pad = [torch.zeros((b, h, n, d), device="cuda", dtype=tdt) for _ in range(3)]
                j = torch.arange(n, device="cuda")
                keymask = j[None, :] < torch.as_tensor(lens, device="cuda")[:, None]
                mask = keymask[:, None, None, :].expand(b, 1, n, n)
                if causal:  # bottom-right per sequence = top-left here (nq == nk)
                    mask = mask & (j[None, :] <= j[:, None])[None, None]
                mask = mask.contiguous()
                f = torch.nn.functional.scaled_dot_product_attention
                tms = _time_ms(lambda p=pad, m=mask: f(*p, attn_mask=m), 3 if args.tiny else 10)
                row += f"; torch SDPA padded+mask {tms:.3f} ms ({tms / ms:.2f}x numbattn time)"
                del pad, mask
                torch.cuda.empty_cache()
            log(row)


# ------------------------------------------------------------------ scores


def cmd_scores(args) -> None:
    """numbattn.scores (on the tensor cores from sm_80; the register-blocked
    FMA kernel with CUDA_TENSOR_CORES off): checked against the float64
    reference on a multi-tile shape with tails and options, then timed at
    (4, 16, 2048, 64), causal and not, beside the FMA kernel and against
    torch's batched matmul (q @ k^T, scaled; TF32 off) when torch has CUDA."""
    from numba import cuda

    import numbattn
    from numbattn import reference

    torch = _torch()
    rng = np.random.default_rng(5)
    if args.tiny:  # the simulator: one Python thread per CUDA thread
        cfg = numbattn.config
        cfg.CUDA_SCORES_TILE, cfg.CUDA_SCORES_PER_THREAD, cfg.CUDA_SCORES_HEAD_CHUNK = 8, 2, 4
        cfg.CUDA_TC_SCORES_WARPS, cfg.CUDA_TC_SCORES_TILE, cfg.CUDA_TC_SCORES_HEAD_CHUNK = 1, 8, 8
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        # Tails everywhere: 150 x 133 (3 x 3 tiles of 64), d = 72 (4 chunks + 8).
        b, h, nq, nk, d = (1, 2, 11, 9, 5) if args.tiny else (2, 4, 150, 133, 72)
        q = rng.standard_normal((b, h, nq, d)).astype(dtype)
        k = rng.standard_normal((b, h // 2, nk, d)).astype(dtype)
        bias = rng.standard_normal((b, h, nq, nk)).astype(dtype)
        opts = dict(causal=True, key_lengths=np.array([nk, nk // 2])[:b], scale=0.7)
        got = numbattn.scores(
            cuda.to_device(q), cuda.to_device(k), bias=cuda.to_device(bias), **opts
        )
        ref = reference.scores(q, np.repeat(k, 2, axis=1), bias=bias, **opts)
        got = got.copy_to_host()
        fin = np.isfinite(ref)
        same_inf = bool(np.array_equal(np.isneginf(got), np.isneginf(ref)))
        err = float(np.linalg.norm(got[fin] - ref[fin]) / np.linalg.norm(ref[fin]))
        _check(f"scores {name} causal lengths bias gqa", err if same_inf else math.inf, dtype)
        b, h, n, d = (1, 2, 16, 8) if args.tiny else (4, 16, 2048, 64)
        q, k = (rng.standard_normal((b, h, n, d)).astype(dtype) for _ in range(2))
        dq, dk = cuda.to_device(q), cuda.to_device(k)
        out = cuda.device_array((b, h, n, n), dtype)
        reps = 3 if args.tiny else 10
        for causal in (False, True):
            ms = _time_ms(lambda c=causal: numbattn.scores(dq, dk, causal=c, out=out), reps)
            flops = 2.0 * b * h * n * n * d
            row = f"time scores {name} {(b, h, n, d)} causal={int(causal)}: numbattn {ms:.3f} ms"
            row += f", {flops / ms / 1e9:.2f} TFLOP/s (all products)"
            saved = numbattn.config.CUDA_TENSOR_CORES
            numbattn.config.CUDA_TENSOR_CORES = False
            try:
                fma = _time_ms(lambda c=causal: numbattn.scores(dq, dk, causal=c, out=out), reps)
            finally:
                numbattn.config.CUDA_TENSOR_CORES = saved
            row += f"; FMA kernel {fma:.3f} ms ({fma / ms:.2f}x numbattn time)"
            if torch is not None and not causal:
                torch.backends.cuda.matmul.allow_tf32 = False
                tq, tk = (torch.as_tensor(x, device="cuda") for x in (q, k))
                tms = _time_ms(lambda: torch.matmul(tq, tk.transpose(-1, -2)).mul_(0.125), reps)
                row += f"; torch matmul {tms:.3f} ms ({tms / ms:.2f}x numbattn time)"
                del tq, tk
                torch.cuda.empty_cache()
            log(row)


# ------------------------------------------------------------------ decode


class _Phases:
    """Wall-clock timestamps per phase (printed as each phase starts and ends),
    and a Python traceback of every thread if one phase runs past ``stall_s``
    (faulthandler), so that a run cut short shows where its time went."""

    def __init__(self, stall_s: float):
        import faulthandler

        self.fh = faulthandler
        self.t0 = time.perf_counter()
        self.stall_s = stall_s

    def __call__(self, name: str):
        phases = self

        class _Phase:
            def __enter__(self):
                self.t = time.perf_counter()
                log(f"[{self.t - phases.t0:7.2f} s] {name} ...")
                phases.fh.dump_traceback_later(phases.stall_s, repeat=True, file=sys.stdout)

            def __exit__(self, *exc):
                phases.fh.cancel_dump_traceback_later()
                t = time.perf_counter()
                log(f"[{t - phases.t0:7.2f} s] {name}: {t - self.t:.2f} s")

        return _Phase()


@functools.cache
def _spin_kernel():
    """One thread, a dependent chain of n multiply-adds (about 4 cycles each)."""
    from numba import cuda

    @cuda.jit
    def spin(n, out):
        x = out[0]
        for _ in range(n):
            x = x * 0.999999 + 1e-6
        out[0] = x

    return spin


def _keep_busy(ms: float = 4.0) -> None:
    """Enqueue ~``ms`` of device work on the legacy default stream (torch's
    clock-based sleep when available, else a multiply-add chain)."""
    torch = _torch()
    if torch is not None and hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(int(ms * 2e6))  # cycles, at up to 2 GHz
        return
    from numba import cuda

    buf = _state.setdefault("spin_buf", cuda.device_array(1, np.float32))
    _spin_kernel()[1, 1, 0](int(ms * 5e5), buf)


_state: dict = {}


def _device_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median device time of ``fn``'s kernels alone: before each timed call the
    stream is kept busy (~4 ms of device work, :func:`_keep_busy`), so that the host's Python
    work (validation, argument packing: ~0.3 ms a call, more than a decode
    kernel takes) overlaps it and the CUDA events time the kernels back to
    back. Wall clock on the simulator."""
    from numba import cuda

    if _sim():
        return _time_ms(fn, reps, warmup)
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    times = []
    for _ in range(max(1, reps)):
        _keep_busy()
        e0, e1 = cuda.event(timing=True), cuda.event(timing=True)
        e0.record(0)
        fn()
        e1.record(0)
        e1.synchronize()
        times.append(cuda.event_elapsed_time(e0, e1))
    return float(np.median(times))


def _copy_bandwidth(torch, tiny: bool) -> float:
    """Device-to-device copy of 1 GiB (fp32), bytes read + written per second (GB/s)."""
    n = (1 << 12) if tiny else (1 << 28)
    if torch is not None:
        a = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
        b = torch.empty_like(a)
        ms = _device_ms(lambda: b.copy_(a), 10)
    else:
        from numba import cuda

        a = cuda.to_device(np.ones(n, np.float32))
        b = cuda.device_array(n, np.float32)
        ms = _device_ms(lambda: b.copy_to_device(a), 10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _randn(torch, rng, shape, dtype):
    """A random normal device array (torch when available: generated on the
    device, seconds saved at 512 MiB a tensor), and the backend's view of it."""
    from numba import cuda

    if torch is not None:
        t = torch.randn(shape, device="cuda", dtype=getattr(torch, np.dtype(dtype).name))
        return cuda.as_cuda_array(t), t
    x = cuda.to_device(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
    return x, None


def _paged_cache(torch, k, tk, block_size, perm):
    """k (1, H, N, d) as a paged cache (N / block_size, block_size, H, d)
    whose logical block j is physical block perm[j]."""
    from numba import cuda

    _, h, n, d = k.shape
    nb = n // block_size
    if tk is not None:
        src = tk[0].reshape(h, nb, block_size, d).permute(1, 2, 0, 3)
        kc = torch.empty((nb, block_size, h, d), device="cuda", dtype=tk.dtype)
        kc[torch.as_tensor(perm, device="cuda")] = src
        return cuda.as_cuda_array(kc), kc
    host = k.copy_to_host()[0].reshape(h, nb, block_size, d).transpose(1, 2, 0, 3)
    kc = np.empty((nb, block_size, h, d), host.dtype)
    kc[perm] = host
    return cuda.to_device(kc), None


def _check_slice(label, out, q, k, v, dtype, heads, kv_heads, causal, lengths=None):
    """The first ``heads`` query heads (served by the first ``kv_heads`` KV
    heads) against the float64 reference."""
    from numbattn import reference

    qh, kh, vh = (x[:1, :n].copy_to_host() for x, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
    ro = reference.attention(qh, kh, vh, causal=causal, key_lengths=lengths)[0]
    got = out[:1, :heads].copy_to_host()
    _check(label, float(reference.relative_error(got, ro)), dtype)


def cmd_decode(args) -> None:
    """Few queries over a long cache (issue 11): the streaming split-K kernel
    against torch SDPA in the same run, K+V read rate as a fraction of the
    device's copy bandwidth measured in the same run; GQA against the MHA
    case of as many KV heads, paged caches against the contiguous one, fp64;
    per-phase timestamps. Last, the fused kernel (the pre-issue-11 path) at
    the first shape, once (the call that never finished in runs 1 and 2)."""
    import numbattn
    from numbattn.cuda import backend as BE

    torch = _torch()
    from numba import cuda

    phase = _Phases(stall_s=30)
    rng = np.random.default_rng(2)
    tiny = args.tiny
    reps = 1 if tiny else 10
    if tiny:  # simulator: few threads, and splits on tiny shapes
        for knob, value in dict(
            CUDA_DECODE_LANES=4, CUDA_DECODE_TEAMS=2, CUDA_DECODE_ROWS=2, CUDA_DECODE_KEYS=2,
            CUDA_SPLIT_MERGE_THREADS=4, CUDA_MIN_SPLIT_KEYS=8, CUDA_QUERY_TILE=8,
            CUDA_KEY_TILE=8, CUDA_HEAD_CHUNK=8, CUDA_VALUE_CHUNK=8,
        ).items():  # fmt: skip
            setattr(numbattn.config, knob, value)
        BE._state["sms"] = 8
    with phase("copy bandwidth"):
        bw = _copy_bandwidth(torch, tiny)
    log(f"# device copy bandwidth (read + write, 1 GiB fp32): {bw:.0f} GB/s")
    H, N, D = (4, 32, 8) if tiny else (32, 32768, 128)
    sdpa = None if torch is None else torch.nn.functional.scaled_dot_product_attention

    def run_case(label, dtype, q, k, v, tq, tk, tv, heads_kv, call, torch_kwargs, nbytes):
        """Compile (a 1-key call of the same kernels), first call, warm calls, torch."""
        name = np.dtype(dtype).name
        b, h, nq, _ = q.shape
        out = cuda.device_array((b, h, nq, v.shape[3]), dtype)
        with phase(f"{label} {name}: first call (compiles on first use)"):
            call(out)
            cuda.synchronize()
        _check_slice(
            f"decode {label} {name}", out, q, k, v, dtype,
            min(h, 8), max(1, min(h, 8) * heads_kv // h), nq > 1,
        )  # fmt: skip
        with phase(f"{label} {name}: warm calls"):
            ms = _device_ms(lambda: call(out), reps, 1 if tiny else 2)
            t0 = time.perf_counter()
            for _ in range(reps):
                call(out)
            host_us = (time.perf_counter() - t0) / reps * 1e6
            cuda.synchronize()
        gbs = nbytes / (ms * 1e-3) / 1e9
        row = (
            f"time decode {label} {name}: numbattn {ms:.3f} ms (device), K+V at {gbs:.0f} GB/s "
            f"= {gbs / (bw / 2) * 100:.0f}% of the copy's read rate ({bw / 2:.0f} GB/s; "
            f"{gbs / bw * 100:.0f}% of read+write); host {host_us:.0f} us/call"
        )
        if sdpa is not None and tq is not None:
            with phase(f"{label} {name}: torch SDPA"):
                tms = _device_ms(lambda: sdpa(tq, tk, tv, **torch_kwargs), reps, 1 if tiny else 2)
            row += f"; torch SDPA {tms:.3f} ms (torch time / numbattn time {tms / ms:.2f})"
        log(row)
        return ms

    results = {}
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        with phase(f"data {name}: q, k, v (1, {H}, 1|{N}, {D}) on the device"):
            q, tq = _randn(torch, rng, (1, H, 1, D), dtype)
            k, tk = _randn(torch, rng, (1, H, N, D), dtype)
            v, tv = _randn(torch, rng, (1, H, N, D), dtype)
        kv_bytes = 2 * k.size * np.dtype(dtype).itemsize
        shape = f"(1, {H}, 1, {N}, {D})"
        splits = BE.default_splits(1, H, 1, 1, N)
        log(f"# {shape} {name}: default num_splits = {splits}")
        results[(name, "mha")] = run_case(
            f"{shape} MHA", dtype, q, k, v, tq, tk, tv, H,
            lambda out: numbattn.attention(q, k, v, out=out), {}, kv_bytes,
        )  # fmt: skip
        if dtype == np.float64:
            break
        run_case(
            f"{shape} MHA num_splits=1", dtype, q, k, v, None, None, None, H,
            lambda out: numbattn.attention(q, k, v, out=out, num_splits=1), {}, kv_bytes,
        )  # fmt: skip
        # Half the K/V bytes in flight per warp (2 keys a step instead of 4),
        # and the rows read element by element (LD.E, no 16-byte loads): what
        # each part of the kernel's design is worth, in the same run.
        keys = numbattn.config.CUDA_DECODE_KEYS
        numbattn.config.CUDA_DECODE_KEYS = max(1, keys // 2)
        run_case(
            f"{shape} MHA CUDA_DECODE_KEYS={max(1, keys // 2)}", dtype, q, k, v,
            None, None, None, H, lambda out: numbattn.attention(q, k, v, out=out), {}, kv_bytes,
        )  # fmt: skip
        numbattn.config.CUDA_DECODE_KEYS = keys
        vector_ok = BE.vector_ok
        BE.vector_ok = lambda arrays, vw: False
        try:
            run_case(
                f"{shape} MHA scalar loads", dtype, q, k, v, None, None, None, H,
                lambda out: numbattn.attention(q, k, v, out=out), {}, kv_bytes,
            )  # fmt: skip
        finally:
            BE.vector_ok = vector_ok
        # GQA: 32 query heads over 8 KV heads, against the 8-head MHA decode.
        hk = H // 4
        k8, v8 = k[:, :hk], v[:, :hk]
        q8 = q[:, :hk]
        tk8, tv8 = (None, None) if tk is None else (tk[:, :hk], tv[:, :hk])
        t8 = run_case(
            f"(1, {hk}, 1, {N}, {D}) MHA", dtype, q8, k8, v8,
            None if tq is None else tq[:, :hk], tk8, tv8, hk,
            lambda out: numbattn.attention(q8, k8, v8, out=out), {}, kv_bytes // 4,
        )  # fmt: skip
        tg = run_case(
            f"(1, {H}q/{hk}kv, 1, {N}, {D}) GQA", dtype, q, k8, v8, tq, tk8, tv8, hk,
            lambda out: numbattn.attention(q, k8, v8, out=out),
            {"enable_gqa": True}, kv_bytes // 4,
        )  # fmt: skip
        log(f"# GQA {H}q/{hk}kv time / {hk}-head MHA time: {tg / t8:.2f} (target <= 1.3)")
        # Paged caches, shuffled blocks, against the contiguous cache.
        lengths = np.array([N])
        for bs in (16, 256) if not tiny else (4, 16):
            with phase(f"paged block_size {bs}: build the cache (shuffled blocks)"):
                perm = rng.permutation(N // bs)
                table = cuda.to_device(perm.astype(np.int32)[None, :])
                kc, _ = _paged_cache(torch, k, tk, bs, perm)
                vc, _ = _paged_cache(torch, v, tv, bs, perm)
            tp = run_case(
                f"{shape} paged block_size={bs}", dtype, q, k, v, None, None, None, H,
                lambda out: numbattn.paged_attention(q, kc, vc, table, lengths, out=out),
                {}, kv_bytes,
            )  # fmt: skip
            ratio = tp / results[(name, "mha")]
            log(f"# paged block_size {bs} time / contiguous time: {ratio:.2f} (target <= 1.15)")
            kc = vc = None  # free before the next cache
        # The other shapes.
        for b, h, nq, n, causal in ((4, 8, 1, N // 4, False), (1, H, 16, N // 2, True)):
            with phase(f"data ({b}, {h}, {nq}, {n}, {D})"):
                qx, tqx = _randn(torch, rng, (b, h, nq, D), dtype)
                kx, tkx = _randn(torch, rng, (b, h, n, D), dtype)
                vx, tvx = _randn(torch, rng, (b, h, n, D), dtype)
            # numbattn's causal is aligned bottom-right (query i sees keys
            # <= i + n - nq); torch's is_causal is top-left, which would let
            # the 16 queries see only their first 16 keys: an explicit mask.
            tkw = {}
            if causal and tqx is not None:
                tkw = {"attn_mask": torch.ones(nq, n, dtype=torch.bool, device="cuda").tril(n - nq)}
            run_case(
                f"({b}, {h}, {nq}, {n}, {D}) causal={int(causal)}", dtype, qx, kx, vx,
                tqx, tkx, tvx, h,
                lambda out: numbattn.attention(qx, kx, vx, causal=causal, out=out),
                tkw, 2 * kx.size * np.dtype(dtype).itemsize,
            )  # fmt: skip
            qx = kx = vx = tqx = tkx = tvx = None
        q = k = v = tq = tk = tv = None
        if torch is not None:
            torch.cuda.empty_cache()
    # The pre-issue-11 path (fused kernel, no split) at the first shape, once.
    numbattn.config.CUDA_STREAM_ROWS = 0
    q, _ = _randn(torch, rng, (1, H, 1, D), np.float32)
    k, _ = _randn(torch, rng, (1, H, N, D), np.float32)
    v, _ = _randn(torch, rng, (1, H, N, D), np.float32)
    out = cuda.device_array((1, H, 1, D), np.float32)
    with phase(f"fused kernel, no split (1, {H}, 1, {N}, {D}) float32: compile + first call"):
        numbattn.attention(q, k, v, out=out, num_splits=1)
        cuda.synchronize()
    with phase("fused kernel: second call"):
        numbattn.attention(q, k, v, out=out, num_splits=1)
        cuda.synchronize()


# ------------------------------------------------------------------ sanitize


def cmd_sanitize(args) -> None:
    """Every kernel at its production geometry on small multi-tile shapes with
    tails and every option, checked against the reference (run it under
    compute-sanitizer: memcheck, racecheck, synccheck)."""
    from numba import cuda

    import numbattn
    from numbattn import reference

    rng = np.random.default_rng(3)
    b, hq, hk, nq, nk, d, dv = (1, 2, 1, 9, 11, 5, 3) if args.tiny else (2, 4, 2, 75, 139, 72, 40)
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        q = rng.standard_normal((b, hq, nq, d)).astype(dtype)
        k = rng.standard_normal((b, hk, nk, d)).astype(dtype)
        v = rng.standard_normal((b, hk, nk, dv)).astype(dtype)
        bias = rng.standard_normal((1, hq, nq, nk)).astype(dtype)
        mask = rng.random((b, 1, 1, nk)) > 0.2
        options = [
            {},
            {"causal": True},
            {
                "key_lengths": np.array([nk - 3, nk // 2][:b]),
                "query_lengths": np.array([nq, 7][:b]),
            },
            {"bias": bias, "mask": mask},
            {"window": (20, 5)},
        ]
        for opts in options:
            dev_opts = {
                n: (cuda.to_device(x) if n in ("bias", "mask") else x) for n, x in opts.items()
            }
            out = cuda.to_device(np.full((b, hq, nq, dv), np.nan, dtype))
            lse = cuda.to_device(np.full((b, hq, nq), np.nan, dtype))
            numbattn.attention(
                cuda.to_device(q),
                cuda.to_device(k),
                cuda.to_device(v),
                out=out,
                lse=lse,
                **dev_opts,
            )
            ro, rl = reference.attention(q, k, v, **opts)
            err = np.linalg.norm(out.copy_to_host() - ro) / np.linalg.norm(ro)
            fin = np.isfinite(rl)
            hl = lse.copy_to_host()
            lerr = np.linalg.norm(hl[fin] - rl[fin]) / np.linalg.norm(rl[fin])
            if not np.array_equal(np.isneginf(hl), ~fin):
                lerr = math.inf
            _check(f"sanitize attention {name} {sorted(opts)}", float(max(err, lerr)), dtype)
        kk = np.repeat(k, hq // hk, axis=1)
        s = numbattn.scores(cuda.to_device(q), cuda.to_device(kk), causal=True)
        rs = reference.scores(q, kk, causal=True)
        fin = np.isfinite(rs)
        hs = s.copy_to_host()
        serr = np.linalg.norm(hs[fin] - rs[fin]) / np.linalg.norm(rs[fin])
        _check(f"sanitize scores {name}", float(serr), dtype)
        p = numbattn.softmax(s)
        rp = reference.softmax(rs)
        _check(
            f"sanitize softmax {name}",
            float(np.linalg.norm(p.copy_to_host() - rp) / np.linalg.norm(rp)),
            dtype,
        )
        lens = np.array([0, 17, 1, 57])
        cu = np.concatenate([[0], np.cumsum(lens)])
        qv, kv, vv = (rng.standard_normal((int(cu[-1]), hq, e)).astype(dtype) for e in (d, d, dv))
        kv, vv = np.ascontiguousarray(kv[:, :hk]), np.ascontiguousarray(vv[:, :hk])
        o = numbattn.varlen_attention(
            *(cuda.to_device(x) for x in (qv, kv, vv)), cu, cu, causal=True
        )
        ro = reference.varlen_attention(qv, kv, vv, cu, cu, causal=True)[0]
        _check(
            f"sanitize varlen {name}",
            float(np.linalg.norm(o.copy_to_host() - ro) / np.linalg.norm(ro)),
            dtype,
        )


def _grad_err(got, ref) -> float:
    """max over (dq, dk, dv) of ||g - r|| / ||r||."""
    errs = []
    for g, r in zip(got, ref, strict=True):
        g, r = np.asarray(g, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if g.shape != r.shape or not np.isfinite(g).all():
            return math.inf
        errs.append(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-300)))
    return max(errs)


#: cmd_backward times other settings per dtype (float32: the kernels
#: without the fast loop over interior tiles, i.e. before it, then 16 x 16
#: threads; float64: the FMA kernel instead of the tensor cores) while the
#: step is younger than ALT_BUDGET_S seconds (the step should stay near a minute).
BACKWARD_ALTERNATIVES = {
    "float32": [{"CUDA_BWD_FAST_LOOP": False}, {"CUDA_BWD_COLS_PER_THREAD": 2}],
    "float64": [{"CUDA_BWD_COLS_PER_THREAD_F64": 4}],
}
ALT_BUDGET_S = float(os.environ.get("BWD_ALT_BUDGET_S", "60"))


def cmd_backward(args) -> None:
    """numbattn.attention_backward (issue 14) on the device.

    Correctness: every option (causal with Nq != Nk, lengths, window, bias,
    mask, GQA, varlen) on multi-tile shapes with tails against the float64
    reference (numbattn.reference, on the host); at the timed shape, fp32
    and fp64 gradients against torch's float64 SDPA backward on the device.
    Speed: fp32 and fp64 backward at (4, 16, 2048, 64), causal and not,
    against torch SDPA's backward (``out.backward(dout)``, the forward
    excluded) in the same process, CUDA-event medians."""
    from numba import cuda

    import numbattn
    from numbattn import reference

    t_start = time.monotonic()
    torch = _torch()
    rng = np.random.default_rng(6)
    to = cuda.to_device

    def run(q, k, v, do, opts, varlen=None):
        dopts = {n: (to(x) if n in ("bias", "mask") else x) for n, x in opts.items()}
        qd, kd, vd = to(q), to(k), to(v)
        lse = to(np.full(q.shape[:-1], np.nan, q.dtype))
        grads = [to(np.full(x.shape, np.nan, x.dtype)) for x in (q, k, v)]
        if varlen is None:
            out = numbattn.attention(qd, kd, vd, lse=lse, **dopts)
            numbattn.attention_backward(
                qd, kd, vd, out, lse, to(do), dq=grads[0], dk=grads[1], dv=grads[2], **dopts
            )
        else:
            out = numbattn.varlen_attention(qd, kd, vd, *varlen, lse=lse, **dopts)
            numbattn.varlen_attention_backward(
                qd, kd, vd, out, lse, to(do), *varlen,
                dq=grads[0], dk=grads[1], dv=grads[2], **dopts,
            )  # fmt: skip
        return [g.copy_to_host() for g in grads]

    b, hq, hk, nq, nk, d = (1, 2, 1, 9, 11, 8) if args.tiny else (2, 4, 2, 201, 263, 64)
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        q = rng.standard_normal((b, hq, nq, d)).astype(dtype)
        k = rng.standard_normal((b, hk, nk, d)).astype(dtype)
        v = rng.standard_normal((b, hk, nk, d)).astype(dtype)
        do = rng.standard_normal((b, hq, nq, d)).astype(dtype)
        bias = rng.standard_normal((1, hq, nq, nk)).astype(dtype)
        bias[..., 3, :] = -np.inf  # a fully masked row
        mask = rng.random((b, 1, 1, nk)) > 0.2
        lengths = {
            "key_lengths": np.array([nk - 3, nk // 2][:b]),
            "query_lengths": np.array([nq, 7][:b]),
        }
        cases = [
            {},
            {"causal": True},
            {"causal": True, **lengths},
            {"bias": bias, "mask": mask, "window": (40, 7)},
        ]
        for opts in cases:
            err = _grad_err(
                run(q, k, v, do, opts), reference.attention_backward(q, k, v, do, **opts)
            )
            _check(f"backward {name} {sorted(opts)}", err, dtype)
        lens = np.array([0, 17, 1, 57] if not args.tiny else [0, 5, 1, 3])
        cu = np.concatenate([[0], np.cumsum(lens)])
        qv, kv_, vv, dov = (
            rng.standard_normal((int(cu[-1]), h, d)).astype(dtype) for h in (hq, hk, hk, hq)
        )
        err = _grad_err(
            run(qv, kv_, vv, dov, {"causal": True}, varlen=(cu, cu)),
            reference.varlen_attention_backward(qv, kv_, vv, dov, cu, cu, causal=True),
        )
        _check(f"backward varlen {name} causal", err, dtype)

    # The timed shape.
    b, h, n, d = (1, 1, 19, 8) if args.tiny else (4, 16, 2048, 64)
    reps, warm = (1, 0) if args.tiny else (10, 2)
    flops = 2.5 * 4.0 * b * h * n * n * d  # 5 matmuls of 2 N^2 d (FlashAttention-2's count)
    log(f"# backward timings at (B, H, N, d) = {(b, h, n, d)}; TFLOP/s count {flops:.3g} flop")
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        ref_nc = None
        host = [rng.standard_normal((b, h, n, d)).astype(dtype) for _ in range(4)]
        qd, kd, vd, dod = (to(x) for x in host)
        dq, dk, dv = (cuda.device_array((b, h, n, d), dtype) for _ in range(3))
        for causal in (False, True):
            lse = cuda.device_array((b, h, n), dtype)
            out = numbattn.attention(qd, kd, vd, lse=lse, causal=causal)

            def bwd():
                numbattn.attention_backward(
                    qd, kd, vd, out, lse, dod, causal=causal, dq=dq, dk=dk, dv=dv
                )

            bwd()
            got = [x.copy_to_host() for x in (dq, dk, dv)]
            label = f"{name} causal={int(causal)}"
            tms = None
            if torch is not None:
                t = [torch.as_tensor(x, device="cuda").requires_grad_() for x in host[:3]]
                tdo = torch.as_tensor(host[3], device="cuda")
                t64 = [x.detach().double().requires_grad_() for x in t]
                f = torch.nn.functional.scaled_dot_product_attention
                o64 = f(*t64, is_causal=causal)
                o64.backward(tdo.double())
                ref = [x.grad.cpu().numpy() for x in t64]
                del o64, t64
                tout = f(*t, is_causal=causal)

                def tbwd():
                    for x in t:
                        x.grad = None
                    tout.backward(tdo, retain_graph=True)

                tms = _gpu_check().torch_median_ms(torch, tbwd, reps, warm)
                del tout, t, tdo
                torch.cuda.empty_cache()
            else:
                sl = (slice(0, 1), slice(0, 2))
                ref = reference.attention_backward(*(x[sl] for x in host), causal=causal)
                got = [g[sl] for g in got]
            _check(f"backward {label} at {(b, h, n, d)} vs float64", _grad_err(got, ref), dtype)
            if not causal:
                ref_nc = ref
            ms = _time_ms(bwd, reps, warm)
            tf = flops * (0.5 if causal else 1.0) / ms / 1e9
            row = f"time backward {label}: numbattn {ms:.3f} ms ({tf:.2f} TFLOP/s)"
            if tms is not None:
                row += (
                    f"; torch SDPA backward {tms:.3f} ms; numbattn time / torch time {ms / tms:.2f}"
                )
            log(row)
        # Another geometry at the same shape, when the step has time left
        # (each compiles two kernels): data for tuning numbattn.config.
        for alt in BACKWARD_ALTERNATIVES[name]:
            if ref_nc is None or time.monotonic() - t_start >= ALT_BUDGET_S:
                break
            saved = {knob: getattr(numbattn.config, knob) for knob in alt}
            try:
                for knob, val in alt.items():
                    setattr(numbattn.config, knob, val)
                lse = cuda.device_array((b, h, n), dtype)
                out = numbattn.attention(qd, kd, vd, lse=lse)

                def alt_bwd():
                    numbattn.attention_backward(qd, kd, vd, out, lse, dod, dq=dq, dk=dk, dv=dv)

                alt_bwd()
                got = [x.copy_to_host() for x in (dq, dk, dv)]
                if torch is None:
                    got = [g[:1, :2] for g in got]
                _check(f"backward {name} causal=0 {alt}", _grad_err(got, ref_nc), dtype)
                ms = _time_ms(alt_bwd, reps, warm)
                log(f"time backward {name} causal=0 with {alt}: numbattn {ms:.3f} ms")
            finally:
                for knob, val in saved.items():
                    setattr(numbattn.config, knob, val)


def cmd_sanitize_backward(args) -> None:
    """The backward kernels at their production geometry on a small multi-tile
    case with tails and every option (run it under compute-sanitizer)."""
    from numba import cuda

    import numbattn
    from numbattn import reference

    rng = np.random.default_rng(8)
    b, hq, hk, nq, nk, d = (1, 2, 1, 9, 11, 5) if args.tiny else (2, 4, 2, 75, 139, 64)
    # Without bias and mask, float32 also runs the fast loop over interior tiles.
    for dtype, extras in ((np.float32, False), (np.float32, True), (np.float64, True)):
        x = [rng.standard_normal((b, h, n, d)).astype(dtype)
             for h, n in ((hq, nq), (hk, nk), (hk, nk), (hq, nq))]  # fmt: skip
        opts = {
            "causal": True,
            "key_lengths": np.array([nk - 3, nk // 2][:b]),
            "query_lengths": np.array([nq, 7][:b]),
        }
        if extras:
            opts["bias"] = rng.standard_normal((1, hq, nq, nk)).astype(dtype)
            opts["mask"] = rng.random((b, 1, 1, nk)) > 0.2
        dopts = {n: (cuda.to_device(v) if n in ("bias", "mask") else v) for n, v in opts.items()}
        qd, kd, vd, dod = (cuda.to_device(v) for v in x)
        lse = cuda.device_array((b, hq, nq), dtype)
        out = numbattn.attention(qd, kd, vd, lse=lse, **dopts)
        got = numbattn.attention_backward(qd, kd, vd, out, lse, dod, **dopts)
        err = _grad_err([g.copy_to_host() for g in got], reference.attention_backward(*x, **opts))
        _check(f"sanitize backward {np.dtype(dtype).name} {sorted(opts)}", err, dtype)


def cmd_profile(args) -> None:
    """One warm-up and one profiled fp32 attention launch at (4, 16, 4096, 64)."""
    from numba import cuda

    import numbattn

    b, h, n, d = (1, 2, 13, 6) if args.tiny else (4, 16, 4096, 64)
    rng = np.random.default_rng(4)
    q, k, v = (cuda.to_device(rng.standard_normal((b, h, n, d)).astype(np.float32)) for _ in "qkv")
    out = cuda.device_array((b, h, n, d), np.float32)
    for _ in range(2):
        numbattn.attention(q, k, v, out=out)
    cuda.synchronize()
    log("profile: done")


def cmd_hostprof(args) -> None:
    """Where the host time of one small call goes: cProfile over many calls."""
    import cProfile
    import pstats

    from numba import cuda

    import numbattn

    rng = np.random.default_rng(5)
    n = 4 if args.tiny else 64
    q, k, v = (cuda.to_device(rng.standard_normal((1, 2, n, 64)).astype(np.float32)) for _ in "qkv")
    out, lse = (
        cuda.device_array((1, 2, n, 64), np.float32),
        cuda.device_array((1, 2, n), np.float32),
    )
    calls = 5 if args.tiny else 500
    for _ in range(3):
        numbattn.attention(q, k, v, out=out, lse=lse)
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        numbattn.attention(q, k, v, out=out, lse=lse)
    host = (time.perf_counter() - t0) / calls * 1e6
    cuda.synchronize()
    log(f"numbattn.attention(out=, lse=), device arrays, (1, 2, {n}, 64): {host:.1f} us per call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        numbattn.attention(q, k, v, out=out, lse=lse)
    prof.disable()
    cuda.synchronize()
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)


# ------------------------------------------------------------------ dask


def cmd_dask(args) -> None:
    """numbattn.dask on CuPy-backed dask arrays (synchronous scheduler): the
    chunks run the CUDA kernels and the result's chunks are CuPy arrays;
    causal with key lengths over uneven query/key chunks, then one timing
    against the in-memory call on the same CuPy arrays."""
    try:
        import cupy
        import dask
        import dask.array as da
    except ImportError as exc:
        log(f"dask step skipped: {exc} (needs cupy and dask on this machine)")
        return
    import numbattn
    import numbattn.dask as nd
    from numbattn import reference

    rng = np.random.default_rng(4)
    b, h, nq, nk, d = (2, 2, 7, 9, 4) if args.tiny else (4, 8, 2048, 2048, 64)
    qc, kc = (3, 4) if args.tiny else (700, 600)
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        q, k, v = (rng.standard_normal((b, h, n, d)).astype(dtype) for n in (nq, nk, nk))
        lengths = np.array([nk, nk // 2, nk - 3, 1][:b])
        dq, dk, dv = (
            da.from_array(cupy.asarray(x), chunks=(1, h, c, d))
            for x, c in ((q, qc), (k, kc), (v, kc))
        )
        with dask.config.set(scheduler="sync"):
            out, lse = nd.attention(dq, dk, dv, causal=True, key_lengths=lengths, return_lse=True)
            got, got_lse = dask.compute(out, lse)
        log(f"dask {name}: result chunks are {type(got).__module__}.{type(got).__name__}")
        if not isinstance(got, cupy.ndarray):
            FAILURES.append(f"dask {name} chunk type")
        ref, ref_lse = reference.attention(
            q[:, :1], k[:, :1], v[:, :1], causal=True, key_lengths=lengths
        )
        err = reference.relative_error(cupy.asnumpy(got[:, :1]), ref)
        _check(f"dask {name} out (causal, key_lengths, chunks {qc}x{kc})", float(err), dtype)
        err = reference.relative_error(cupy.asnumpy(got_lse[:, :1]), ref_lse)
        _check(f"dask {name} lse", float(err), dtype)
        if args.tiny or dtype != np.float32:
            continue
        cq, ck, cv = (cupy.asarray(x) for x in (q, k, v))

        def in_memory():
            numbattn.attention(cq, ck, cv, causal=True)
            cupy.cuda.Device().synchronize()

        def on_dask():
            with dask.config.set(scheduler="sync"):
                nd.attention(dq, dk, dv, causal=True).compute()
            cupy.cuda.Device().synchronize()

        for f in (in_memory, on_dask):
            f()
        t = {f.__name__: [] for f in (in_memory, on_dask)}
        for _ in range(5):
            for f in (in_memory, on_dask):
                t0 = time.perf_counter()
                f()
                t[f.__name__].append(time.perf_counter() - t0)
        mem, dsk = (sorted(t[n])[2] * 1e3 for n in ("in_memory", "on_dask"))
        log(
            f"time dask {name} {(b, h, nq, nk, d)} causal, chunks {qc}x{kc}: in-memory "
            f"{mem:.2f} ms, dask (sync scheduler) {dsk:.2f} ms ({dsk / mem:.2f}x)"
        )


# ------------------------------------------------------------------ torch


def cmd_torch(args) -> None:
    """numbattn.torch on CUDA tensors: forward and backward against torch SDPA's
    autograd in float64 (fp32 and fp64 runs, options, GQA, a stride-0 dout from
    ``out.sum()`` on strided views, CUDA lengths), on a busy non-default stream
    (a launch on the wrong stream reads unwritten inputs), gradcheck at a tiny
    fp64 shape, and forward+backward time against SDPA's. Without a CUDA torch
    (``--tiny`` under the simulator) the same code runs on CPU tensors: a
    rehearsal of the script, not of the GPU path."""
    import torch

    import numbattn.torch as nt

    f = torch.nn.functional
    cuda = torch.cuda.is_available() and not _sim()
    dev = torch.device("cuda" if cuda else "cpu")
    log(f"# torch {torch.__version__} on {dev}" + ("" if cuda else " (rehearsal: no CUDA torch)"))
    tol = {torch.float32: 5e-5, torch.float64: 1e-11}
    b, h, n, d = (1, 2, 6, 4) if args.tiny else (2, 8, 256, 64)
    gen = torch.Generator(device="cpu").manual_seed(5)

    def rand(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dev, dtype)

    def rel(x, y) -> float:
        x, y = x.detach().double(), y.detach().double()
        return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))

    def ref_sdpa(q, k, v, causal, nq, nk, diagonal=None):
        """SDPA in float64 with numbattn's causal alignment as an explicit mask."""
        group = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(group, 1) for x in (k, v))
        mask = None
        if causal:
            i = torch.arange(nq, device=dev)[:, None]
            mask = torch.arange(nk, device=dev)[None, :] <= i + (
                nk - nq if diagonal is None else diagonal
            )
        return f.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def compare(label, dtype, hk, nq, nk, causal, **kw):
        q, k, v = rand(b, h, nq, d), rand(b, hk, nk, d), rand(b, hk, nk, d)
        dout = rand(b, h, nq, d)
        lo = [x.to(dtype).clone().requires_grad_(True) for x in (q, k, v)]
        out = nt.attention(*lo, causal=causal, **kw)
        out.backward(dout.to(dtype))
        hi = [x.clone().requires_grad_(True) for x in (q, k, v)]
        ref = ref_sdpa(*hi, causal, nq, nk, kw.get("diagonal"))
        ref.backward(dout)
        name = str(dtype).removeprefix("torch.")
        err = max(rel(out, ref), *(rel(a.grad, r.grad) for a, r in zip(lo, hi)))
        ok = err <= tol[dtype]
        log(f"check torch {label} {name}: max rel err (out, dq, dk, dv) {err:.2e} "
            f"(tol {tol[dtype]:.0e}) {'OK' if ok else 'FAIL'}")  # fmt: skip
        if not ok:
            FAILURES.append(f"torch {label} {name}")

    for dtype in (torch.float32, torch.float64):
        compare("plain", dtype, h, n, n, False)
        compare("causal", dtype, h, n, n, True)
        compare("causal Nq<Nk gqa", dtype, h // 2, n // 2, n, True)
        compare("causal diagonal=0 Nq<Nk", dtype, h, n // 2, n, True, diagonal=0)
        klen = torch.full((b,), n, dtype=torch.int64, device=dev)  # a CUDA tensor: synchronises
        compare("key_lengths=Nk (device tensor)", dtype, h, n, n, False, key_lengths=klen)

        # stride-0 dout (out.sum()) on transposed (B, N, H, d) views, no copies
        name = str(dtype).removeprefix("torch.")
        x = rand(b, n, 3, h, d, dtype=dtype).requires_grad_(True)
        q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
        nt.attention(q, k, v, causal=True).sum().backward()
        xr = x.detach().double().requires_grad_(True)
        ref_sdpa(*(xr[:, :, i].transpose(1, 2) for i in range(3)), True, n, n).sum().backward()
        err = rel(x.grad, xr.grad)
        log(f"check torch stride-0 dout {name}: rel err {err:.2e} "
            f"{'OK' if err <= tol[dtype] else 'FAIL'}")  # fmt: skip
        if err > tol[dtype]:
            FAILURES.append(f"torch stride-0 dout {name}")

    if cuda:  # the current stream: a busy side stream whose inputs are written late
        q, k, v = (rand(b, h, n, d) for _ in range(3))
        dout = rand(b, h, n, d)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            torch.cuda._sleep(200_000_000)
            qs, ks, vs = (x * 1.0 for x in (q, k, v))
            for x in (qs, ks, vs):
                x.requires_grad_(True)
            out = nt.attention(qs, ks, vs, causal=True)
            out.backward(dout)
        torch.cuda.synchronize()
        hi = [x.clone().requires_grad_(True) for x in (q, k, v)]
        ref = ref_sdpa(*hi, True, n, n)
        ref.backward(dout)
        err = max(rel(out, ref), *(rel(a.grad, r.grad) for a, r in zip((qs, ks, vs), hi)))
        log(f"check torch side stream float64: rel err {err:.2e} "
            f"{'OK' if err <= tol[torch.float64] else 'FAIL'}")  # fmt: skip
        if not err <= tol[torch.float64]:
            FAILURES.append("torch side stream")

    tiny = [rand(1, 2, 5, 3).requires_grad_(True), rand(1, 1, 7, 3).requires_grad_(True)]
    tiny.append(rand(1, 1, 7, 2).requires_grad_(True))
    try:
        ok = torch.autograd.gradcheck(lambda q, k, v: nt.attention(q, k, v, causal=True), tiny)
    except Exception as exc:  # gradcheck raises on a mismatch
        log(f"gradcheck: {type(exc).__name__}: {str(exc)[:400]}")
        ok = False
    log(f"check torch gradcheck float64 (1, 2, 5|7, 3) causal gqa: {'OK' if ok else 'FAIL'}")
    if not ok:
        FAILURES.append("torch gradcheck")

    def timed(fn) -> float:
        """Median ms: torch CUDA events on the current stream (wall clock on the CPU)."""
        if cuda:
            return _gpu_check().torch_median_ms(torch, fn, 10, 2)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]

    shape = (1, 2, 16, 8) if args.tiny else (4, 16, 1024, 64)
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        qkv = [rand(*shape, dtype=dtype).requires_grad_(True) for _ in range(3)]
        dout = rand(*shape, dtype=dtype)
        for causal in (False, True):

            def ours():
                nt.attention(*qkv, causal=causal).backward(dout)

            def theirs():
                f.scaled_dot_product_attention(*qkv, is_causal=causal).backward(dout)

            ms, tms = timed(ours), timed(theirs)
            log(f"time torch fwd+bwd {name} {shape} causal={int(causal)}: numbattn.torch "
                f"{ms:.3f} ms, SDPA {tms:.3f} ms (SDPA time / numbattn time {tms / ms:.2f})")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "what",
        choices=[
            "timings",
            "varlen",
            "scores",
            "decode",
            "sanitize",
            "profile",
            "hostprof",
            "backward",
            "sanitize_backward",
            "torch",
            "dask",
        ],
    )
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CUDA simulator)")
    p.add_argument("--out", type=Path)
    p.add_argument("--shapes", help="timings: comma list of shape indices (default: all)")
    args = p.parse_args(argv)
    FAILURES.clear()
    globals()["cmd_" + args.what](args)
    log(f"{args.what}: " + ("all OK" if not FAILURES else "FAILED: " + "; ".join(FAILURES)))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
