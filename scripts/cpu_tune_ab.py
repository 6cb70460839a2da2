"""Same-process ratios for two CPU targets: the causal backward against the
non-causal one (issue 14: causal <= 0.6x) and a paged decode against the same
decode on a contiguous cache (issue 11: paged <= 1.15x).

Usage::

    python scripts/cpu_tune_ab.py [--part backward,decode] [--threads 1,2]
        [--rounds 9] [--dtype float32,float64]
        [--shape 4,8,512,64 --shape 1,8,2048,64] [--old OLD_TREE]

Each round times every variant back to back (causal then non-causal; contiguous
then paged 16 then paged 256), at each thread count in turn
(``numba.set_num_threads``: one compiled kernel serves every count), so load
on a shared machine hits the two sides of a ratio alike; the order of the
variants is reversed on odd rounds. Each sample is the mean of two calls. One
thread is timed in process CPU time (``time.process_time``: what the kernel
itself spends, robust to other processes on a shared host; compute-bound
kernels only, as a memory-bound one also stalls on others' traffic), more
threads in wall time. Printed per case: the median of each variant and the
median (and range) over rounds of the per-round ratio.

With ``--old`` (a tree holding an older ``numbattn`` package, e.g. ``git
archive main numbattn | tar -x -C /tmp/old``), that version is loaded beside
this one as ``numbattn_old`` and its ratios are measured in the same rounds:
old and new side by side.

Where the causal backward's time goes: ``--breakdown`` adds, at one thread,
the backward with ``window=(0, 0)`` (only the diagonal tile pairs, trimmed
exactly as under causal) and with every query length 0 (no tile pair at all:
the per-call and per-key-tile costs: packing K and V, writing dK / dV and dQ).
With F the latter, X a full tile pair and D a diagonal one, non-causal =
F + n_full X, causal = F + n_diag D + n_below X.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _load_old(tree: str):
    tmp = tempfile.mkdtemp(prefix="numbattn-old-")
    shutil.copytree(
        os.path.join(tree, "numbattn"),
        os.path.join(tmp, "numbattn_old"),
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    sys.path.insert(0, tmp)
    import numbattn_old  # type: ignore[import-not-found]

    return numbattn_old


def _backward_calls(mod, shape, dtype, breakdown):
    """name -> call: the backward of ``mod`` causal and not (and the
    breakdown variants), on shared random inputs."""
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    calls = {}
    variants = {"causal": {"causal": True}, "non-causal": {}}
    if breakdown:
        variants["window (0, 0)"] = {"window": (0, 0)}
        variants["no query rows"] = {
            "causal": True,
            "query_lengths": np.zeros(shape[0], np.int64),
        }
    for name, kw in variants.items():
        lse = np.empty(shape[:3], dtype)
        fw = {key: val for key, val in kw.items() if key != "query_lengths"}
        out = mod.attention(q, k, v, lse=lse, **fw)
        calls[name] = lambda o=out, l_=lse, kw=kw: mod.attention_backward(q, k, v, o, l_, do, **kw)
    return calls


def _decode_calls(mod, paged_from):
    """name -> call: the (1, 8, 1, 32768, 128) float32 decode of ``mod`` on a
    contiguous cache and on shuffled paged caches of 16 and 256 rows a block
    (the cases of ``python -m numbattn bench --kernel decode``)."""
    b, h, nq, nk, d = 1, 8, 1, 32768, 128
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, h, nq, d), dtype=np.float32)
    k = rng.standard_normal((b, h, nk, d), dtype=np.float32)
    v = rng.standard_normal((b, h, nk, d), dtype=np.float32)
    lens = np.full(b, nk)
    calls = {"contiguous": lambda: mod.attention(q, k, v)}
    ref = calls["contiguous"]()
    for bs in (16, 256):
        kc, vc, table = paged_from(k, v, bs)
        calls[f"paged {bs}"] = lambda kc=kc, vc=vc, t=table: mod.paged_attention(q, kc, vc, t, lens)
        err = float(np.abs(calls[f"paged {bs}"]() - ref).max())
        assert err < 1e-4, (bs, err)
    return calls


def _run(cases, threads, rounds):
    """cases: label -> (base name, {name: call}); every ratio is name / base."""
    import numba

    res: dict = {}
    for rnd in range(rounds):
        for th in threads:
            numba.set_num_threads(th)
            clock = time.process_time if th == 1 else time.perf_counter
            for label, (_, calls) in cases.items():
                names = list(calls)
                for name in names if rnd % 2 == 0 else names[::-1]:
                    f = calls[name]
                    f()
                    t0 = clock()
                    f()
                    f()
                    res.setdefault((label, th, name), []).append((clock() - t0) / 2)
    for label, (base, calls) in cases.items():
        for th in threads:
            kind = "CPU time" if th == 1 else "wall"
            print(f"{label}, {th} thread{'s' if th > 1 else ''} ({kind}):")
            b = res[(label, th, base)]
            for name in calls:
                t = res[(label, th, name)]
                line = f"  {name:>14}: {statistics.median(t) * 1e3:8.2f} ms"
                if name != base:
                    r = [x / y for x, y in zip(t, b)]
                    line += (
                        f"  {name} / {base} {statistics.median(r):.3f}"
                        f" (range {min(r):.2f}-{max(r):.2f})"
                    )
                print(line)
        sys.stdout.flush()
    for label, (_, calls) in cases.items():  # --old: new / old, same rounds
        if not label.startswith("new "):
            continue
        other = "old " + label[4:]
        for th in threads:
            parts = []
            for name in calls:
                r = [x / y for x, y in zip(res[(label, th, name)], res[(other, th, name)])]
                parts.append(f"{name} {statistics.median(r):.3f}")
            print(f"new / old time, {label[4:]}, {th} thread(s): " + ", ".join(parts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="backward,decode")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--shape", action="append", default=None)
    ap.add_argument("--old", default=None, help="a tree with an older numbattn package")
    ap.add_argument("--breakdown", action="store_true")
    a = ap.parse_args()
    import numba

    import numbattn
    from numbattn._bench import _paged_from

    mods = {"": numbattn}
    if a.old:
        mods = {"new ": numbattn, "old ": _load_old(a.old)}
    threads = [int(x) for x in a.threads.split(",")]
    parts = a.part.split(",")
    shapes = [tuple(int(x) for x in s.split(",")) for s in (a.shape or ["4,8,512,64"])]
    print(
        f"numbattn {numbattn.__file__}; numba {numba.__version__}, "
        f"{numba.config.THREADING_LAYER} threading; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    cases = {}
    for tag, mod in mods.items():
        for p in parts:
            if p == "backward":
                for shape in shapes:
                    for dt in a.dtype.split(","):
                        calls = _backward_calls(mod, shape, np.dtype(dt), a.breakdown)
                        cases[f"{tag}backward {dt} {shape}"] = ("non-causal", calls)
            elif p == "decode":
                cases[f"{tag}decode (1, 8, 1, 32768, 128) float32"] = (
                    "contiguous",
                    _decode_calls(mod, _paged_from),
                )
            else:
                raise SystemExit(f"--part: backward or decode, not {p!r}")
    print(f"load average {os.getloadavg()[0]:.1f} before timing", flush=True)
    _run(cases, threads, a.rounds)
    print(f"load average {os.getloadavg()[0]:.1f} after timing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
