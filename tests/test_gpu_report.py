"""``python -m numbattn gpu-report``: static facts of the compiled CUDA kernels.

The report compiles every kernel once (one CLI run per session, about 15 s)
for cc 9.0 with NVIDIA's tools from their pip wheels (the ``test`` extra
installs them), and the tests check that its numbers are what they claim:
registers, spills and shared memory against a separate ``ptxas -v`` run on
the same PTX and against ``cuobjdump -res-usage`` of the cubin; the loop
counts against ``cuobjdump -sass``; occupancy against the SM limits. No GPU
is needed; with one, the device's records are checked against the driver.
"""

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import numbattn
from numbattn import __main__ as cli
from numbattn.cuda import limits
from numbattn.cuda import report as R

ROOT = Path(__file__).resolve().parents[1]
KERNELS = (
    "attention", "scores", "softmax", "merge", "backward_dq", "backward_dkdv", "decode",
    "split_merge",
)  # fmt: skip
DTYPES = ("float32", "float64")
LOOP_KEYS = ("instructions", "fma", "mma", "fma_share", "shared_loads", "shared_loads_vector",
             "global_loads", "global_loads_128", "barriers")  # fmt: skip


def _tools():
    try:
        import numba_cuda  # noqa: F401
    except ImportError:
        pytest.skip("numba-cuda is not installed")
    try:
        return R.find_tools(("ptxas", "nvdisasm", "cuobjdump"))
    except R.ReportError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tools():
    return _tools()


@pytest.fixture(scope="module")
def run(tools, tmp_path_factory):
    """(records, folder of the saved PTX/cubin/SASS) of one ``gpu-report --json`` run."""
    save = tmp_path_factory.mktemp("gpu-report")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-m", "numbattn", "gpu-report", "--json", "--save", str(save)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), save


def _records(tmp_path_factory, setup: str, cc: str, kernels=("attention", "scores")):
    """Records of ``kernels`` alone (default: the fused forward and scores, the
    kernels with a tensor-core and an FMA variant), compiled for ``cc`` in a
    fresh process after running ``setup`` (numbattn.config changes)."""
    save = tmp_path_factory.mktemp("gpu-report-" + "-".join(kernels))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = (
        "import json, numbattn; " + setup + "; from numbattn.cuda import report; "
        f"print(json.dumps(report.report({cc!r}, save_dir={str(save)!r}, device=False, "
        f"kernels={tuple(kernels)!r})))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), save


#: The kernels with a tensor-core and an FMA variant.
KINDS_TC = ("attention", "scores", "backward_dq", "backward_dkdv")


@pytest.fixture(scope="module")
def fma_run(tools, tmp_path_factory):
    """The FMA kernels (tensor cores off: what runs before sm_80), cc 9.0."""
    return _records(tmp_path_factory, "numbattn.config.CUDA_TENSOR_CORES = False", "9.0", KINDS_TC)


@pytest.fixture(scope="module")
def sm80_run(tools, tmp_path_factory):
    """The tensor-core kernels compiled for cc 8.0 (m8n8k4 DMMA for float64)."""
    return _records(tmp_path_factory, "pass", "8.0", KINDS_TC)


def _files(save, rec, suffix):
    path = "" if rec["path"] == "hardware" else "_" + rec["path"]
    return save / f"{rec['kernel']}_{rec['dtype']}_{rec['target']}{path}{suffix}"


def _static(records):
    return [r for r in records if r["cc"] == "9.0"]


def test_one_record_per_variant(run):
    records, _ = run
    static = _static(records)
    # The tensor-core kernels and the streaming one have a hardware and a simulator path.
    assert sorted((r["kernel"], r["dtype"], r["path"]) for r in static) == sorted(
        [(k, d, "hardware") for k in KERNELS for d in DTYPES]
        + [(k, d, "simulator") for k in ("attention", "scores", "decode") for d in DTYPES]
    )
    for r in static:
        assert r["target"] == "sm_90"
        for key in ("threads_per_block", "registers", "spill_bytes", "local_bytes",
                    "shared_bytes", "blocks_per_sm", "warps_per_sm"):  # fmt: skip
            assert isinstance(r[key], int) and not isinstance(r[key], bool), key
            assert r[key] >= 0, key
        assert r["registers"] >= 1 and r["threads_per_block"] >= 32
        loop = r["inner_loop"]
        assert isinstance(loop, dict), r["kernel"]
        for key in LOOP_KEYS:
            assert isinstance(loop[key], int | float) and loop[key] >= 0, key
        assert re.fullmatch(r"\d+\.\d+\.\d+", r["ptxas"])


def test_geometry_is_the_production_one(run, fma_run):
    """Threads per block follow numbattn.config, as the backend launches them."""
    cfg = numbattn.config
    want = {
        ("attention", "float32"): 32 * cfg.CUDA_TC_WARPS,
        ("attention", "float64"): 32 * cfg.CUDA_TC_WARPS_F64,
    }
    for dt in DTYPES:
        want["scores", dt] = 32 * cfg.CUDA_TC_SCORES_WARPS
        want["softmax", dt] = cfg.CUDA_SOFTMAX_THREADS
        want["merge", dt] = 128
        sfx = "_F64" if dt == "float64" else ""
        # d = dv = 64 fits the configured tensor-core tiles in 48 KiB
        bwd = 32 * getattr(cfg, "CUDA_BWD_TC_WARPS" + sfx)
        want["backward_dq", dt] = want["backward_dkdv", dt] = bwd
        want["decode", dt] = cfg.CUDA_DECODE_LANES * cfg.CUDA_DECODE_TEAMS
        want["split_merge", dt] = cfg.CUDA_SPLIT_MERGE_THREADS
    for r in _static(run[0]):
        assert r["threads_per_block"] == want[r["kernel"], r["dtype"]]
    att = {r["dtype"]: r for r in _static(run[0]) if r["kernel"] == "attention"}
    assert att["float32"]["geometry"]["query_tile"] == 16 * cfg.CUDA_TC_WARPS
    assert att["float64"]["geometry"]["key_tile"] == cfg.CUDA_TC_KEY_TILE_F64
    for r in _static(run[0]):
        if r["kernel"] == "scores":
            geo = r["geometry"]
            assert geo["row_tile"] == 16 * cfg.CUDA_TC_SCORES_WARPS
            assert geo["column_tile"] == cfg.CUDA_TC_SCORES_TILE
            assert geo["head_chunk"] == cfg.CUDA_TC_SCORES_HEAD_CHUNK
    fma = {r["dtype"]: r for r in _static(fma_run[0]) if r["kernel"] == "scores"}
    for r in fma.values():
        assert r["threads_per_block"] == (cfg.CUDA_SCORES_TILE // cfg.CUDA_SCORES_PER_THREAD) ** 2
        assert r["geometry"]["tile"] == cfg.CUDA_SCORES_TILE


def test_resources_match_ptxas_and_cuobjdump(run, tools):
    """Registers, spills, stack and shared memory are what ptxas -v prints for
    the same PTX, and what cuobjdump reads from the cubin."""
    records, save = run
    for r in _static(records):
        ptx = _files(save, r, ".ptx")
        out = subprocess.run(
            [tools["ptxas"], "-arch=sm_90", "-v", "-o", os.devnull, str(ptx)],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        used = re.search(r"Used (\d+) registers", out)
        assert used and int(used.group(1)) == r["registers"], (r["kernel"], out)
        frame = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", out
        )
        assert frame and tuple(map(int, frame.groups())) == (
            r["local_bytes"], r["spill_bytes"], r["spill_load_bytes"]
        )  # fmt: skip
        smem = re.search(r"(\d+) bytes smem", out)
        assert (int(smem.group(1)) if smem else 0) == r["shared_bytes"]

        res = subprocess.run(
            [tools["cuobjdump"], "-res-usage", str(_files(save, r, ".cubin"))],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res))
        assert int(fields["REG"]) == r["registers"]
        assert int(fields["STACK"]) == r["local_bytes"]
        # cuobjdump counts the 1 KiB the driver reserves per block (cc >= 8.0).
        assert int(fields["SHARED"]) - r["shared_bytes"] in (0, 1024)


def _cuobjdump_ops(tools, cubin):
    sass = subprocess.run(
        [tools["cuobjdump"], "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    ops = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass):
        ops.append((int(m.group(1), 16), m.group(2)))
    return ops


def _spans(loop):
    return [(int(a, 16), int(b, 16)) for a, b in loop["ranges"]]


def _loop_ops(tools, save, rec, loop=None):
    """cuobjdump's opcodes of the loop's instructions (its offset ranges), NOPs left out."""
    spans = _spans(loop or rec["inner_loop"])
    return [
        op
        for off, op in _cuobjdump_ops(tools, _files(save, rec, ".cubin"))
        if any(a <= off <= b for a, b in spans) and not op.startswith("NOP")
    ]


def test_inner_loop_counts(run, tools):
    """The hottest loop's counts are consistent, and match cuobjdump's SASS
    over the loop's instructions (its blocks: offset ranges)."""
    records, save = run
    for r in _static(records):
        loop = r["inner_loop"]
        n = loop["instructions"]
        assert 0 < n <= r["sass_instructions"]
        assert loop["fma"] + loop["mma"] <= n
        assert loop["fma_share"] == pytest.approx(loop["fma"] / n, abs=1e-4)
        assert loop["shared_loads_vector"] <= loop["shared_loads"] <= n
        assert loop["barriers"] <= n
        start, end = int(loop["start"], 16), int(loop["end"], 16)
        spans = _spans(loop)
        assert start < end and spans[0][0] == start and spans[-1][1] == end
        assert all(a <= b < c for (a, b), (c, _) in itertools.pairwise(spans))
        for inner in loop["nested"]:
            assert start <= int(inner["start"], 16) < int(inner["end"], 16) <= end
            assert all(any(a <= x and y <= b for a, b in spans) for x, y in _spans(inner))
            for key in ("instructions", "fma", "shared_loads", "barriers"):
                assert inner[key] <= loop[key]

        ops = _loop_ops(tools, save, r)
        base = [op.split(".")[0] for op in ops]
        assert len(ops) == n
        assert sum(b in ("FFMA", "DFMA") for b in base) == loop["fma"]
        assert sum(b == "LDS" for b in base) == loop["shared_loads"]
        assert (
            sum(op.startswith("LDS") and bool({"64", "128"} & set(op.split(".")[1:])) for op in ops)
            == loop["shared_loads_vector"]
        )
        assert sum(b == "BAR" for b in base) == loop["barriers"]
        assert sum(b in ("LDG", "LD") for b in base) == loop["global_loads"]
        assert (
            sum(b in ("LDG", "LD") and "128" in op.split(".")[1:] for b, op in zip(base, ops))
            == loop["global_loads_128"]
            <= loop["global_loads"]
        )


def _attention_products(geo):
    """FMAs per key tile and thread of the float32 kernel: S (RQ x RK scores
    over the head chunk) and P @ V (RQ rows x RC columns over the key tile)."""
    tx = geo["key_tile"] // geo["keys_per_thread"]
    rq, rc = geo["rows_per_thread"], geo["value_chunk"] // tx
    return rq * geo["keys_per_thread"] * geo["head_chunk"] + rq * rc * geo["key_tile"]


def test_hottest_loops_are_the_documented_ones(run, fma_run):
    """The tensor-core forward: the key-tile loop, holding the k-step loop
    of S = Q K^T (its mma.sync, nested) and the unrolled P V products;
    tensor-core scores: the loop over head chunks (two barriers), holding
    the k-step loop (its mma.sync over the column tile, nested); the FMA
    forward (float32): the fast loop over interior key tiles, a whole tile's
    work in one body: both products unrolled (no loop inside holds an FMA),
    the exponentials, the barriers, the next tile's prefetch; FMA scores:
    the loop over whole d-chunks (R*R*DC FMAs between two barriers)."""
    for r in _static(run[0]):
        loop = r["inner_loop"]
        geo = r["geometry"]
        if r["kernel"] == "attention" and r["path"] == "hardware":
            products = [x for x in loop["nested"] if x["mma"]]
            assert products and loop["mma"] > max(x["mma"] for x in products)
            assert loop["barriers"] >= 2
            if r["dtype"] == "float32":  # float64 exp has no MUFU
                assert loop["mufu"] >= 2 * geo["key_tile"] // 4
        if r["kernel"] == "scores" and r["path"] == "hardware":
            assert loop["barriers"] == 2
            products = [x for x in loop["nested"] if x["mma"]]
            assert products and loop["mma"] >= max(x["mma"] for x in products)
    for r in _static(fma_run[0]):
        loop, geo = r["inner_loop"], r["geometry"]
        if r["kernel"] == "scores":
            assert loop["barriers"] == 2
            assert loop["fma"] == geo["per_thread"] ** 2 * geo["head_chunk"]
        elif r["kernel"] == "attention" and r["dtype"] == "float32":
            assert loop["fma"] >= _attention_products(geo)
            assert not [x for x in loop["nested"] if x["fma"] + x["mma"]]
            assert loop["mufu"] >= geo["rows_per_thread"] * geo["keys_per_thread"]
            assert loop["barriers"] >= (3 if r["path"] == "hardware" else 4)
            tile = geo["key_tile"] * (geo["head_chunk"] + geo["value_chunk"])
            assert loop["global_loads"] == tile // r["threads_per_block"]
    # No spills at the production geometry.
    fma32 = [r for r in _static(fma_run[0]) if r["dtype"] == "float32" or r["kernel"] == "scores"]
    spill_free = [
        r
        for r in _static(run[0])
        if not (r["kernel"] == "backward_dkdv" and r["dtype"] == "float64")
    ]  # the float64 key kernel: test_backward_on_the_tensor_cores
    assert all(r["spill_bytes"] == 0 for r in spill_free + fma32)


def test_backward_float32_fast_loop(fma_run):
    """Issue 14, the float32 backward kernels: the hottest loop is the fast
    loop over interior tiles, a whole tile's work in one body (S and dP over
    the padded head rows, dQ += dS K, or dK += dS^T Q and dV += P^T dO,
    unrolled: no rolled product loop inside), FMA-dense (>= 60% of its
    instructions: 0.69 dQ, 0.67 dK/dV with ptxas 13.5), vector shared loads
    for the products, the exponentials; no spills, and occupancy not below
    the kernels' before it (16 warps per SM for dQ, 12 for dK/dV)."""
    bwd = {
        r["kernel"]: r
        for r in _static(fma_run[0])
        if r["kernel"].startswith("backward") and r["dtype"] == "float32"
    }
    for name, r in bwd.items():
        geo, loop = r["geometry"], r["inner_loop"]
        rr, rc, bc = geo["rows_per_thread"], geo["cols_per_thread"], geo["streamed_tile"]
        tc = bc // rc
        products = (
            rr * rc * (geo["head_dims"] + geo["value_dims"]) + rr * geo["head_dims"] // tc * bc
        )
        if name == "backward_dkdv":
            products += rr * geo["value_dims"] // tc * bc
        assert loop["fma"] >= products, (name, loop["fma"], products)
        # The products are unrolled: a loop nested in it holds all of its
        # FMAs or none (dK/dV: the tile loop inside the loop over the group).
        assert all(x["fma"] in (0, loop["fma"]) for x in loop["nested"]), name
        assert loop["fma_share"] >= 0.6, (name, loop["fma_share"])
        assert loop["mufu"] >= rr * rc
        assert loop["shared_loads_vector"] >= 0.9 * loop["shared_loads"]
        assert r["spill_bytes"] == 0 and loop["local_accesses"] == 0
    assert bwd["backward_dq"]["warps_per_sm"] >= 16
    assert bwd["backward_dkdv"]["warps_per_sm"] >= 12


#: The tensor-core opcode of each product step, as nvdisasm spells it.
MMA_KINDS = {
    ("float32", "9.0"): "HMMA.1688.F32.TF32",
    ("float32", "8.0"): "HMMA.1688.F32.TF32",
    ("float64", "9.0"): "DMMA.16x8x8",
    ("float64", "8.0"): "DMMA.884",
}


def test_attention_on_the_tensor_cores(run, sm80_run):
    """The hardware path of the fused forward multiplies on the tensor
    cores, and nothing else does its products: float32 by 3xTF32 (three
    HMMA a product step), float64 by m16n8k8 DMMA on sm_90 and m8n8k4 DMMA
    on sm_80; row reductions by shuffles; no spills, no local memory in the
    loop. The simulator path (its emulation, compiled) has no mma."""
    records = [r for r in run[0] + sm80_run[0] if r["kernel"] == "attention"]
    assert {(r["dtype"], r["cc"]) for r in records} == set(MMA_KINDS)
    for r in records:
        loop = r["inner_loop"]
        if r["path"] == "simulator":
            assert loop["mma"] == 0 and loop["shuffles"] == 0
            continue
        kind = MMA_KINDS[r["dtype"], r["cc"]]
        assert set(loop["mma_kinds"]) == {kind}, (r["cc"], loop["mma_kinds"])
        geo = r["geometry"]
        per_step = {"HMMA.1688.F32.TF32": 3, "DMMA.16x8x8": 1, "DMMA.884": 4}[kind]
        # P V: (key tile / 8) x (value chunk / 8) product steps, unrolled.
        assert loop["mma"] >= per_step * geo["key_tile"] * geo["value_chunk"] // 64
        assert loop["shuffles"] > 0
        assert r["spill_bytes"] == 0 and loop["local_accesses"] == 0
    att = {(r["dtype"], r["cc"]): r for r in records if r["path"] == "hardware"}
    assert att["float32", "9.0"]["warps_per_sm"] >= 16
    assert att["float64", "9.0"]["warps_per_sm"] >= 12


def test_backward_on_the_tensor_cores(run, sm80_run):
    """Both backward kernels multiply on the tensor cores in their hot loop
    (the product step of the forward at each cc); float32 without spills or
    local memory. The float64 key kernel keeps dK and dV of 16 rows a warp
    in registers (128 of them at d = dv = 64) and spills a few bytes at 255
    registers (at most 64 here)."""
    records = [r for r in run[0] + sm80_run[0] if r["kernel"].startswith("backward")]
    assert {(r["kernel"], r["dtype"], r["cc"]) for r in records} == {
        (k, dt, cc) for k in ("backward_dq", "backward_dkdv") for dt, cc in MMA_KINDS
    }
    for r in records:
        loop = r["inner_loop"]
        assert set(loop["mma_kinds"]) == {MMA_KINDS[r["dtype"], r["cc"]]}, r["kernel"]
        assert r["geometry"]["step"] is not None
        if r["dtype"] == "float32" or r["kernel"] == "backward_dq":
            assert r["spill_bytes"] == 0 and loop["local_accesses"] == 0, r["kernel"]
        else:
            assert r["spill_bytes"] <= 64 and loop["local_accesses"] <= 2, r["kernel"]


def test_fma_attention_hardware_path(fma_run):
    """The FMA forward (tensor cores off): row reductions by warp shuffles
    (none, and more barriers, in the simulator path), vector shared loads
    only, no local memory in the loop, 16 warps per SM on cc 9.0, and
    float32's loop FMA-dense. (float64 takes this kernel only before sm_80,
    where it has no DMMA; at the default geometry it spills there.)"""
    att = {(r["dtype"], r["path"]): r for r in _static(fma_run[0]) if r["kernel"] == "attention"}
    for dt in ("float32",):
        hw, sim = att[dt, "hardware"], att[dt, "simulator"]
        assert hw["inner_loop"]["shuffles"] > 0 and sim["inner_loop"]["shuffles"] == 0
        assert sim["inner_loop"]["barriers"] > hw["inner_loop"]["barriers"]
        assert hw["spill_bytes"] == 0 and hw["inner_loop"]["local_accesses"] == 0
        loop = hw["inner_loop"]
        assert loop["shared_loads_vector"] == loop["shared_loads"] > 0
        assert loop["mma"] == 0
    assert att["float32", "hardware"]["warps_per_sm"] >= 16
    assert att["float32", "hardware"]["inner_loop"]["fma_share"] >= 0.55


def test_scores_register_blocked(fma_run, tools):
    """The FMA scores kernel's loop over whole d-chunks: FMAs are at least
    55% of it, every shared load is 16 bytes (LDS.128: 4 floats or 2
    doubles), the next chunk's global loads are in it (prefetch), no local
    memory, and 16 warps per SM on cc 9.0."""
    records, save = fma_run
    for r in _static(records):
        if r["kernel"] != "scores":
            continue
        loop = r["inner_loop"]
        assert loop["fma_share"] >= 0.55, (r["dtype"], loop)
        assert loop["shared_loads_vector"] == loop["shared_loads"] > 0
        lds = [op for op in _loop_ops(tools, save, r) if op.split(".")[0] == "LDS"]
        assert len(lds) == loop["shared_loads"] and all("128" in op.split(".") for op in lds)
        assert loop["global_loads"] > 0 and loop["local_accesses"] == 0
        assert r["spill_bytes"] == 0 and r["warps_per_sm"] >= 16
        assert r["threads_per_block"] >= 256  # multi-warp blocks


def test_scores_on_the_tensor_cores(run, sm80_run):
    """The hardware path of the scores kernel multiplies on the tensor cores
    (the step of the fused forward, :data:`MMA_KINDS`) in its loop over head
    chunks: at least one k-step over the column tile's n-tiles, unrolled;
    no spills, no local memory; 16 warps per SM on cc 9.0. The simulator
    path (its emulation, compiled) has no mma."""
    records = [r for r in run[0] + sm80_run[0] if r["kernel"] == "scores"]
    assert {(r["dtype"], r["cc"]) for r in records} == set(MMA_KINDS)
    for r in records:
        loop = r["inner_loop"]
        if r["path"] == "simulator":
            assert loop["mma"] == 0
            continue
        kind = MMA_KINDS[r["dtype"], r["cc"]]
        assert set(loop["mma_kinds"]) == {kind}, (r["cc"], loop["mma_kinds"])
        per_step = {"HMMA.1688.F32.TF32": 3, "DMMA.16x8x8": 1, "DMMA.884": 4}[kind]
        assert loop["mma"] >= per_step * r["geometry"]["column_tile"] // 8
        assert r["spill_bytes"] == 0 and r["local_bytes"] == 0
        assert loop["local_accesses"] == 0
        if r["cc"] == "9.0":
            assert r["warps_per_sm"] >= 16


def test_decode_reads_rows_16_bytes_at_a_time(run, tools):
    """The streaming decode kernel (issue 11 part 4) at the default geometry
    (d = 128, 4 rows a block): its hottest loop is the fast loop, two steps
    of KB keys a team written out; each lane reads its chunk of every K and V
    row with one 16-byte global load (LDG.E.128: 4 floats or 2 doubles), no
    other K/V read; no local memory, no spills; the float32 kernel in at most
    128 registers (16 warps per SM on cc 9.0), float64 at 8 warps."""
    records, save = run
    dec = {(r["dtype"], r["path"]): r for r in _static(records) if r["kernel"] == "decode"}
    assert sorted(dec) == sorted((d, p) for d in DTYPES for p in ("hardware", "simulator"))
    for (dt, path), r in dec.items():
        loop, geo = r["inner_loop"], r["geometry"]
        assert geo["vector"] * (4 if dt == "float32" else 8) == 16
        chunks = geo["elements_per_lane"] // geo["vector"]
        ops = _loop_ops(tools, save, r)
        wide = [op for op in ops if op.split(".")[0] == "LDG" and "128" in op.split(".")]
        assert len(wide) == loop["global_loads_128"]
        assert loop["global_loads_128"] >= 2 * 2 * geo["keys"] * chunks, (dt, path)
        # K/V reads are LDG.128 only; the other global loads are the block table's.
        assert loop["global_loads"] - loop["global_loads_128"] <= 2 * 2 * geo["keys"]
        assert loop["fma"] >= 2 * 2 * geo["keys"] * geo["rows"] * geo["elements_per_lane"]
        assert loop["local_accesses"] == 0 and r["spill_bytes"] == 0 and r["local_bytes"] == 0
        assert (loop["shuffles"] > 0) == (path == "hardware")
    assert dec["float32", "hardware"]["registers"] <= 128
    assert dec["float32", "hardware"]["warps_per_sm"] >= 16
    assert dec["float64", "hardware"]["warps_per_sm"] >= 8


def test_float32_attention_loop_has_no_index_fixups(fma_run, tools):
    """No negative-index fix-ups in the float32 key-tile loop: Numba wraps a
    signed index i as ``i + n if i < 0``, a signed 64-bit compare (ISETP
    with .EX, without .U32); the FMA kernel's indices are unsigned 32-bit."""
    records, save = fma_run
    for r in _static(records):
        if r["kernel"] == "attention" and r["dtype"] == "float32":
            ops = _loop_ops(tools, save, r)
            signed = [
                op for op in ops if op.startswith("ISETP") and ".EX" in op and ".U32" not in op
            ]
            assert not signed, (r["path"], signed)


def test_occupancy_fields(run):
    for r in _static(run[0]):
        warps = math.ceil(r["threads_per_block"] / 32)
        assert r["blocks_per_sm"] >= 1
        assert r["warps_per_sm"] == r["blocks_per_sm"] * warps
        assert r["occupancy"] == pytest.approx(r["warps_per_sm"] / 64, abs=1e-4)
        # the register file holds the resident warps
        per_warp = math.ceil(r["registers"] * 32 / 256) * 256
        assert r["warps_per_sm"] * per_warp <= 65536
        assert r["blocks_per_sm"] * (r["shared_bytes"] + 1024) <= 228 * 1024
        assert r["limited_by"]


def test_device_records_match_the_driver(run):
    """With a GPU: the occupancy rules give what the driver computes."""
    dev = [r for r in run[0] if "device" in r]
    if not dev:
        pytest.skip("no usable GPU")
    for r in dev:
        d = r["device"]
        assert d["max_threads_per_block"] >= r["threads_per_block"]
        if d["cc"] not in limits.SM_LIMITS:
            continue  # a device newer than the table
        assert d["sm_limits"] == limits.SM_LIMITS[d["cc"]]
        ours = limits.blocks_per_sm(
            d["cc"], r["threads_per_block"], d["registers"], d["shared_bytes"]
        )
        assert d["blocks_per_sm"] == ours["blocks_per_sm"], r["kernel"]


def test_table(run):
    text = R.table(run[0])
    lines = text.splitlines()
    assert lines[0].split()[:6] == ["kernel", "dtype", "path", "cc", "threads", "regs"]
    for r in _static(run[0]):
        assert any(
            line.split()[:6]
            == [
                r["kernel"],
                r["dtype"],
                r["path"],
                "9.0",
                str(r["threads_per_block"]),
                str(r["registers"]),
            ]
            for line in lines
        )
    assert "occupancy limited by" in text


# ------------------------------------------------------------ no tools needed


def test_missing_tools_name_the_packages(monkeypatch, capsys):
    monkeypatch.setattr(R, "_find_binary", lambda name: None)
    with pytest.raises(R.ReportError) as info:
        R.find_tools()
    msg = str(info.value)
    assert "ptxas" in msg and "nvdisasm" in msg
    assert "numbattn[test]" in msg and "nvidia-cuda-nvcc" in msg
    monkeypatch.setattr(R, "_check_compiler", lambda: None)
    assert cli.main(["gpu-report", "--cc", "8.0"]) == 2
    assert "nvidia-cuda-nvdisasm" in capsys.readouterr().err


def test_bad_cc_is_a_usage_error():
    r = subprocess.run(
        [sys.executable, "-m", "numbattn", "gpu-report", "--cc", "7.1"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--cc" in r.stderr


SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_2:
        /*0010*/                   LDS.128 R4, [R0] ;
.L_x_1:
        /*0020*/                   LDS R8, [R0+0x10] ;
        /*0030*/                   FFMA R9, R4, R8, R9 ;
        /*0040*/                   DFMA R10, R4, R8, R10 ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/                   HMMA.16816.F32 R12, R4, R8, R12 ;
        /*0080*/              @!P1 BRA `(.L_x_2) ;
        /*0090*/                   FFMA R9, R4, R8, R9 ;
        /*00a0*/                   EXIT ;
.L_x_3:
        /*00b0*/                   BRA `(.L_x_3) ;
        /*00c0*/                   NOP ;
"""


def test_sass_loops_and_counts():
    instrs, labels = R.parse_sass(SASS)
    assert len(instrs) == 13
    # not the self-branch at the end
    assert R.find_loops(instrs, labels) == [list(range(1, 9)), list(range(2, 6))]
    loop = R.hottest_loop(instrs, labels)
    assert (loop["start"], loop["end"]) == ("0x0010", "0x0080")  # outer loop: same FMAs + MMA
    assert loop["instructions"] == 8 and loop["fma"] == 2 and loop["mma"] == 1
    assert loop["shared_loads"] == 2 and loop["shared_loads_vector"] == 1
    assert loop["barriers"] == 1 and loop["fma_share"] == 0.25
    assert [(x["start"], x["instructions"], x["fma"]) for x in loop["nested"]] == [("0x0020", 4, 2)]


# Loop A (0x10-0x40) with a cold block placed after EXIT (0x80-0x90) that
# returns into it, and loop B (0x50-0x60) laid out between the two.
SASS_SPLIT = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   FFMA R9, R4, R8, R9 ;
        /*0020*/               @P0 BRA `(.L_x_9) ;
.L_x_2:
        /*0030*/                   FFMA R9, R4, R8, R9 ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
.L_x_3:
        /*0050*/                   DFMA R10, R4, R8, R10 ;
        /*0060*/               @P2 BRA `(.L_x_3) ;
        /*0070*/                   EXIT ;
.L_x_9:
        /*0080*/                   WARPSYNC.COLLECTIVE R35, `(.L_x_2) ;
        /*0090*/                   BRA `(.L_x_2) ;
.L_x_4:
        /*00a0*/                   BRA `(.L_x_4) ;
"""


def test_sass_loops_are_natural_loops():
    instrs, labels = R.parse_sass(SASS_SPLIT)
    assert R.find_loops(instrs, labels) == [[1, 2, 3, 4, 8, 9], [5, 6]]
    loop = R.hottest_loop(instrs, labels)
    assert loop["ranges"] == [["0x0010", "0x0040"], ["0x0080", "0x0090"]]
    assert (loop["start"], loop["end"]) == ("0x0010", "0x0090")
    assert (loop["instructions"], loop["fma"]) == (6, 2)
    assert loop["nested"] == []


def test_parse_ptxas():
    text = """ptxas info    : 8 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 49152 bytes smem, 400 bytes cmem[0]
"""
    assert R.parse_ptxas(text) == dict(
        registers=255, local_bytes=16, spill_bytes=8, spill_load_bytes=4, shared_bytes=49152
    )
    no_smem = text.replace(", 49152 bytes smem", "")
    assert R.parse_ptxas(no_smem)["shared_bytes"] == 0


@pytest.mark.parametrize(
    "cc, threads, regs, shared, blocks, limited_by",
    [
        ("9.0", 128, 168, 37376, 3, ["registers"]),  # 21*256 regs/warp: 3 warps per quarter
        ("9.0", 64, 162, 35840, 6, ["registers", "shared"]),  # 6 x 36 KiB <= 228 KiB
        ("8.9", 256, 40, 2176, 6, ["registers", "threads"]),  # 1536 threads per SM
        ("8.0", 128, 32, 40960, 4, ["shared"]),  # 4 x 41 KiB <= 164 KiB
        ("9.0", 32, 16, 0, 32, ["blocks"]),
        ("9.0", 1024, 64, 0, 1, ["registers"]),  # exactly the register file
    ],
)
def test_blocks_per_sm(cc, threads, regs, shared, blocks, limited_by):
    occ = limits.blocks_per_sm(cc, threads, regs, shared)
    assert occ["blocks_per_sm"] == blocks and occ["limited_by"] == limited_by
    assert occ["warps_per_sm"] == blocks * threads // 32


def test_unlaunchable_blocks():
    assert limits.launch_problem(1024, 0, 64) is None
    assert "registers per block" in limits.launch_problem(1024, 0, 65)
    assert "threads per block" in limits.launch_problem(1025, 0)
    assert "shared memory" in limits.launch_problem(128, 48 * 1024 + 1)
    assert "registers per thread" in limits.launch_problem(32, 0, 256)
    occ = limits.blocks_per_sm("9.0", 1024, 255, 0)
    assert occ["blocks_per_sm"] == 0 and "registers" in occ["limited_by"][0]
    assert limits.cc_key("sm_90") == limits.cc_key((9, 0)) == limits.cc_key("90") == "9.0"
    with pytest.raises(ValueError, match="compute capability"):
        limits.cc_key("7.1")
