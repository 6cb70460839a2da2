"""numbattn beside NumPy and PyTorch: which threading settings make it a good neighbour.

Usage::

    python scripts/neighbours.py [--n 1024] [--d 64] [--rounds 15] [--layers omp,workqueue]

For each configuration a fresh Python process (the settings must be in place
before the libraries start their thread pools) times, alternately and in one
process:

* ``alone``: numbattn.attention(1, 8, N, d) float32 calls, 0.3 s apart;
* ``after``: the same call right after a partner operation (NumPy ``matmul``
  or ``torch.mm`` of N x N float32), and the partner right after numbattn;

and reports the medians and the slow-downs ``after / alone`` of numbattn and
of the partner. Configurations: Numba threading layer (omp, workqueue; tbb
where installed), ``OPENBLAS_THREAD_TIMEOUT`` unset or 4, ``OMP_WAIT_POLICY``
unset or passive, and, for torch, imported before or after numbattn's first
call (after: two OpenMP runtimes, the known ~20x trap). The figures of the
section "Using numbattn beside NumPy and PyTorch" of docs/threads.md come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CHILD = r"""
import json, os, statistics, sys, time
partner, order, n, d, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if partner == "torch" and order == "before":
    import torch
import numpy as np
import numbattn
import numba
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 8, n, d)).astype(np.float32) for _ in range(3))
numbattn.attention(q, k, v)  # compile / load; starts Numba's thread pool
if partner == "torch" and order == "after":
    import torch
a = rng.standard_normal((n, n)).astype(np.float32)
b = rng.standard_normal((n, n)).astype(np.float32)
if partner == "torch":
    torch.set_num_threads(numba.get_num_threads())
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    op = lambda: torch.mm(ta, tb)
else:
    c = np.empty_like(a)
    op = lambda: np.matmul(a, b, out=c)
nb = lambda: numbattn.attention(q, k, v)
def t(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0
op(); nb()
res = {"nb_alone": [], "nb_after": [], "op_alone": [], "op_after": []}
for _ in range(rounds):
    time.sleep(0.3); res["nb_alone"].append(t(nb))
    time.sleep(0.3); res["op_alone"].append(t(op))
    op(); res["nb_after"].append(t(nb))
    nb(); res["op_after"].append(t(op))
out = {key: statistics.median(val) for key, val in res.items()}
out["layer"] = numba.threading_layer()
out["threads"] = numba.get_num_threads()
print(json.dumps(out))
"""


def run(layer, partner, order, timeout_env, wait_policy, args) -> dict | None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["NUMBA_THREADING_LAYER"] = layer
    for var, val in (("OPENBLAS_THREAD_TIMEOUT", timeout_env), ("OMP_WAIT_POLICY", wait_policy)):
        if val:
            env[var] = val
        else:
            env.pop(var, None)
    cmd = [sys.executable, "-c", CHILD, partner, order, str(args.n), str(args.d), str(args.rounds)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        print(f"  failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--layers", default="omp,workqueue")
    ap.add_argument("--partners", default="numpy,torch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    configs = []
    for layer in args.layers.split(","):
        for partner in args.partners.split(","):
            for timeout_env in (None, "4"):
                configs.append((layer, partner, "before", timeout_env, None))
            configs.append((layer, partner, "before", None, "passive"))
        if "torch" in args.partners:
            configs.append((layer, "torch", "after", None, None))
    rows = []
    for cfg in configs:
        layer, partner, order, timeout_env, wait = cfg
        t0 = time.perf_counter()
        res = run(layer, partner, order, timeout_env, wait, args)
        if res is None:
            continue
        res.update(
            requested_layer=layer,
            partner=partner,
            torch_import=order if partner == "torch" else "-",
            OPENBLAS_THREAD_TIMEOUT=timeout_env or "unset",
            OMP_WAIT_POLICY=wait or "unset",
            nb_slowdown=res["nb_after"] / res["nb_alone"],
            op_slowdown=res["op_after"] / res["op_alone"],
        )
        rows.append(res)
        print(
            f"{layer:9s} {partner:5s} torch:{res['torch_import']:6s} "
            f"TIMEOUT={res['OPENBLAS_THREAD_TIMEOUT']:5s} WAIT={res['OMP_WAIT_POLICY']:7s} "
            f"numbattn {res['nb_alone'] * 1e3:7.1f} ms alone, x{res['nb_slowdown']:.2f} after "
            f"{partner}; {partner} {res['op_alone'] * 1e3:7.1f} ms alone, "
            f"x{res['op_slowdown']:.2f} after numbattn  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    slow = [r["nb_slowdown"] for r in rows]
    if slow:
        print(f"median numbattn slow-down over all configurations: x{statistics.median(slow):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
