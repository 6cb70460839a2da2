"""Peak memory a call adds over its inputs, each measured in a fresh process.

    python scripts/peak_memory.py [--n 16384] [--d 64] [--kernel attention|backward]

``--kernel backward`` measures ``attention_backward`` (its inputs, out, lse
and dout built before the measurement; the three gradients it returns count).

Each child process warms the kernels up on a tiny problem (so compilation or
the cache load is not counted), builds the inputs, resets the kernel's
high-water mark of resident memory (/proc/self/clear_refs, Linux), makes ONE
call at the full size through the public API (``out`` allocated by the call,
so the result counts), and reports VmHWM - VmRSS(before). The first call at
that size is the one measured, so scratch buffers cannot hide in memory
freed by an earlier call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child_backward(n: int, d: int) -> dict:
    import numbattn

    rng = np.random.default_rng(0)
    tiny = [rng.standard_normal((1, 1, 8, d)).astype(np.float32) for _ in range(4)]
    lse = np.empty((1, 1, 8), np.float32)
    out = numbattn.attention(*tiny[:3], lse=lse)
    numbattn.attention_backward(*tiny[:3], out, lse, tiny[3])
    q, k, v, dout = (rng.standard_normal((1, 1, n, d), dtype=np.float32) for _ in range(4))
    lse = np.empty((1, 1, n), np.float32)
    out = numbattn.attention(q, k, v, lse=lse)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    grads = numbattn.attention_backward(q, k, v, out, lse, dout)
    peak = _status("VmHWM:")
    return {
        "impl": "numbattn backward",
        "n": n,
        "d": d,
        "increase_bytes": peak - before,
        "out_bytes": sum(g.nbytes for g in grads),
    }


def child(impl: str, n: int, d: int) -> dict:
    import numbattn
    from numbattn.baselines import numpy_attention

    if impl == "backward":
        return child_backward(n, d)
    rng = np.random.default_rng(0)
    tiny = [rng.standard_normal((1, 1, 8, d)).astype(np.float32) for _ in range(3)]
    numbattn.attention(*tiny)
    # Generated in float32 directly: no freed temporaries for the call to reuse.
    q, k, v = (rng.standard_normal((1, 1, n, d), dtype=np.float32) for _ in range(3))
    scale = 1.0 / np.sqrt(d)

    fn = {
        "numbattn": lambda: numbattn.attention(q, k, v),
        "numpy": lambda: numpy_attention(q, k, v, scale),
    }[impl]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS:")
    out = fn()
    peak = _status("VmHWM:")
    return {"impl": impl, "n": n, "d": d, "increase_bytes": peak - before, "out_bytes": out.nbytes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--kernel", choices=["attention", "backward"], default="attention")
    ap.add_argument("--child", choices=["numbattn", "numpy", "backward"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.d)))
        return 0
    print(f"{args.kernel} float32 (1, 1, {args.n}, {args.d}): peak memory added by one call")
    impls = ("backward",) if args.kernel == "backward" else ("numbattn", "numpy")
    for impl in impls:
        res = subprocess.run(
            [sys.executable, __file__, "--child", impl, "--n", str(args.n), "--d", str(args.d)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"  {impl:<9} {r['increase_bytes'] / 2**20:9.1f} MiB "
            f"(of which the result {r['out_bytes'] / 2**20:.1f} MiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
