"""GPU correctness and performance check for numbattn's CUDA backend.

On a real GPU::

    python scripts/gpu_check.py                      # (B,H,N,d) = (4,16,4096,64)
    python scripts/gpu_check.py --n 2048 --d 128 --out results/

1. correctness at realistic sizes (fp32/fp64, causal or not) against a float64
   reference computed on the GPU (torch or CuPy, per head; NumPy on a few
   heads when neither is present): relative errors printed and asserted
   (1e-5 fp32, 1e-12 fp64), also for ``scores`` and ``softmax``;
2. kernel times with CUDA events (median of --reps after --warmup):
   numbattn vs torch SDPA vs CuPy batched matmul + stable softmax, with
   TFLOP/s = 2*B*H*Nq*Nk*(d+dv) (halved for causal);
3. host time per call: numbattn (Numba device arrays / torch tensors) vs a
   bare Numba launch of the same kernel with device arrays.

Prints a short table last; ``--out DIR`` writes gpu_check.log and
gpu_check.json. ``--tiny`` (tiny sizes, small tiles, 1 repetition) runs under
the CUDA simulator (NUMBA_ENABLE_CUDASIM=1). Exit status 1 if a correctness
check failed.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from numbattn.reference import relative_error as rel_err

RTOL = {"float32": 1e-5, "float64": 1e-12}
LINES: list[str] = []


def log(*parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LINES.append(line)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--n", type=int, default=4096, help="Nq = Nk unless --nq/--nk")
    p.add_argument("--nq", type=int)
    p.add_argument("--nk", type=int)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--dv", type=int)
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--causal", default="0,1", help="comma list of 0/1")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--check-heads",
        type=int,
        default=0,
        help="heads checked for correctness (0: all with torch/CuPy, 2 with NumPy)",
    )
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-cupy", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for the CUDA simulator")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    if a.tiny:
        a.batch, a.heads, a.n, a.d = 1, 2, 13, 6
        a.reps, a.warmup = 1, 0
    a.nq = a.nq or a.n
    a.nk = a.nk or a.n
    a.dv = a.dv or a.d
    a.dtypes = [np.dtype(t) for t in a.dtypes.split(",") if t]
    a.causal = [bool(int(c)) for c in a.causal.split(",") if c]
    return a


# ---------------------------------------------------------------- libraries


def optional_libs(args, sim):
    torch = cupy = None
    if not sim and not args.no_torch:
        try:
            import torch as _t

            if _t.cuda.is_available():
                torch = _t
        except Exception as exc:
            log(f"# torch unavailable: {exc}")
    if not sim and not args.no_cupy:
        try:
            import cupy as _c

            if _c.cuda.runtime.getDeviceCount() > 0:
                cupy = _c
        except Exception as exc:
            log(f"# cupy unavailable: {exc}")
    return torch, cupy


# ---------------------------------------------------------------- reference


def reference_head(q, k, v, scale, causal, torch, cupy):
    """float64 (out, lse) for one (Nq, d) head, on the GPU when possible."""
    nq, nk = q.shape[0], k.shape[0]
    if torch is not None:
        t = [torch.as_tensor(x, device="cuda", dtype=torch.float64) for x in (q, k, v)]
        s = (t[0] @ t[1].T) * scale
        if causal:
            i = torch.arange(nq, device="cuda")[:, None]
            j = torch.arange(nk, device="cuda")[None, :]
            s = s.masked_fill(j > i + (nk - nq), -math.inf)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        return (p @ t[2]).cpu().numpy(), lse.cpu().numpy()
    if cupy is not None:
        c = [cupy.asarray(x, dtype=cupy.float64) for x in (q, k, v)]
        s = (c[0] @ c[1].T) * scale
        if causal:
            i = cupy.arange(nq)[:, None]
            j = cupy.arange(nk)[None, :]
            s = cupy.where(j > i + (nk - nq), -cupy.inf, s)
        m = s.max(axis=-1, keepdims=True)
        m = cupy.where(cupy.isneginf(m), 0.0, m)
        e = cupy.exp(s - m)
        tot = e.sum(axis=-1, keepdims=True)
        lse = cupy.log(tot[:, 0]) + m[:, 0]
        p = cupy.where(tot > 0, e / cupy.where(tot > 0, tot, 1.0), 0.0)
        return cupy.asnumpy(p @ c[2]), cupy.asnumpy(lse)
    from numbattn import reference

    return reference.attention(q, k, v, scale=scale, causal=causal)


# ---------------------------------------------------------------- timing


class Timer:
    """CUDA-event timing on a Numba stream (wall clock on the simulator)."""

    def __init__(self, sim):
        self.sim = sim

    def median_ms(self, fn, reps, warmup):
        from numba import cuda

        for _ in range(warmup):
            fn()
        cuda.synchronize()
        times = []
        for _ in range(max(1, reps)):
            if self.sim:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            e0, e1 = cuda.event(timing=True), cuda.event(timing=True)
            e0.record(0)
            fn()
            e1.record(0)
            e1.synchronize()
            times.append(cuda.event_elapsed_time(e0, e1))
        return statistics.median(times)


def torch_median_ms(torch, fn, reps, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, reps)):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return statistics.median(times)


def host_us(fn, calls, sync, rounds=3):
    """Mean host time per call (launches only; the GPU is drained after);
    best of ``rounds`` rounds of ``calls`` calls."""
    for _ in range(min(3, rounds)):
        fn()
    sync()
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        sync()
    return best


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    LINES.clear()
    args = parse(argv)
    from numba import cuda

    import numbattn
    from numbattn.cuda import backend

    sim = backend.simulator()
    if args.tiny:
        import numbattn.config as cfg

        for name, val in dict(
            CUDA_QUERY_TILE=8,
            CUDA_KEY_TILE=8,
            CUDA_QUERY_TILE_F64=8,
            CUDA_KEY_TILE_F64=8,
            CUDA_HEAD_CHUNK=8,
            CUDA_VALUE_CHUNK=8,
            CUDA_SCORES_TILE=8,
            CUDA_SCORES_PER_THREAD=2,
            CUDA_SCORES_HEAD_CHUNK=4,
            CUDA_SOFTMAX_THREADS=8,
            CUDA_TC_WARPS=1,
            CUDA_TC_WARPS_F64=1,
            CUDA_TC_KEY_TILE=8,
            CUDA_TC_KEY_TILE_F64=8,
            CUDA_TC_SCORES_WARPS=1,
            CUDA_TC_SCORES_TILE=8,
            CUDA_TC_SCORES_HEAD_CHUNK=8,
        ).items():
            setattr(cfg, name, val)
    problem = numbattn.cuda_problem()
    if problem:
        log(f"CUDA backend unavailable: {problem}")
        return 2
    import numba
    import numba_cuda

    torch, cupy = optional_libs(args, sim)
    dev = cuda.get_current_device()
    devname = (
        "simulator" if sim else dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    )
    log(f"# device: {devname}  cc={getattr(dev, 'compute_capability', '?')}")
    log(
        f"# python {platform.python_version()} numpy {np.__version__} numba {numba.__version__} "
        f"numba-cuda {numba_cuda.__version__} torch {getattr(torch, '__version__', '-')} "
        f"cupy {getattr(cupy, '__version__', '-')}"
    )
    B, H, NQ, NK, D, DV = args.batch, args.heads, args.nq, args.nk, args.d, args.dv
    log(f"# shape (B,H,Nq,Nk,d,dv) = ({B},{H},{NQ},{NK},{D},{DV})")
    results = {
        "device": devname,
        "shape": [B, H, NQ, NK, D, DV],
        "checks": [],
        "timings": [],
        "host_us": {},
        "kernels": {},
    }
    failures = []
    rng = np.random.default_rng(0)
    scale = 1.0 / math.sqrt(D)

    # ---- correctness -----------------------------------------------------
    for dtype in args.dtypes:
        q = rng.standard_normal((B, H, NQ, D)).astype(dtype)
        k = rng.standard_normal((B, H, NK, D)).astype(dtype)
        v = rng.standard_normal((B, H, NK, DV)).astype(dtype)
        dq, dk, dv_ = cuda.to_device(q), cuda.to_device(k), cuda.to_device(v)
        for causal in args.causal:
            out = cuda.device_array((B, H, NQ, DV), dtype)
            lse = cuda.device_array((B, H, NQ), dtype)
            numbattn.attention(dq, dk, dv_, causal=causal, out=out, lse=lse)
            cuda.synchronize()
            ho, hl = out.copy_to_host(), lse.copy_to_host()
            nheads = args.check_heads or (B * H if (torch or cupy or args.tiny) else 2)
            eo = el = 0.0
            num_o = den_o = num_l = den_l = 0.0
            for idx in range(min(nheads, B * H)):
                b, h = divmod(idx, H)
                ro, rl = reference_head(q[b, h], k[b, h], v[b, h], scale, causal, torch, cupy)
                e1, e2 = rel_err(ho[b, h], ro), rel_err(hl[b, h], rl)
                if not (math.isfinite(e1) and math.isfinite(e2)):
                    eo, el = max(eo, e1), max(el, e2)
                    continue
                num_o += np.linalg.norm(ho[b, h] - ro) ** 2
                den_o += np.linalg.norm(ro) ** 2
                fin = np.isfinite(rl)
                num_l += np.linalg.norm(hl[b, h][fin] - rl[fin]) ** 2
                den_l += np.linalg.norm(rl[fin]) ** 2
            eo = max(eo, math.sqrt(num_o / den_o) if den_o else math.sqrt(num_o))
            el = max(el, math.sqrt(num_l / den_l) if den_l else math.sqrt(num_l))
            tol = RTOL[dtype.name]
            ok = eo <= tol and el <= tol
            log(
                f"check attention {dtype.name:7s} causal={int(causal)} heads={nheads}: "
                f"rel err out {eo:.2e} lse {el:.2e} (tol {tol:.0e}) {'OK' if ok else 'FAIL'}"
            )
            results["checks"].append(
                dict(kernel="attention", dtype=dtype.name, causal=causal, out=eo, lse=el, ok=ok)
            )
            if not ok:
                failures.append(f"attention {dtype.name} causal={causal}")
        # scores + softmax on one head (moderate size)
        n2 = min(NQ, 1024)
        qs, ks = q[:1, :1, :n2], k[:1, :1, : min(NK, 1024)]
        from numbattn import reference

        for causal in args.causal:
            s = numbattn.scores(cuda.to_device(qs), cuda.to_device(ks), causal=causal)
            rs = reference.scores(qs, ks, causal=causal)
            es = rel_err(s.copy_to_host(), rs)
            p = numbattn.softmax(s, out=s)
            ep = rel_err(p.copy_to_host(), reference.softmax(rs))
            tol = RTOL[dtype.name]
            ok = es <= tol and ep <= tol
            log(
                f"check scores+softmax {dtype.name:7s} causal={int(causal)}: rel err scores "
                f"{es:.2e} softmax {ep:.2e} {'OK' if ok else 'FAIL'}"
            )
            results["checks"].append(
                dict(
                    kernel="scores+softmax",
                    dtype=dtype.name,
                    causal=causal,
                    scores=es,
                    softmax=ep,
                    ok=ok,
                )
            )
            if not ok:
                failures.append(f"scores/softmax {dtype.name} causal={causal}")

    # ---- kernel resources ------------------------------------------------
    for dtype in args.dtypes:
        fused = backend._attention_kernel(dtype)[1]
        info = dict(
            geometry=str(fused.geometry),
            threads=fused.threads,
            query_tile=fused.query_tile,
            value_chunk=fused.value_chunk,
        )
        compiled = backend.compiled_kernel("attention", dtype)
        if compiled is not None and not sim:
            for attr in ("regs_per_thread", "local_mem_per_thread", "shared_mem_per_block"):
                try:
                    info[attr] = getattr(compiled, attr)
                except Exception as exc:  # pragma: no cover
                    info[attr] = f"? ({exc})"
        results["kernels"][dtype.name] = info
        log(f"# attention kernel {dtype.name}: {info}")

    # ---- timings ---------------------------------------------------------
    timer = Timer(sim)
    rows = []
    for dtype in args.dtypes:
        q = cuda.to_device(rng.standard_normal((B, H, NQ, D)).astype(dtype))
        k = cuda.to_device(rng.standard_normal((B, H, NK, D)).astype(dtype))
        v = cuda.to_device(rng.standard_normal((B, H, NK, DV)).astype(dtype))
        out = cuda.device_array((B, H, NQ, DV), dtype)
        for causal in args.causal:
            flops = 2.0 * B * H * NQ * NK * (D + DV) * (0.5 if causal else 1.0)
            row = {"dtype": dtype.name, "causal": causal}
            ms = timer.median_ms(
                lambda: numbattn.attention(q, k, v, causal=causal, out=out), args.reps, args.warmup
            )
            row["numbattn"] = ms
            # The same call on the FMA kernel and, for float32, with one TF32
            # product: the tensor cores' gain and the opt-in's, in one run.
            variants = {"numbattn_fma": dict(CUDA_TENSOR_CORES=False)}
            if dtype == np.float32:
                variants["numbattn_tf32"] = dict(CUDA_FLOAT32_PRECISION="tf32")
            for name, knobs in variants.items():
                saved = {kn: getattr(numbattn.config, kn) for kn in knobs}
                try:
                    for kn, val in knobs.items():
                        setattr(numbattn.config, kn, val)
                    row[name] = timer.median_ms(
                        lambda: numbattn.attention(q, k, v, causal=causal, out=out),
                        args.reps,
                        args.warmup,
                    )
                finally:
                    for kn, val in saved.items():
                        setattr(numbattn.config, kn, val)
            if torch is not None:
                tdt = getattr(torch, dtype.name)
                tq, tk, tv = (torch.as_tensor(x, device="cuda") for x in (q, k, v))
                assert tq.dtype == tdt
                F = torch.nn.functional
                mask = None
                if causal and NQ != NK:
                    i = torch.arange(NQ, device="cuda")[:, None]
                    j = torch.arange(NK, device="cuda")[None, :]
                    mask = j <= i + (NK - NQ)

                def sdpa():
                    if mask is not None:
                        return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

                try:
                    row["torch_sdpa"] = torch_median_ms(torch, sdpa, args.reps, args.warmup)
                except Exception as exc:
                    log(f"# torch SDPA failed: {exc}")
                del tq, tk, tv
            if cupy is not None:
                cq, ck, cv = (cupy.asarray(x) for x in (q, k, v))
                cmask = None
                if causal:
                    cmask = cupy.arange(NK)[None, :] > cupy.arange(NQ)[:, None] + (NK - NQ)

                def cupy_attn():
                    s = cupy.matmul(cq, ck.swapaxes(-1, -2))
                    s *= scale
                    if cmask is not None:
                        s = cupy.where(cmask, -cupy.inf, s)
                    m = s.max(axis=-1, keepdims=True)
                    s -= m
                    cupy.exp(s, out=s)
                    s /= s.sum(axis=-1, keepdims=True)
                    return cupy.matmul(s, cv)

                try:
                    row["cupy"] = timer.median_ms(cupy_attn, args.reps, args.warmup)
                except Exception as exc:  # e.g. out of memory
                    log(f"# cupy failed: {exc}")
                cupy.get_default_memory_pool().free_all_blocks()
            for key in ("numbattn", "numbattn_fma", "numbattn_tf32", "torch_sdpa", "cupy"):
                if key in row:
                    row[key + "_tflops"] = flops / (row[key] * 1e-3) / 1e12
            rows.append(row)
            results["timings"].append(row)
            log(f"time {row}")
        q = k = v = out = None  # free before the next dtype

    # ---- host time per call ----------------------------------------------
    hdt = args.dtypes[0]
    hn = 4 if args.tiny else 64
    hq = cuda.to_device(rng.standard_normal((1, 2, hn, D)).astype(hdt))
    hk = cuda.to_device(rng.standard_normal((1, 2, hn, D)).astype(hdt))
    # one launch per call, as the bare baseline needs
    hdv = min(DV, backend._attention_kernel(hdt)[1].value_chunk)
    hv = cuda.to_device(rng.standard_normal((1, 2, hn, hdv)).astype(hdt))
    hout = cuda.device_array((1, 2, hn, hdv), hdt)
    hlse = cuda.device_array((1, 2, hn), hdt)
    calls, rounds = (1, 1) if args.tiny else (200, 5)
    sync = cuda.synchronize
    bare_launch = backend.bare_attention_launch(hq, hk, hv, hout, hlse)
    hosts = {
        "bare numba launch (device arrays)": bare_launch,
        "numbattn.attention(out=, lse=) device arrays": lambda: numbattn.attention(
            hq, hk, hv, out=hout, lse=hlse
        ),
        "numbattn.attention(out=) device arrays": lambda: numbattn.attention(hq, hk, hv, out=hout),
        "numbattn.attention() device arrays": lambda: numbattn.attention(hq, hk, hv),
    }
    if torch is not None:
        tq, tk, tv, to = (torch.as_tensor(x, device="cuda") for x in (hq, hk, hv, hout))
        hosts["numbattn.attention(out=) torch tensors"] = lambda: numbattn.attention(
            tq, tk, tv, out=to
        )
        hosts["numbattn.attention() torch tensors"] = lambda: numbattn.attention(tq, tk, tv)
    for label, fn in hosts.items():
        results["host_us"][label] = host_us(fn, calls, sync, rounds)
    bare = results["host_us"]["bare numba launch (device arrays)"]

    # ---- summary table (last) --------------------------------------------
    log("")
    log(
        f"== numbattn GPU check on {devname}: (B,H,Nq,Nk,d,dv)=({B},{H},{NQ},{NK},{D},{DV}), "
        f"median of {args.reps} =="
    )
    log(
        f"{'dtype':8s} {'causal':6s} {'numbattn ms':>11s} {'TFLOP/s':>8s} {'SDPA ms':>9s} "
        f"{'TFLOP/s':>8s} {'CuPy ms':>9s} {'TFLOP/s':>8s}"
    )
    for r in rows:

        def cell(key):
            if key not in r:
                return f"{'-':>9s} {'-':>8s}"
            return f"{r[key]:9.3f} {r[key + '_tflops']:8.2f}"

        log(
            f"{r['dtype']:8s} {int(r['causal']):<6d} {r['numbattn']:11.3f} "
            f"{r['numbattn_tflops']:8.2f} {cell('torch_sdpa')} {cell('cupy')}"
        )
    log(f"host time per call ({hdt.name}, tiny problem):")
    for label, us in results["host_us"].items():
        log(f"  {label:48s} {us:8.1f} us  ({us / bare:4.2f}x bare)")
    log("correctness: " + ("all OK" if not failures else "FAILED: " + "; ".join(failures)))
    results["failures"] = failures
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.log").write_text("\n".join(LINES) + "\n")
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
