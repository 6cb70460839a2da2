"""The GPU checks that need a real device, in one process (see scripts/gpu_device_run.sh).

    python scripts/gpu_device.py timings [--out DIR]   # scripts/gpu_check.py at the issue's shapes
    python scripts/gpu_device.py varlen                # packed varlen batch vs torch SDPA padded
    python scripts/gpu_device.py decode                # few queries over a long KV cache
    python scripts/gpu_device.py sanitize              # small multi-tile case with tails, every kernel
    python scripts/gpu_device.py profile               # one fp32 attention launch (for ncu)
    python scripts/gpu_device.py hostprof              # where the host time of a small call goes
    python scripts/gpu_device.py dask                  # numbattn.dask on CuPy-backed chunks

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


# ------------------------------------------------------------------ decode


def _copy_bandwidth(torch) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = _time_ms(lambda: b.copy_(a), 10)
    return 2 * a.numel() * 4 / (ms * 1e-3) / 1e9


def cmd_decode(args) -> None:
    """Few queries over a long cache (issue 11's baseline): K+V read rate vs the
    device's copy bandwidth, and torch SDPA on the same tensors."""
    import numbattn
    from numbattn import reference

    torch = _torch()
    from numba import cuda

    if torch is not None:
        log(f"# device copy bandwidth (read + write): {_copy_bandwidth(torch):.0f} GB/s")
    cases = [(1, 32, 1, 32768, 128), (4, 8, 1, 8192, 128), (1, 32, 16, 16384, 128)]
    if args.tiny:
        cases = [(1, 2, 1, 37, 8)]
    rng = np.random.default_rng(2)
    for b, h, nq, nk, d in cases:
        for dtype in (np.float32, np.float64):
            q = rng.standard_normal((b, h, nq, d)).astype(dtype)
            k = rng.standard_normal((b, h, nk, d)).astype(dtype)
            v = rng.standard_normal((b, h, nk, d)).astype(dtype)
            dq, dk, dv = (cuda.to_device(x) for x in (q, k, v))
            out = cuda.device_array((b, h, nq, d), dtype)
            causal = nq > 1
            log(f"# decode {(b, h, nq, nk, d)} {np.dtype(dtype).name}: data on the device")
            numbattn.attention(dq, dk, dv, causal=causal, out=out)
            ro = reference.attention(q[:1, :2], k[:1, :2], v[:1, :2], causal=causal)[0]
            err = np.linalg.norm(out.copy_to_host()[:1, :2] - ro) / np.linalg.norm(ro)
            label = f"decode {(b, h, nq, nk, d)} {np.dtype(dtype).name} causal={int(causal)}"
            _check(label, float(err), dtype)
            ms = _time_ms(lambda: numbattn.attention(dq, dk, dv, causal=causal, out=out), 10)
            gbs = (k.nbytes + v.nbytes) / (ms * 1e-3) / 1e9
            row = f"time {label}: numbattn {ms:.3f} ms, K+V at {gbs:.0f} GB/s"
            if torch is not None:
                t = [torch.as_tensor(x, device="cuda") for x in (dq, dk, dv)]
                f = torch.nn.functional.scaled_dot_product_attention
                tms = _time_ms(lambda t=t: f(*t, is_causal=causal), 10)
                row += f"; torch SDPA {tms:.3f} ms ({tms / ms:.2f}x numbattn time)"
            log(row)


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "what",
        choices=["timings", "varlen", "decode", "sanitize", "profile", "hostprof", "dask"],
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
