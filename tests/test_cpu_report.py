"""``python -m numbattn cpu-report``: llvm-mca figures of the CPU hot loops."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from numbattn.cpu import report as R

ROOT = Path(__file__).resolve().parents[1]
MCA = R.find_mca()
# CI installs llvm-19 and sets NUMBATTN_REQUIRE_LLVM_MCA: there a missing llvm-mca fails.
needs_mca = pytest.mark.skipif(
    MCA is None and not os.environ.get("NUMBATTN_REQUIRE_LLVM_MCA"),
    reason="llvm-mca not installed (apt-get install llvm-19)",
)
CPUS = ("sapphirerapids", "znver4", "haswell")


@pytest.fixture(scope="module")
def records():
    return {(r["cpu"], r["loop"]): r for r in R.report(CPUS, tool=MCA)}


@pytest.fixture(scope="module")
def asm():
    return {cpu: R.compile_asm(cpu) for cpu in ("sapphirerapids", "haswell")}


def test_find_loops_innermost():
    text = """
f:
    movl $0, %eax
.LBB0_1:
    addq $1, %rax
.LBB0_2:
    vfmadd231ps %zmm1, %zmm2, %zmm3
    vfmadd231ps (%rsp), %zmm2, %zmm4
    jne .LBB0_2
    cmpq %rax, %rdi
    jne .LBB0_1
    retq
"""
    loops = R.find_loops(text)
    assert len(loops) == 1
    body, frame, fname = loops[0]
    assert body[0] == ".LBB0_2:" and body[-1].startswith("jne")
    assert fname == "f" and not frame
    c = R.count(body)
    assert c["fma"] == 2 and c["accumulators"] == 2 and c["vector_bits"] == 512
    assert c["spills"] == 1 and c["flops"] == 2 * 2 * 16


@needs_mca
def test_model_peaks():
    # llvm-mca's models: two 256-bit FMA pipes on Haswell and Zen 4.
    assert R.mca_peak("haswell", 256, MCA) == pytest.approx(32, rel=0.02)
    assert R.mca_peak("znver4", 256, MCA) == pytest.approx(32, rel=0.02)
    assert R.mca_peak("znver4", 512, MCA) == pytest.approx(32, rel=0.02)


@needs_mca
def test_vector_width_per_cpu(records):
    for cpu, bits in (("sapphirerapids", 512), ("znver4", 512), ("haswell", 256)):
        r = records[(cpu, "microkernel")]
        assert r["vector_bits"] == bits, cpu
        assert r["vector_shape"][0] * 8 == bits
    for (cpu, _), r in records.items():
        if cpu == "haswell":
            assert r["vector_bits"] <= 256
            assert not any("zmm" in s for s in r["body"])


@needs_mca
def test_microkernel_register_block(records):
    for cpu in CPUS:
        r = records[(cpu, "microkernel")]
        nv = r["vector_shape"][1]
        assert r["accumulators"] == 4 * nv, cpu
        assert r["fma"] % (4 * nv) == 0 and r["fma"] > 0
        assert r["spills"] == 0, cpu
        assert r["cycles"] > 0 and r["uops"] >= r["instructions"] - 1
        assert 0 < r["of_peak"] <= 1.0


@needs_mca
def test_report_matches_the_assembly(records, asm):
    for cpu, got in asm.items():
        lines = R._instructions(got["asm"]["microkernel"])
        body = records[(cpu, "microkernel")]["body"]
        starts = [i for i in range(len(lines)) if lines[i : i + len(body)] == body]
        assert starts, "the loop is a contiguous part of the assembly"
        ins = [s for s in body if not s.endswith(":")]
        assert records[(cpu, "microkernel")]["instructions"] == len(ins)
        assert records[(cpu, "microkernel")]["fma"] == sum(s.startswith("vfmadd") for s in ins)
        assert body[-1].startswith("j") and body[-1].split()[-1] == body[0][:-1]
    assert "zmm" in asm["sapphirerapids"]["asm"]["microkernel"]
    assert "zmm" not in "".join(asm["haswell"]["asm"].values())


@needs_mca
def test_exp_passes_use_zmm_on_avx512(records):
    # LLVM prefers 256-bit vectors in vectorised loops on Intel's AVX-512
    # cores; kernels._wide_vectors asks for 512 in the exp passes.
    for cpu in ("sapphirerapids", "znver4"):
        for loop in ("exp", "softmax_exp"):
            assert records[(cpu, loop)]["vector_bits"] == 512, (cpu, loop)


@needs_mca
def test_decode_and_exp_loops(records):
    for cpu in CPUS:
        assert records[(cpu, "decode_scores")]["fma"] > 0
        assert records[(cpu, "decode_pv")]["fma"] > 0
        assert records[(cpu, "exp")]["vector_bits"] >= 256
        assert records[(cpu, "pack_kt")]["instructions"] > 0


def test_signatures_are_the_kernels(tmp_path):
    # A fresh cache: kernels loaded from the on-disk cache compile no helpers.
    code = (
        "import json, numpy as np\n"
        "from numbattn.cpu import kernels as K, report as R\n"
        "for kern in (K.attention_kernel, K.decode_kernel, K.softmax_kernel):\n"
        "    kern._compile(np.dtype(np.float32))\n"
        "print(json.dumps({l.name: [str(s) for s in getattr(K, l.function).signatures]\n"
        "                  for l in R.LOOPS}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    compiled = json.loads(r.stdout)
    for loop in R.LOOPS:
        assert str(R.signatures()[loop.name]) in compiled[loop.name], loop.name


def test_cli_unknown_cpu():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "numbattn", "cpu-report", "--cpu", "nosuchcpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 2
    assert "unknown CPU" in r.stderr


@needs_mca
def test_cli_json():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "numbattn", "cpu-report", "--cpu", "haswell", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {d["loop"] for d in doc} == {loop.name for loop in R.LOOPS}
    for d in doc:
        for key in ("cycles", "uops", "bottleneck", "vector_bits", "fma", "spills", "of_peak"):
            assert key in d


@needs_mca
def test_table(records):
    text = R.table(list(records.values()))
    head = text.splitlines()[0].split()
    assert head[:3] == ["cpu", "loop", "bits"]
    for cpu in CPUS:
        assert any(line.split()[:2] == [cpu, "microkernel"] for line in text.splitlines())
    assert "llvm-mca" in text and "4 rows x 4 vectors of 512 bits" in text
