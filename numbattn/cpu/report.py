"""Static facts about numbattn's CPU hot loops: ``python -m numbattn cpu-report``.

For each named CPU (an LLVM CPU name; ``host`` is this machine) the hot
loops are compiled as that CPU's code, with no such CPU needed, and their
steady state is simulated by LLVM's ``llvm-mca`` with that CPU's scheduling
model. Each CPU is compiled in a fresh Python process with
``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES`` set (and a throw-away
``NUMBA_CACHE_DIR``): numbattn reads the target's features when it is
imported to choose the micro-kernel's vector width and register block
(:func:`numbattn.cpu.kernels._vector_shape`), so re-targeting the host's
LLVM IR would keep the host's choices; a fresh process makes both Numba's
code generation and numbattn's own choices those of the named CPU. The
features given are the few numbattn branches on (:data:`FEATURES`); LLVM
adds the rest of the CPU's features and its tuning.

The loops (:data:`LOOPS`, float32, each helper compiled at the signature the
kernels call it with):

``microkernel``
    :func:`~numbattn.cpu.kernels._gemm` (S = Q Kt, O += P V of the fused
    forward): the innermost loop with 4 x (vectors per row) FMA accumulators,
    the full register block's k loop.
``exp``
    :func:`~numbattn.cpu.kernels._exp_scaled_inplace`, the forward's
    exp-and-sum row pass; ``softmax_exp``: :func:`~numbattn.cpu.kernels._exp_shift`,
    softmax's. The innermost loop with the most packed (SIMD) instructions.
``pack_kt``
    :func:`~numbattn.cpu.kernels._pack_transposed`, the K tile packed
    transposed: the longest innermost loop of that function itself (four
    keys per pass; its strided fallback is a callee).
``decode_scores``, ``decode_pv``
    :func:`~numbattn.cpu.kernels._scores_pair` and
    :func:`~numbattn.cpu.kernels._pv_pair`, the decode kernel's streaming
    loops over K and V (the innermost loop with the most FMAs).

A loop is a backward branch in the assembly and the instructions from its
target label to it; innermost: containing no other. One record per
(CPU, loop), with

``cpu``, ``loop``, ``function``, ``vector_shape``
    The CPU name (``host``: what LLVM calls this machine, in ``llvm_cpu``),
    the loop, the Numba helper, and numbattn's (bytes per vector, vectors
    per row of the micro-kernel's 4-row block) for that CPU.
``instructions``, ``fma``, ``accumulators``, ``vector_bits``, ``spills``
    Static counts of the loop body: instructions, FMAs (``vfmadd``...),
    distinct FMA destination registers, the widest register of its packed
    instructions (512 = zmm, 256 = ymm, 128 = xmm, 0 = scalar only) and
    instructions that touch the stack (``(%rsp)`` / ``(%rbp)``: spills
    and reloads).
``cycles``, ``uops``, ``block_rthroughput``, ``bottleneck``
    ``llvm-mca -mcpu=CPU``: cycles and micro-ops per iteration in the steady
    state (1000 iterations; caches always hit), the throughput bound of the
    block from its resources alone, and what bounds it: the busiest
    execution resource (name and cycles per iteration) when it takes at
    least 90 % of the cycles, ``dispatch`` when the front end's width does,
    else ``latency`` (a dependency chain: loop-carried FMAs, or a chain
    through memory).
``flops``, ``flops_per_cycle``, ``peak_flops_per_cycle``, ``of_peak``
    Floating-point operations per iteration (an FMA counts 2 per lane;
    add, sub, mul, div, min, max 1), their rate at ``cycles``, the CPU's
    float32 FMA peak (:data:`PEAKS`: 2 x lanes x FMA pipes) and the ratio.
``mca_peak_flops_per_cycle``
    What llvm-mca's model of the CPU gives for 16 independent FMAs of the
    loop's width: the model's own ceiling, a check of :data:`PEAKS`.

Reading the numbers
-------------------
llvm-mca simulates the out-of-order core only: every load hits L1, no
prefetcher, no frequency. A loop that is fast in the model can still be
bound by memory (decode is: it reads K and V once), and one bound by
``latency`` needs more independent chains (accumulators), not fewer
instructions. For the micro-kernel the issue is whether the 4-row register
block feeds the FMA pipes: ``accumulators`` must reach FMA latency x FMA
pipes (4 cycles x 2 = 8 on the CPUs of :data:`PEAKS` from Skylake and Zen 2
on; 5 x 2 = 10 on Haswell and Broadwell) and the broadcasts and B loads
must not take the FMA pipes' issue slots.

The models are not the hardware everywhere: llvm-mca 19 schedules ``znver5``
with its ``znver4`` model (256-bit FMA pipes), and its ``sapphirerapids``
model issues 512-bit FP operations on port 0 only (``mca peak`` 32 FLOP per
cycle where Intel's two 512-bit FMA units, ports 0 and 5, give 64). For
those CPUs ``cycles`` of FMA-bound loops are an upper bound; ``of_peak``
is always against :data:`PEAKS`. What the report says about the forward's
gap to torch on Intel (Emerald Rapids): ``docs/cpu.md``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

#: The CPUs reported by default.
DEFAULT_CPUS = ("sapphirerapids", "znver4", "znver5", "haswell", "host")

_AVX512 = "+avx512f,+avx512vl,+avx512bw,+avx512dq,+avx2,+fma,+avx"
_AVX2 = "-avx512f,+avx2,+fma,+avx"
#: ``NUMBA_CPU_FEATURES`` per LLVM CPU name: the features numbattn's
#: compile-time choices read (AVX-512 or AVX2); LLVM adds the CPU's others.
FEATURES = {
    "haswell": _AVX2,
    "broadwell": _AVX2,
    "skylake": _AVX2,
    "alderlake": _AVX2,
    "znver2": _AVX2,
    "znver3": _AVX2,
    "skylake-avx512": _AVX512,
    "cascadelake": _AVX512,
    "icelake-server": _AVX512,
    "sapphirerapids": _AVX512,
    "emeraldrapids": _AVX512,
    "graniterapids": _AVX512,
    "znver4": _AVX512,
    "znver5": _AVX512,
}


@dataclass(frozen=True)
class Peak:
    """A CPU's FMA throughput: ``pipes`` FMA pipes that each retire one FMA
    of ``bits`` width per cycle (a wider op takes several pipes)."""

    pipes: int
    bits: int
    source: str

    def fp32_fma_per_cycle(self) -> int:
        return self.pipes * self.bits // 32


#: float32 FMA peaks (vendor optimisation manuals). llvm-mca 19's models agree
#: (``mca_peak_flops_per_cycle``) except sapphirerapids at 512 bits (port 0
#: only: 32) and znver5 (scheduled as znver4: 32).
PEAKS = {
    "haswell": Peak(2, 256, "Intel SDM vol. 1 / optimization manual: FMA on ports 0 and 1"),
    "broadwell": Peak(2, 256, "as haswell"),
    "skylake": Peak(2, 256, "ports 0 and 1"),
    "alderlake": Peak(2, 256, "Golden Cove core without AVX-512: ports 0 and 1"),
    "skylake-avx512": Peak(2, 512, "Xeon with two 512-bit FMA units: port 0+1 fused, port 5"),
    "cascadelake": Peak(2, 512, "as skylake-avx512"),
    "icelake-server": Peak(2, 512, "as skylake-avx512"),
    "sapphirerapids": Peak(2, 512, "Golden Cove server: 512-bit FMA on port 0+1 and port 5"),
    "emeraldrapids": Peak(2, 512, "as sapphirerapids (same core)"),
    "graniterapids": Peak(2, 512, "Redwood Cove server: as sapphirerapids"),
    "znver2": Peak(2, 256, "AMD Zen 2: FMA on FP0 and FP1, 256-bit"),
    "znver3": Peak(2, 256, "AMD Zen 3: FMA on FP0 and FP1, 256-bit"),
    "znver4": Peak(2, 256, "AMD Zen 4: two 256-bit FMA pipes; a 512-bit op takes both"),
    "znver5": Peak(2, 512, "AMD Zen 5 (desktop/server): two 512-bit FMA pipes"),
}


@dataclass(frozen=True)
class Loop:
    name: str
    function: str  # attribute of numbattn.cpu.kernels
    rule: str  # "fma": most FMAs; "simd": most packed instructions
    what: str


LOOPS = (
    Loop("microkernel", "_gemm", "block", "forward micro-kernel (register block, k loop)"),
    Loop("exp", "_exp_scaled_inplace", "simd", "forward exp + row sum"),
    Loop("softmax_exp", "_exp_shift", "simd", "softmax exp + row sum"),
    Loop("pack_kt", "_pack_transposed", "own", "K tile packed transposed, 4 keys per pass"),
    Loop("decode_scores", "_scores_pair", "fma", "decode q . k over the K cache"),
    Loop("decode_pv", "_pv_pair", "fma", "decode o += p v over the V cache"),
)


class ReportError(RuntimeError):
    """The report cannot be made here (no llvm-mca, an unknown CPU, a failed compile)."""


def signatures() -> dict:
    """Numba signature (a tuple of types) of each loop's helper, float32, as
    the attention, softmax and decode kernels call it."""
    from numba import types

    f32 = types.float32
    i64 = types.int64
    c1 = types.Array(f32, 1, "C")
    c2 = types.Array(f32, 2, "C")
    a4 = types.Array(f32, 4, "A", readonly=True)
    stream = (c2, i64, i64, a4, i64, i64, i64, i64, i64, c2, i64, i64, i64)
    return {
        "microkernel": (c2, c2, c2, i64, i64, i64, i64, i64, types.literal(False)),
        "exp": (c1, i64, f32, f32),
        "softmax_exp": (c1, c1, i64, f32),
        "pack_kt": (a4, i64, i64, i64, i64, c2),
        "decode_scores": stream,
        "decode_pv": stream,
    }


def _worker() -> None:
    """In the child process: compile each loop's helper for the CPU of the
    environment and print {loop: asm} and the vector shape as JSON."""
    from numbattn.cpu import kernels as K

    out: dict = {"vector_shape": [K._VBYTES, K._NV], "asm": {}}
    sigs = signatures()
    for loop in LOOPS:
        disp = getattr(K, loop.function)
        disp.compile(sigs[loop.name])
        out["asm"][loop.name] = disp.inspect_asm(sigs[loop.name])
    import llvmlite.binding as ll
    from numba.core import config

    out["llvm_cpu"] = config.CPU_NAME or ll.get_host_cpu_name()
    json.dump(out, sys.stdout)


def llvm_cpu_name(cpu: str) -> str:
    """The LLVM name of ``cpu`` (``host``: this machine's)."""
    if cpu != "host":
        return cpu
    import llvmlite.binding as ll

    return ll.get_host_cpu_name()


def compile_asm(cpu: str) -> dict:
    """{'vector_shape', 'llvm_cpu', 'asm': {loop: text}} of the loops compiled
    for ``cpu`` in a fresh process (see the module doc)."""
    import numbattn

    env = dict(os.environ)
    for var in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_DISABLE_JIT"):
        env.pop(var, None)
    if cpu != "host":
        if cpu not in FEATURES:
            raise ReportError(f"unknown CPU {cpu!r}; known: host, {', '.join(sorted(FEATURES))}")
        env["NUMBA_CPU_NAME"] = cpu
        env["NUMBA_CPU_FEATURES"] = FEATURES[cpu]
    root = os.path.dirname(os.path.dirname(os.path.abspath(numbattn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="numbattn-cpu-report-") as cache:
        env["NUMBA_CACHE_DIR"] = cache
        proc = subprocess.run(
            [sys.executable, "-c", "from numbattn.cpu.report import _worker; _worker()"],
            env=env,
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise ReportError(f"compiling for {cpu} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------
# Assembly


_LABEL = re.compile(r"^([.\w$]+):")
_JUMP = re.compile(r"^\s*(j[a-z]+)\s+([.\w$]+)\s*$")
_REG = re.compile(r"%([xyz])mm(\d+)")
_WIDTH = {"x": 128, "y": 256, "z": 512}
_FMA = re.compile(r"^v?f(n?)m(add|sub)")
_FLOP = re.compile(r"^v(add|sub|mul|div|min|max)(p|s)(s|d)$")


def _instructions(asm: str) -> list[str]:
    """Labels and instructions of ``asm`` (AT&T), comments and directives dropped."""
    out = []
    for raw in asm.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        s = line.strip()
        if not s or (s.startswith(".") and not _LABEL.match(s)):
            continue
        out.append(s)
    return out


def find_loops(asm: str) -> list[tuple[list[str], bool, str]]:
    """The innermost loops of ``asm``: for each backward jump, the lines from
    its target label to the jump, keeping those that contain no other; each
    with whether its function keeps a frame pointer in %rbp, and the
    function's (mangled) name."""
    lines = _instructions(asm)
    starts = [i for i, s in enumerate(lines) if _LABEL.match(s) and not s.startswith(".L")]
    loops = []
    for f0, f1 in zip(starts, starts[1:] + [len(lines)]):
        fn = lines[f0:f1]
        frame = any(re.match(r"movq\s+%rsp,\s*%rbp$", s) for s in fn)
        where = {}
        for i, s in enumerate(fn):
            m = _LABEL.match(s)
            if m:
                where[m.group(1)] = i
        spans = []
        for i, s in enumerate(fn):
            m = _JUMP.match(s)
            if m and m.group(2) in where and where[m.group(2)] < i:
                spans.append((where[m.group(2)], i))
        loops += [
            (fn[a : b + 1], frame, fn[0][:-1])
            for a, b in spans
            if not any((c, d) != (a, b) and a <= c and d <= b for c, d in spans)
        ]
    return loops


def _mnemonic(s: str) -> str:
    return s.split(None, 1)[0]


def _packed(s: str) -> bool:
    """A SIMD instruction on more than one lane (not a scalar ss/sd op)."""
    mn = _mnemonic(s)
    if not mn.startswith("v") or mn.endswith(("ss", "sd")) or "ss2" in mn or "sd2" in mn:
        return False
    return bool(_REG.search(s))


def count(loop: list[str], frame_pointer: bool = False) -> dict:
    """Static counts of a loop body (see the module doc); ``frame_pointer``:
    the function addresses its stack frame through %rbp (else %rbp may be
    an ordinary pointer register)."""
    ins = [s for s in loop if not _LABEL.match(s)]
    fma = [s for s in ins if _FMA.match(_mnemonic(s))]
    packed = [s for s in ins if _packed(s)]
    width = max((_WIDTH[r] for s in packed for r, _ in _REG.findall(s)), default=0)
    flops = 0
    for s in ins:
        mn = _mnemonic(s)
        regs = _REG.findall(s)
        bits = max((_WIDTH[r] for r, _ in regs), default=128)
        m = _FLOP.match(mn)
        if _FMA.match(mn):
            esz = 64 if mn.endswith("d") else 32
            flops += 2 * (bits // esz if mn[-2] == "p" else 1)
        elif m:
            esz = 64 if m.group(3) == "d" else 32
            flops += bits // esz if m.group(2) == "p" else 1
    dests = {s.rsplit(",", 1)[-1].strip() for s in fma}
    return {
        "instructions": len(ins),
        "fma": len(fma),
        "accumulators": len(dests),
        "simd": len(packed),
        "vector_bits": width,
        "spills": sum(1 for s in ins if "(%rsp" in s or (frame_pointer and "(%rbp" in s)),
        "flops": flops,
    }


def hot_loop(
    asm: str, rule: str, function: str = "", block: int = 0
) -> tuple[list[str], bool] | None:
    """The innermost loop with the most FMA accumulators x vector width
    (``rule`` "fma"; "block": among loops with ``block`` accumulators, the
    micro-kernel's full register block, if any), the most packed instructions ("simd"; ties: the
    widest, then the longest) or the most instructions among the loops of
    ``function`` itself, not its callees ("own": a scalar copy loop)."""
    best, key = None, None
    own = f"{len(function)}{function}B"  # Numba's mangling: <len><name>B<...>
    for loop, frame, fname in find_loops(asm):
        if rule == "own" and not (fname.startswith("_ZN8numbattn") and own in fname):
            continue
        c = count(loop, frame)
        k: tuple
        if rule == "block":
            k = (c["accumulators"] == block, c["vector_bits"], c["fma"], c["instructions"])
        elif rule == "fma":
            k = (c["accumulators"] * max(c["vector_bits"], 32), c["flops"], c["instructions"])
        elif rule == "simd":
            k = (c["vector_bits"] > 0, c["simd"], c["vector_bits"], c["instructions"])
        else:
            k = (c["instructions"],)
        if key is None or k > key:
            best, key = (loop, frame), k
    return best


# ---------------------------------------------------------------------------
# llvm-mca


def find_mca() -> str | None:
    """The llvm-mca to use: $LLVM_MCA, else llvm-mca-19, else llvm-mca."""
    for name in (os.environ.get("LLVM_MCA"), "llvm-mca-19", "/usr/lib/llvm-19/bin/llvm-mca"):
        if name and shutil.which(name):
            return shutil.which(name)
    return shutil.which("llvm-mca")


def mca_version(mca: str) -> str:
    out = subprocess.run([mca, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"LLVM version ([\d.]+)", out)
    return m.group(1) if m else "?"


def mca(body: list[str], cpu: str, tool: str, iterations: int = 1000) -> dict:
    """llvm-mca's steady state of a loop body on ``cpu``: cycles, uops and
    block throughput per iteration, and the bottleneck (module doc)."""
    text = "\n".join(s if _LABEL.match(s) else "\t" + s for s in body) + "\n"
    proc = subprocess.run(
        [tool, "-mtriple=x86_64-unknown-linux-gnu", f"-mcpu={cpu}", f"-iterations={iterations}",
         "-json"],
        input=text,
        capture_output=True,
        text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise ReportError(f"llvm-mca -mcpu={cpu} failed: {proc.stderr.strip()[-2000:]}")
    doc = json.loads(proc.stdout)
    region = doc["CodeRegions"][0]
    summary = region["SummaryView"]
    n = len(region["Instructions"])
    names = doc["TargetInfo"]["Resources"]
    usage = [0.0] * len(names)
    for e in region["ResourcePressureView"]["ResourcePressureInfo"]:
        if e["InstructionIndex"] < n:
            usage[e["ResourceIndex"]] += e["ResourceUsage"]
    iters = summary["Iterations"]
    cycles = summary["TotalCycles"] / iters
    uops = summary["TotaluOps"] / iters
    top = max(range(len(names)), key=usage.__getitem__) if names else None
    dispatch = uops / summary["DispatchWidth"]
    if top is not None and usage[top] >= 0.9 * cycles and usage[top] >= dispatch:
        bottleneck = f"{_resource(names[top])} ({usage[top]:.1f})"
    elif dispatch >= 0.9 * cycles:
        bottleneck = f"dispatch ({dispatch:.1f})"
    else:
        bottleneck = "latency"
    return {
        "cycles": round(cycles, 2),
        "uops": round(uops, 2),
        "block_rthroughput": summary["BlockRThroughput"],
        "bottleneck": bottleneck,
        "resource_pressure": {
            _resource(names[i]): round(u, 2) for i, u in enumerate(usage) if u > 0
        },
    }


def _resource(name: str) -> str:
    """A resource name as llvm-mca prints it (unit index after a dot)."""
    base, _, unit = name.partition(".")
    return f"{base}.{ord(unit)}" if len(unit) == 1 and not unit.isprintable() else name


def mca_peak(cpu: str, bits: int, tool: str) -> float:
    """FLOPs per cycle llvm-mca's model gives 16 independent float32 FMAs of
    ``bits`` width (register operands only)."""
    reg = {512: "zmm", 256: "ymm", 128: "xmm"}[bits]
    body = [f"vfmadd231ps %{reg}16, %{reg}17, %{reg}{i}" for i in range(16)]
    return 2 * 16 * (bits // 32) / mca(body, cpu, tool)["cycles"]


def report(cpus=DEFAULT_CPUS, tool: str | None = None) -> list[dict]:
    """One record per (CPU, loop); see the module doc for the fields."""
    tool = tool or find_mca()
    if tool is None:
        raise ReportError(
            "llvm-mca not found (Debian/Ubuntu: apt-get install llvm-19; or set LLVM_MCA)"
        )
    cpus = list(dict.fromkeys(cpus))
    for cpu in cpus:
        if cpu != "host" and cpu not in FEATURES:
            raise ReportError(f"unknown CPU {cpu!r}; known: host, {', '.join(sorted(FEATURES))}")
    with ThreadPoolExecutor(max_workers=max(1, min(len(cpus), os.cpu_count() or 1))) as pool:
        compiled = dict(zip(cpus, pool.map(compile_asm, cpus)))
    version = mca_version(tool)
    records = []
    for cpu in cpus:
        got = compiled[cpu]
        name = got["llvm_cpu"] if cpu == "host" else cpu
        peak = PEAKS.get(name)
        peak_flops = 2 * peak.fp32_fma_per_cycle() if peak else None
        model_peak: dict = {}
        for loop in LOOPS:
            block = 4 * got["vector_shape"][1]
            hot = hot_loop(got["asm"][loop.name], loop.rule, loop.function, block)
            rec: dict = {
                "cpu": cpu,
                "label": f"host={name}" if cpu == "host" else name,
                "llvm_cpu": name,
                "loop": loop.name,
                "what": loop.what,
                "function": loop.function,
                "vector_shape": got["vector_shape"],
                "llvm_mca": version,
            }
            if hot is None:
                rec["error"] = "no loop found"
                records.append(rec)
                continue
            body, frame = hot
            rec.update(count(body, frame))
            rec.update(mca(body, name, tool))
            rec["flops_per_cycle"] = round(rec["flops"] / rec["cycles"], 2)
            rec["peak_flops_per_cycle"] = peak_flops
            rec["of_peak"] = round(rec["flops_per_cycle"] / peak_flops, 3) if peak_flops else None
            bits = rec["vector_bits"] or 128
            if bits not in model_peak:
                model_peak[bits] = round(mca_peak(name, bits, tool), 2)
            rec["mca_peak_flops_per_cycle"] = model_peak[bits]
            rec["body"] = body
            records.append(rec)
    return records


_COLUMNS = [
    ("cpu", "label", "{}"),
    ("loop", "loop", "{}"),
    ("bits", "vector_bits", "{}"),
    ("instr", "instructions", "{}"),
    ("fma", "fma", "{}"),
    ("acc", "accumulators", "{}"),
    ("spills", "spills", "{}"),
    ("cyc/it", "cycles", "{:.2f}"),
    ("uops/it", "uops", "{:.2f}"),
    ("bottleneck", "bottleneck", "{}"),
    ("flop/cyc", "flops_per_cycle", "{:.1f}"),
    ("peak", "peak_flops_per_cycle", "{}"),
    ("of peak", "of_peak", "{:.0%}"),
    ("mca peak", "mca_peak_flops_per_cycle", "{:.0f}"),
]


def table(records: list[dict]) -> str:
    """The records as an aligned text table, one line per (CPU, loop), then notes."""
    head = [c[0] for c in _COLUMNS]
    rows = [
        [fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in _COLUMNS]
        for r in records
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    version = records[0]["llvm_mca"] if records else "?"
    lines += [
        "",
        "float32; per iteration of each loop's innermost hot loop: bits: widest packed "
        "register (0: scalar); acc: distinct FMA destinations; spills: stack accesses;",
        f"cyc/it, uops/it, bottleneck (resource: its cycles per iteration): llvm-mca {version}, "
        "steady state, L1 hits; flop/cyc: FMA 2 per lane, add/mul/min/max 1;",
        "peak: 2 x float32 FMA lanes per cycle (numbattn.cpu.report.PEAKS); mca peak: the "
        "model's, 16 independent FMAs at the loop's width.",
    ]
    if any(r["llvm_cpu"] == "znver5" for r in records) and version.startswith("19."):
        lines.append("  znver5: llvm-mca 19 knows the CPU but schedules it with its znver4 model.")
    for name in dict.fromkeys(r["llvm_cpu"] for r in records):
        r = next(x for x in records if x["llvm_cpu"] == name)
        shape = r["vector_shape"]
        p = PEAKS.get(name)
        lines.append(
            f"  {name}: micro-kernel block 4 rows x {shape[1]} vectors of {8 * shape[0]} bits; "
            + (f"FMA {p.pipes} x {p.bits}-bit ({p.source})" if p else "FMA peak unknown")
        )
    return "\n".join(lines)
