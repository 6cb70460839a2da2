"""Static facts about numbattn's CUDA kernels: ``python -m numbattn gpu-report``.

Every kernel the CUDA backend launches is compiled at the geometry of
:mod:`numbattn.config` for a target compute capability, without a GPU:
numba-cuda (NVVM) -> PTX -> ``ptxas -v`` -> cubin -> ``nvdisasm`` -> SASS,
with NVIDIA's tools from their pip wheels (``pip install "numbattn[test]"``
installs them). One record per compiled kernel variant:

``kernel``, ``dtype``, ``path``
    ``path`` is ``"hardware"`` for the code a GPU runs. Kernels whose
    simulator path differs from the hardware one (warp shuffles, inline PTX,
    launch bounds and aligned shared memory replaced by portable code under
    ``NUMBA_ENABLE_CUDASIM``) add a ``"simulator"`` record: the fused
    attention kernel, the tensor-core scores kernel and the streaming
    kernel, whose files are saved as ``<kernel>_<dtype>_sm_XY_simulator.*``.
``cc``, ``target``, ``threads_per_block``, ``geometry``
    The compute capability (``"9.0"``), its ptxas target (``"sm_90"``), the
    block size and tile sizes the backend launches with.
``registers``, ``spill_bytes``, ``spill_load_bytes``, ``local_bytes``, ``shared_bytes``
    What ``ptxas -v`` prints: registers per thread, bytes of spill stores and
    loads, stack frame (local memory per thread) and static shared memory
    per block.
``blocks_per_sm``, ``warps_per_sm``, ``occupancy``, ``limited_by``
    Resident blocks and warps per SM (:func:`numbattn.cuda.limits.blocks_per_sm`,
    the rules of ``cuda_occupancy.h``), the fraction of the SM's warp slots
    they fill, and which limits give that minimum.
``sass_instructions``
    Instructions of the whole kernel.
``inner_loop``
    The body of the hottest loop (:func:`hottest_loop`): the loop over key
    tiles of the fused attention kernel (for float32, the fast loop over
    interior key tiles, whose body is one tile's work; boundary tiles run
    in a second loop), the head-chunk loop of the scores kernel, the
    exp-and-sum loop of softmax. A loop is a natural loop of the SASS
    (:func:`find_loops`): its head and every block that reaches its back
    branch without passing the head, contiguous or not: cold blocks ptxas
    placed elsewhere that return into it count (the
    warp shuffles' WARPSYNC.COLLECTIVE fallbacks), excluding other loops
    laid out in between; ``ranges`` lists its blocks as [first, last]
    offsets. Static counts of its instructions, nested loops included:
    ``instructions``, ``fma`` (FFMA/DFMA), ``mma`` (HMMA/DMMA/IMMA and the
    Hopper GMMA forms), ``fma_share`` = fma / instructions, ``mma_kinds`` (each
    tensor-core opcode with its modifiers and its count, e.g.
    ``{"HMMA.1688.F32.TF32": 108}`` or ``{"DMMA.16x8x8": 30}``), ``shared_loads``
    (LDS), ``shared_loads_vector`` (LDS.64/.128: for float64, an LDS.64 is
    one element), ``shared_stores``,
    ``global_loads`` (LDG, and the generic LD that Numba's array accesses
    compile to), ``global_loads_128`` (those of 16 bytes: LDG.E.128, one
    per lane for four floats or two doubles), ``local_accesses`` (LDL/STL: spills in the loop),
    ``mufu`` (exp/log/rcp), ``barriers`` (BAR), ``shuffles`` (SHFL), the loop's ``start`` and
    ``end`` offsets, and ``nested``: the same counts for each loop inside it
    (the dynamic hot spots: the Q.K^T and P.V products of attention).
``ptxas``
    The version of ptxas that compiled it.

With a usable GPU (and not on the simulator), the records for the device's
compute capability also carry ``device``: what the driver reports for the
kernel compiled by numba-cuda for that device (registers, shared and local
memory, the maximum block size, and resident blocks per SM from
``cuOccupancyMaxActiveBlocksPerMultiprocessor``) and the device's per-SM
limits. If the device's compute capability is not the one asked for, its
records are added.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import limits

DTYPES = ("float32", "float64")
#: Where NVIDIA's tools come from when missing.
INSTALL_HINT = (
    'install NVIDIA\'s compiler tools from their pip wheels: pip install "numbattn[test]" '
    '(or: pip install "cuda-toolkit[nvcc,nvrtc,nvvm,nvdisasm,cuobjdump]==13.*", which gives '
    "nvidia-cuda-nvcc (ptxas), nvidia-cuda-nvdisasm, nvidia-cuda-cuobjdump, nvidia-nvvm "
    "and nvidia-cuda-nvrtc)"
)
FMA_OPS = frozenset({"FFMA", "DFMA"})
MMA_OPS = frozenset({"HMMA", "DMMA", "IMMA", "BMMA", "HGMMA", "IGMMA", "QGMMA", "BGMMA"})


class ReportError(RuntimeError):
    """The report cannot be made here (tools missing, simulator, ...)."""


# --------------------------------------------------------------------------
# Tools


def _find_binary(name: str) -> str | None:
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        path = find_nvidia_binary_utility(name)
        if path:
            return path
    except Exception:  # older cuda-pathfinder, or none
        pass
    path = shutil.which(name)
    if path:
        return path
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / name).is_file():
            return str(Path(root) / "bin" / name)
    return None


def find_tools(names=("ptxas", "nvdisasm")) -> dict[str, str]:
    """Paths of NVIDIA's binary tools; ReportError naming the pip packages if any is missing."""
    found = {n: _find_binary(n) for n in names}
    missing = [n for n, p in found.items() if not p]
    if missing:
        raise ReportError(f"{' and '.join(missing)} not found; {INSTALL_HINT}")
    return found  # type: ignore[return-value]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ReportError(
            f"{Path(cmd[0]).name} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()}"
        )
    return r


def tool_version(path: str) -> str:
    out = _run([path, "--version"]).stdout
    m = re.search(r"\bV(\d+(?:\.\d+)+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def _check_compiler() -> None:
    try:
        from numba import cuda
        from numba.cuda.core import config as ncfg
    except ImportError as exc:
        raise ReportError(
            f"numba-cuda is not installed ({exc}); pip install numba-cuda, then {INSTALL_HINT}"
        ) from exc
    if getattr(cuda, "implementation", None) != "NVIDIA":
        raise ReportError("numba.cuda is not numba-cuda; pip install numba-cuda")
    if ncfg.ENABLE_CUDASIM:
        raise ReportError(
            "the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1), which cannot compile kernels; "
            "run without it"
        )


# --------------------------------------------------------------------------
# ptxas and SASS parsing


def parse_ptxas(text: str) -> dict:
    """Resource usage of the (single) entry function in ``ptxas -v`` output."""
    start = text.find("Compiling entry function")
    block = text[start:] if start >= 0 else text

    def num(pattern: str) -> int:
        m = re.search(pattern, block)
        return int(m.group(1)) if m else 0

    if not re.search(r"Used \d+ registers", block):
        raise ReportError(f"cannot read ptxas -v output:\n{text}")
    return {
        "registers": num(r"Used (\d+) registers"),
        "local_bytes": num(r"(\d+) bytes stack frame"),
        "spill_bytes": num(r"(\d+) bytes spill stores"),
        "spill_load_bytes": num(r"(\d+) bytes spill loads"),
        "shared_bytes": num(r"(\d+) bytes smem"),
    }


@dataclass(frozen=True)
class Instr:
    offset: int  # byte offset in the function
    op: str  # opcode with modifiers, e.g. "LDS.128"
    text: str  # the whole instruction (predicate and operands)

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


_LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[\w$.]+):")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"`\(([^)]+)\)")


def parse_sass(text: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions of ``nvdisasm -c`` output and the index each label points at."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2)
        toks = body.split()
        if toks and toks[0].startswith("@"):
            toks = toks[1:]
        if toks:
            instrs.append(Instr(int(m.group(1), 16), toks[0], body))
    return instrs, labels


def _blocks(instrs: list[Instr], labels: dict[str, int]) -> tuple[list[int], list[list[int]]]:
    """Basic blocks of the SASS: (first instruction of each block, successor
    blocks of each). A block ends at a branch or EXIT, or before a label; a
    predicated branch or EXIT also falls through. Only BRA/JMP to a label
    are edges (WARPSYNC.COLLECTIVE and BSSY name labels, but do not jump)."""
    leaders = {0, *labels.values()}
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "JMP", "EXIT", "RET", "BRX", "JMX"):
            leaders.add(i + 1)
    firsts = sorted(x for x in leaders if x < len(instrs))
    block_of = {f: b for b, f in enumerate(firsts)}
    succ: list[list[int]] = []
    for b in range(len(firsts)):
        last = (firsts[b + 1] if b + 1 < len(firsts) else len(instrs)) - 1
        ins = instrs[last]
        cond = ins.text.startswith("@")
        out = []
        if ins.base in ("BRA", "JMP"):
            m = _TARGET.search(ins.text)
            if m and m.group(1) in labels and labels[m.group(1)] in block_of:
                out.append(block_of[labels[m.group(1)]])
        if (ins.base not in ("BRA", "JMP", "EXIT", "RET", "BRX", "JMX") or cond) and b + 1 < len(
            firsts
        ):
            out.append(b + 1)
        succ.append(out)
    return firsts, succ


def _dominators(succ: list[list[int]]) -> list[int]:
    """Immediate dominator of each block reachable from block 0 (-1: unreachable),
    by the iterative algorithm of Cooper, Harvey and Kennedy."""
    n = len(succ)
    order: list[int] = []
    seen = [False] * n
    stack = [(0, 0)]
    seen[0] = True
    while stack:  # iterative DFS: post-order
        b, k = stack.pop()
        if k < len(succ[b]):
            stack.append((b, k + 1))
            c = succ[b][k]
            if not seen[c]:
                seen[c] = True
                stack.append((c, 0))
        else:
            order.append(b)
    rpo = order[::-1]
    index = {b: x for x, b in enumerate(rpo)}
    preds: list[list[int]] = [[] for _ in range(n)]
    for b in rpo:
        for c in succ[b]:
            preds[c].append(b)
    idom = [-1] * n
    idom[0] = 0
    changed = True
    while changed:
        changed = False
        for b in rpo[1:]:
            new = -1
            for p in preds[b]:
                if idom[p] < 0:
                    continue
                if new < 0:
                    new = p
                    continue
                x, y = p, new
                while x != y:
                    while index[x] > index[y]:
                        x = idom[x]
                    while index[y] > index[x]:
                        y = idom[y]
                new = x
            if new != idom[b]:
                idom[b] = new
                changed = True
    return idom


def find_loops(instrs: list[Instr], labels: dict[str, int]) -> list[list[int]]:
    """Natural loops of the SASS, each as the sorted indices of its
    instructions. A branch from block B back to a block H that dominates B
    closes a loop: H and every block that reaches B without passing H (the
    loops with one head are one loop). A loop's blocks need not be
    contiguous: ptxas places cold paths (e.g. the WARPSYNC.COLLECTIVE
    fallbacks of warp shuffles) after the function's end, and they count
    where they branch back into the loop; code laid out between a loop's
    blocks that never returns to it (another loop) does not. The
    self-branch after EXIT is no loop (unreachable)."""
    if not instrs:
        return []
    firsts, succ = _blocks(instrs, labels)
    idom = _dominators(succ)
    preds: list[list[int]] = [[] for _ in succ]
    for b, out in enumerate(succ):
        for c in out:
            preds[c].append(b)

    def dominates(h: int, b: int) -> bool:
        while True:
            if b == h:
                return True
            if b == 0 or idom[b] < 0:
                return False
            b = idom[b]

    bodies: dict[int, set[int]] = {}
    for b, out in enumerate(succ):
        if idom[b] < 0:
            continue
        for h in out:
            if dominates(h, b):
                body = bodies.setdefault(h, {h})
                stack = [b]
                while stack:
                    x = stack.pop()
                    if x not in body:
                        body.add(x)
                        stack.extend(preds[x])
    ends = firsts[1:] + [len(instrs)]
    loops = [
        sorted(i for b in body for i in range(firsts[b], ends[b]))
        for _, body in sorted(bodies.items())
    ]
    return sorted(loops, key=lambda lp: (lp[0], -len(lp)))


def _ranges(instrs: list[Instr], idx: list[int]) -> list[list[str]]:
    """Contiguous runs of the instructions idx, as [first, last] offsets."""
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [[f"{instrs[a].offset:#06x}", f"{instrs[b].offset:#06x}"] for a, b in runs]


def count(instrs: list[Instr]) -> dict:
    """Instruction mix of a stretch of SASS (NOPs not counted)."""
    ops = [i for i in instrs if i.base != "NOP"]
    n = len(ops)
    fma = sum(i.base in FMA_OPS for i in ops)
    mma = sum(i.base in MMA_OPS for i in ops)
    lds = [i for i in ops if i.base == "LDS"]
    return {
        "instructions": n,
        "fma": fma,
        "mma": mma,
        "fma_share": round(fma / n, 4) if n else 0.0,
        "shared_loads": len(lds),
        "shared_loads_vector": sum(
            any(m in ("64", "128") for m in i.op.split(".")[1:]) for i in lds
        ),
        "shared_stores": sum(i.base == "STS" for i in ops),
        "global_loads": sum(i.base in ("LDG", "LD") for i in ops),
        "global_loads_128": sum(
            i.base in ("LDG", "LD") and "128" in i.op.split(".")[1:] for i in ops
        ),
        "local_accesses": sum(i.base in ("LDL", "STL") for i in ops),
        "mufu": sum(i.base == "MUFU" for i in ops),
        "barriers": sum(i.base == "BAR" for i in ops),
        "shuffles": sum(i.base == "SHFL" for i in ops),
        "mma_kinds": dict(sorted(Counter(i.op for i in ops if i.base in MMA_OPS).items())),
    }


def mma_lane_work(op: str) -> int:
    """Multiply-adds a lane's share of one tensor-core instruction does, from
    its shape: ``HMMA.1688.F32.TF32`` and ``DMMA.16x8x8`` 16*8*8/32 = 32,
    ``DMMA.884`` 8. 32 where the shape is not spelled."""
    parts = op.split(".")
    shape = parts[1] if len(parts) > 1 else ""
    # "16x8x8"; or digits: "884" (m8n8k4), "1688" (m16n8k8), "16816" (m16n8k16)
    splits = {3: (1, 2), 4: (2, 3), 5: (2, 3)}
    if "x" in shape:
        dims = shape.split("x")
    elif shape.isdigit() and len(shape) in splits:
        i, j = splits[len(shape)]
        dims = [shape[:i], shape[i:j], shape[j:]]
    else:
        return 32
    try:
        m, n, k = (int(x) for x in dims)
    except ValueError:
        return 32
    return max(1, m * n * k // 32)


def hottest_loop(instrs: list[Instr], labels: dict[str, int]) -> dict | None:
    """The loop with the most multiply-adds (FMA instructions, and each MMA
    weighted by its multiply-adds a lane: :func:`mma_lane_work`; nested
    loops counted in it); on a tie the outermost, then the first. In the fused attention
    kernel that is the loop over key tiles that holds both products
    unrolled: the fast loop over interior key tiles of the float32 kernel
    (its boundary tiles run a second loop whose products are not unrolled),
    the key-tile loop of the float64 tensor-core kernel."""
    loops = find_loops(instrs, labels)
    if not loops:
        return None

    def work(lp):
        ops = [instrs[i] for i in lp]
        c = count(ops)
        return c["fma"] + sum(mma_lane_work(i.op) for i in ops if i.base in MMA_OPS)

    best = max(loops, key=lambda lp: (work(lp), len(lp), -lp[0]))
    members = set(best)
    out = count([instrs[i] for i in best])
    out["start"] = f"{instrs[best[0]].offset:#06x}"
    out["end"] = f"{instrs[best[-1]].offset:#06x}"
    out["ranges"] = _ranges(instrs, best)
    out["nested"] = [
        dict(
            count([instrs[i] for i in lp]),
            start=f"{instrs[lp[0]].offset:#06x}",
            end=f"{instrs[lp[-1]].offset:#06x}",
            ranges=_ranges(instrs, lp),
        )
        for lp in loops
        if lp is not best and members.issuperset(lp)
    ]
    return out


# --------------------------------------------------------------------------
# Compilation


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


@contextmanager
def _device_functions_for(cc: str):
    """numba-cuda 0.30 compiles the device functions a kernel calls (the
    fused attention kernel's unrolled products) for the current device's
    compute capability, even under ``compile_ptx(cc=...)``, and fails
    without a GPU: answer with the target's while compiling."""
    from types import SimpleNamespace

    from numba.cuda import dispatcher as disp

    saved = disp.get_current_device
    disp.get_current_device = lambda: SimpleNamespace(compute_capability=_cc_tuple(cc))
    try:
        yield
    finally:
        disp.get_current_device = saved


def compile_ptx(dispatcher, signature: str, cc: str) -> str:
    """PTX of ``dispatcher`` for ``signature``, with the options it compiles with."""
    from numba import cuda

    opts = {
        k: v
        for k, v in getattr(dispatcher, "targetoptions", {}).items()
        if k in ("debug", "lineinfo", "fastmath", "opt", "launch_bounds")
    }
    try:
        with _device_functions_for(cc):
            ptx, _ = cuda.compile_ptx(dispatcher.py_func, signature, cc=_cc_tuple(cc), **opts)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        if re.search(r"nvvm|nvrtc|DynamicLib|libdevice", msg, re.I):
            raise ReportError(f"numba-cuda cannot compile: {msg}; {INSTALL_HINT}") from exc
        raise
    return ptx


def _static_record(launch: dict, dtype: str, cc: str, tools: dict, work: Path) -> dict:
    target = "sm_" + cc.replace(".", "")
    path = launch.get("path", "hardware")
    suffix = "" if path == "hardware" else "_" + path
    stem = work / f"{launch['kernel']}_{dtype}_{target}{suffix}"
    ptx_path, cubin, sass_path = (stem.with_suffix(s) for s in (".ptx", ".cubin", ".sass"))
    ptx_path.write_text(compile_ptx(launch["dispatcher"], launch["signature"], cc))
    res = parse_ptxas(
        _run([tools["ptxas"], f"-arch={target}", "-v", "-o", str(cubin), str(ptx_path)]).stderr
    )
    sass = _run([tools["nvdisasm"], "-c", str(cubin)]).stdout
    sass_path.write_text(sass)
    instrs, labels = parse_sass(sass)
    threads = launch["threads"]
    rec = {
        "kernel": launch["kernel"],
        "dtype": dtype,
        "path": path,
        "cc": cc,
        "target": target,
        "threads_per_block": threads,
        "geometry": launch["geometry"],
        **res,
    }
    if cc in limits.SM_LIMITS:
        rec.update(limits.blocks_per_sm(cc, threads, res["registers"], res["shared_bytes"]))
    else:
        rec.update(blocks_per_sm=None, warps_per_sm=None, occupancy=None, limited_by=[])
    rec["sass_instructions"] = sum(i.base != "NOP" for i in instrs)
    rec["inner_loop"] = hottest_loop(instrs, labels)
    rec["ptxas"] = tools.get("ptxas_version")
    return rec


def _launches(cc: str, kernels: tuple[str, ...] | None = None) -> list[tuple[str, dict]]:
    """The backend's launches as built for ``cc`` (its tensor-core step depends on it)."""
    from . import backend

    target = _cc_tuple(cc)
    return [
        (dt, launch)
        for dt in DTYPES
        for launch in backend.kernel_launches(np.dtype(dt), target)
        if kernels is None or launch["kernel"] in kernels
    ]


def current_device() -> dict | None:
    """Name, compute capability and per-SM limits of the current GPU; None without one."""
    from . import backend

    if backend.cuda_problem() is not None:
        return None
    from numba import cuda

    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    info: dict[str, Any] = {"name": name, "cc": "{}.{}".format(*dev.compute_capability)}
    attrs = {
        "threads": "MAX_THREADS_PER_MULTIPROCESSOR",
        "blocks": "MAX_BLOCKS_PER_MULTIPROCESSOR",
        "regs": "MAX_REGISTERS_PER_MULTIPROCESSOR",
        "shared": "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR",
        "shared_per_block_optin": "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN",
        "reserved_shared_per_block": "RESERVED_SHARED_MEMORY_PER_BLOCK",
    }
    sm: dict[str, int | None] = {}
    for key, attr in attrs.items():
        try:
            sm[key] = int(getattr(dev, attr))
        except Exception:  # attribute unknown to this numba-cuda
            sm[key] = None
    info["sm_limits"] = sm
    return info


def _device_facts(launch: dict, device: dict) -> dict:
    """What the driver reports for the kernel numba-cuda compiled for this device."""
    from numba import cuda

    compiled = launch["dispatcher"].compile(launch["signature"])
    facts = dict(device)
    for key, attr in (
        ("registers", "regs_per_thread"),
        ("shared_bytes", "shared_mem_per_block"),
        ("local_bytes", "local_mem_per_thread"),
        ("max_threads_per_block", "max_threads_per_block"),
    ):
        facts[key] = int(getattr(compiled, attr))
    try:
        func = compiled._codelibrary.get_cufunc()
        ctx = cuda.current_context()
        blocks = ctx.get_active_blocks_per_multiprocessor(func, launch["threads"], 0)
        facts["blocks_per_sm"] = int(blocks[-1] if isinstance(blocks, tuple) else blocks)
    except Exception as exc:  # private API of other numba-cuda versions
        facts["blocks_per_sm"] = f"unknown ({type(exc).__name__}: {exc})"
    return facts


def report(
    cc: str = "9.0",
    save_dir: str | os.PathLike | None = None,
    device=True,
    kernels: tuple[str, ...] | None = None,
) -> list[dict]:
    """One record per compiled kernel variant (see the module docstring).

    ``save_dir``: keep each variant's PTX, cubin and SASS there
    (``<kernel>_<dtype>_sm_XY.{ptx,cubin,sass}``). ``device``: also cover
    the current GPU when one is usable. ``kernels``: only these kernels.
    """
    cc = limits.cc_key(cc)
    _check_compiler()
    tools = find_tools()
    tools["ptxas_version"] = tool_version(tools["ptxas"])
    with tempfile.TemporaryDirectory(prefix="numbattn-gpu-report-") as tmp:
        work = Path(save_dir) if save_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        launches = _launches(cc, kernels)
        records = [_static_record(la, dt, cc, tools, work) for dt, la in launches]
        dev = current_device() if device else None
        if dev is not None:
            dev_launches = launches
            if dev["cc"] != cc:
                dev_launches = _launches(dev["cc"], kernels)
                records += [
                    _static_record(la, dt, dev["cc"], tools, work) for dt, la in dev_launches
                ]
            by_key = {(r["kernel"], r["dtype"], r["path"], r["cc"]): r for r in records}
            for dt, la in dev_launches:
                key = (la["kernel"], dt, la.get("path", "hardware"), dev["cc"])
                by_key[key]["device"] = _device_facts(la, dev)
    return records


# --------------------------------------------------------------------------
# Plain output

_COLUMNS = [
    ("kernel", "kernel", "{}"),
    ("dtype", "dtype", "{}"),
    ("path", "path", "{}"),
    ("cc", "cc", "{}"),
    ("threads", "threads_per_block", "{}"),
    ("regs", "registers", "{}"),
    ("spill", "spill_bytes", "{}"),
    ("local", "local_bytes", "{}"),
    ("smem", "shared_bytes", "{}"),
    ("blk/SM", "blocks_per_sm", "{}"),
    ("warps/SM", "warps_per_sm", "{}"),
]
_LOOP_COLUMNS = [
    ("loop instr", "instructions", "{}"),
    ("fma", "fma", "{}"),
    ("mma", "mma", "{}"),
    ("fma%", "fma_share", "{:.1%}"),
    ("lds", "shared_loads", "{}"),
    ("lds.v", "shared_loads_vector", "{}"),
    ("ldg.128", "global_loads_128", "{}"),
    ("bar", "barriers", "{}"),
]


def table(records: list[dict]) -> str:
    """The records as an aligned text table, one line per variant, then notes."""
    head = [c[0] for c in _COLUMNS + _LOOP_COLUMNS]
    rows = []
    for r in records:
        row = [fmt.format(r[key]) if r[key] is not None else "-" for _, key, fmt in _COLUMNS]
        loop = r.get("inner_loop") or {}
        row += [fmt.format(loop[key]) if key in loop else "-" for _, key, fmt in _LOOP_COLUMNS]
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        "regs: registers per thread; spill: bytes of spill stores; local: stack frame bytes; "
        "smem: static shared bytes per block;"
    )
    lines.append(
        "loop: static SASS counts of the hottest loop's body (nested loops included); "
        "fma: FFMA/DFMA, mma: HMMA/DMMA/GMMA, lds.v: LDS.64/.128, ldg.128: 16-byte "
        "global loads, bar: BAR."
    )
    ptxas = {r.get("ptxas") for r in records}
    lines.append(f"ptxas {', '.join(sorted(str(p) for p in ptxas))}; occupancy limited by:")
    for r in records:
        lines.append(
            f"  {r['kernel']} {r['dtype']} {r['path']} {r['cc']}: "
            f"{', '.join(r['limited_by']) or '-'} "
            f"(occupancy {r['occupancy']})"
        )
    devs = [r for r in records if "device" in r]
    if devs:
        d = devs[0]["device"]
        lines.append("")
        lines.append(f"device: {d['name']} (compute capability {d['cc']}), as the driver reports:")
        for r in devs:
            f = r["device"]
            lines.append(
                f"  {r['kernel']} {r['dtype']} {r['path']}: {f['registers']} registers, "
                f"{f['shared_bytes']} shared bytes, {f['local_bytes']} local bytes, "
                f"at most {f['max_threads_per_block']} threads per block, "
                f"{f['blocks_per_sm']} blocks per SM"
            )
    return "\n".join(lines)
