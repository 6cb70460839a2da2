"""The command line: ``python -m numbattn info`` and ``bench``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numbattn
from numbattn import __main__ as cli
from numbattn import _bench

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "numbattn", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_info_text():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    for word in ("numbattn", "numba", "llvmlite", "numpy", "numba-cuda", "threading", "cuda"):
        assert word in r.stdout
    assert numbattn.__version__ in r.stdout


def test_info_json():
    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["numbattn"] == numbattn.__version__
    for key in ("numba", "llvmlite", "numpy", "numba-cuda", "threading", "cuda"):
        assert key in info
    assert info["threading"]["threads"] >= 1
    assert info["threading"]["layer"] in ("omp", "tbb", "workqueue")
    assert isinstance(info["cuda"]["usable"], bool)
    if not info["cuda"]["usable"]:
        assert info["cuda"]["reason"]


def test_bench_quick_json():
    r = run_cli("bench", "--quick", "--json", "--max-repeat", "5")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["all_ok"] is True
    assert doc["device"] == "cpu"
    results = doc["results"]
    assert {x["kernel"] for x in results} == {"attention", "scores", "softmax", "backward"}
    assert {x["dtype"] for x in results} == {"float32", "float64"}
    assert {x["causal"] for x in results if x["kernel"] == "attention"} == {False, True}
    keys = {"kernel", "backend", "dtype", "shape", "causal", "check", "median_s", "rate",
            "rate_unit", "numpy_s", "vs_numpy", "torch_s", "vs_torch"}  # fmt: skip
    for x in results:
        assert keys <= x.keys()
        assert x["check"]["ok"] is True
        assert x["check"]["rel_err"] <= x["check"]["tol"]
        assert x["median_s"] > 0 and x["rate"] > 0
        # scores / softmax: median_s into a preallocated out=, new_out_s a new
        # output each call (the baselines' ratios use it); others: one timing
        assert x["out_given"] is (x["kernel"] in ("scores", "softmax"))
        assert x["new_out_s"] > 0
        if not x["out_given"]:
            assert x["new_out_s"] == x["median_s"]
        if x["kernel"] == "backward":  # no NumPy baseline for gradients
            assert x["numpy_s"] is None and x["vs_numpy"] is None
        else:
            assert x["numpy_s"] > 0 and x["vs_numpy"] > 0
            assert x["vs_numpy"] == pytest.approx(x["numpy_s"] / x["new_out_s"])
        assert x["rate_unit"] == ("GB/s" if x["kernel"] == "softmax" else "GFLOP/s")
        if x["torch_s"] is not None:
            assert x["vs_torch"] > 0
    # progress is reported on stderr, stdout holds only the JSON document
    assert "[1/" in r.stderr
    # the machine's ceilings, sampled in each row's rounds, and the fraction:
    # the median over rounds of the per-round fractions
    assert set(doc["peaks"]) == {"float32", "float64"}
    for x in results:
        kind = "stream" if x["kernel"] == "softmax" else "gemm"
        c = x["ceiling"]
        assert c["kind"] == kind and c["unit"] == x["rate_unit"]
        rounds = 9 if kind == "stream" else 3  # --rounds 3; the stream 3x as many
        assert c["rounds"] == len(c["rates"]) == len(x["of_peak_rounds"]) == rounds
        assert all(r > 0 for r in c["rates"]) and all(f > 0 for f in x["of_peak_rounds"])
        assert x["ceiling_rate"] == c["rate"] == pytest.approx(np.median(c["rates"]))
        assert x["of_peak"] == pytest.approx(np.median(x["of_peak_rounds"]))
        pk = doc["peaks"][x["dtype"]]
        assert pk[kind]["rate"] > 0 and pk[kind]["repeats"] >= c["rounds"]


def test_bench_table_and_options():
    r = run_cli(
        "bench", "--kernel", "attention", "--shape", "1,2,96,16", "--dtype", "float64",
        "--causal", "yes", "--no-torch", "--max-repeat", "3", "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "attention" in r.stdout and "1x2x96x16" in r.stdout and "float64" in r.stdout
    assert r.stderr.strip() == ""


def test_bench_bad_usage():
    r = run_cli("bench", "--shape", "1,2,3")
    assert r.returncode == 2
    assert "B,H,N,d" in r.stderr


def test_bench_cuda_unusable_exits_nonzero():
    if numbattn.cuda_available():
        pytest.skip("CUDA is usable here")
    r = run_cli("bench", "--device", "cuda", "--quick")
    assert r.returncode == 2
    assert "CUDA is not usable" in r.stderr


def test_bench_detects_wrong_kernel(monkeypatch, capsys):
    """A kernel that leaves its (NaN-poisoned) output untouched fails the check."""

    def lazy_softmax(x, *, out=None, stream=None):
        return out

    monkeypatch.setattr(numbattn, "softmax", lazy_softmax)
    rc = cli.main(["bench", "--kernel", "softmax", "--shape", "1,1,8,4", "--no-baselines",
                   "--max-repeat", "1", "--json"])  # fmt: skip
    assert rc == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["all_ok"] is False
    assert doc["results"][0]["check"]["ok"] is False


@pytest.mark.parametrize("causal", [False, True])
def test_numpy_baselines_match_reference(causal):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 3, 17, 8)) for _ in range(3))
    out = _bench.numpy_attention(q, k, v, 0.3, causal)
    ref, _ = numbattn.reference.attention(q, k, v, scale=0.3, causal=causal)
    assert _bench.rel_err(out, ref) < 1e-13
    s = _bench.numpy_scores(q, k, 0.3, causal)
    assert _bench.rel_err(s, numbattn.reference.scores(q, k, scale=0.3, causal=causal)) < 1e-13
    x = rng.standard_normal((2, 3, 5, 7))
    assert _bench.rel_err(_bench.numpy_softmax(x), numbattn.reference.softmax(x)) < 1e-13


def test_work_counts():
    p = _bench.Problem("attention", 2, 3, 128, 64)
    assert p.work() == (4.0 * 2 * 3 * 128 * 128 * 64, "GFLOP/s")
    assert _bench.Problem("attention", 2, 3, 128, 64, causal=True).work()[0] == p.work()[0] / 2
    assert _bench.Problem("scores", 2, 3, 128, 64).work()[0] == 2.0 * 2 * 3 * 128 * 128 * 64
    sm = _bench.Problem("softmax", 2, 3, 128, 64, "float64")
    assert sm.shape == (2, 3, 128, 128)
    assert sm.work() == (2.0 * 2 * 3 * 128 * 128 * 8, "GB/s")
    bw = _bench.Problem("backward", 2, 3, 128, 64)
    assert bw.work() == (10.0 * 2 * 3 * 128 * 128 * 64, "GFLOP/s")


def test_bench_backward_with_torch_baseline():
    """The backward problem: checked against the reference, timed, and torch's
    SDPA backward timed beside it (where torch is installed)."""
    r = run_cli(
        "bench", "--kernel", "backward", "--shape", "1,2,40,8", "--dtype", "float64",
        "--causal", "yes", "--max-repeat", "2", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (x,) = json.loads(r.stdout)["results"]
    assert x["kernel"] == "backward" and x["check"]["ok"] is True
    if _bench._torch() is not None:
        assert x["torch_s"] > 0


def test_round_fractions_on_fake_timings():
    """Per round: (work / median of the round's samples) / (ceiling work /
    the round's ceiling sample); the row's fraction is their median."""
    kernel = [[1.0, 3.0, 2.0], [4.0], [0.5, 0.5]]  # medians 2, 4, 0.5 s
    ceiling = [1.0, 2.0, 0.25]  # s for 100 units: 100, 50, 400 units/s
    fr = _bench.round_fractions(40.0, kernel, 100.0, ceiling)
    assert fr == pytest.approx([20 / 100, 10 / 50, 80 / 400])
    # a slower machine in round 2 (kernel and ceiling alike) leaves it alone
    fr2 = _bench.round_fractions(40.0, [[2.0], [8.0], [2.0]], 100.0, [1.0, 4.0, 1.0])
    assert fr2 == pytest.approx([0.2, 0.2, 0.2])


def _recorder(order):
    """fake(name, seconds): a timed call that logs its name in ``order`` and
    returns ``seconds``."""

    def fake(name, seconds):
        def once():
            order.append(name)
            return seconds

        return once

    return fake


def test_rounds_timed_takes_turns():
    """After a warm-up of each call, each round takes the calls' samples in
    turn, then one ceiling sample; at least one sample per round."""
    order: list[str] = []
    fake = _recorder(order)

    r = _bench.rounds_timed(
        [fake("a", 0.1), fake("b", 0.3)], fake("C", 5.0),
        rounds=2, min_time=1.0, min_repeat=2, max_repeat=50,
    )  # fmt: skip
    # per round: >= 1 sample and >= 2 * 1.0 / 2 s of samples: 3 x (0.1 + 0.3)
    assert order == ["a", "b"] + (["a", "b"] * 3 + ["C"]) * 2
    assert r.calls == [[[0.1] * 3] * 2, [[0.3] * 3] * 2]
    assert r.ceiling == [5.0, 5.0]
    assert r.timing(1).times == [0.3] * 6
    order.clear()
    r = _bench.rounds_timed([fake("a", 1.0)], fake("C", 1.0), rounds=3, min_time=100.0,
                            min_repeat=1, max_repeat=2)  # fmt: skip
    assert order == ["a"] + ["a", "C"] * 3  # max(1, 2 // 3) samples per round
    assert len(r.ceiling) == 3


def test_gemm_worker_protocol():
    """The worker answers one request per line with one matmul's seconds, for
    each dtype it was started with; it ends on an empty line; a dtype it
    does not hold kills it, and the bench says so."""
    w = _bench.GemmWorker(["float64", "float32"], threads=1, n=16)
    try:
        assert w.proc.poll() is None
        assert all(w.sample(dt) > 0 for dt in ("float32", "float64", "float32"))
        with pytest.raises(RuntimeError, match="GEMM worker failed"):
            w.sample("int8")
    finally:
        w.close()
    w = _bench.GemmWorker(["float32"], threads=1, n=16)
    w.close()
    assert w.proc.returncode == 0


def test_ceilings_summary_and_text():
    c = _bench.Ceilings(1, ["float32"], n=16)
    try:
        assert c.get("float64", "gemm") is None  # not started for float64
        g = c.get("float32", "gemm")
        st = c.get("float64", "stream")
        assert g is not None and st is not None
        assert g.kind == "gemm" and g.work == 2.0 * 16**3 and "16^3" in g.what
        assert st.kind == "stream" and st.work == 2 * 128 * 2**20
        for _ in range(3):
            assert g.sample() > 0 and st.sample() > 0
        pk = c.summary()
    finally:
        c.close()
    assert set(pk) == {"float32", "float64"}
    assert pk["float32"]["gemm"]["repeats"] == 3 and pk["float32"]["gemm"]["n"] == 16
    assert "stream" not in pk["float32"] and "gemm" not in pk["float64"]
    assert pk["float64"]["stream"]["mib"] == 256.0
    assert pk["float64"]["stream"]["best"] >= pk["float64"]["stream"]["rate"] > 0
    text = _bench.peaks_text(pk)
    assert "float32: GEMM" in text and "16^3" in text and "float64: stream" in text


def test_machine_peaks_child_process():
    pk = _bench.machine_peaks("float64", 1, n=64, min_time=0.0)
    assert pk["dtype"] == "float64" and pk["threads"] == 1
    assert pk["gemm"]["n"] == 64 and pk["gemm"]["rate"] > 0 and pk["gemm"]["repeats"] >= 3
    assert pk["stream"]["rate"] > 0


def test_info_lists_pools_and_warnings():
    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert isinstance(info["warnings"], list)
    pools = info["thread_pools"]
    if pools is None:  # threadpoolctl not installed
        return
    assert any(p["user_api"] == "blas" for p in pools)  # NumPy's BLAS
    if info["threading"]["layer"] == "omp":
        assert any(p["user_api"] == "openmp" for p in pools)


def test_table_shows_both_timings():
    """scores / softmax: 'median' (rate, of peak) into out=, marked *; 'new out'
    (the baselines' ratios) a new output each call; attention: one timing."""
    base = {"backend": "cpu", "dtype": "float64", "causal": False, "rate_unit": "GB/s",
            "of_peak": 0.9, "vs_torch": None, "check": {"ok": True, "rel_err": 0.0}}  # fmt: skip
    recs = [
        dict(base, kernel="softmax", shape=[1, 2, 8, 8], out_given=True, median_s=0.002,
             new_out_s=0.003, rate=1.0, vs_numpy=2.0),
        dict(base, kernel="attention", shape=[1, 2, 8, 4], out_given=False, median_s=0.004,
             new_out_s=0.004, rate=1.0, vs_numpy=1.5, rate_unit="GFLOP/s"),
    ]  # fmt: skip
    lines = _bench.table(recs).splitlines()
    assert "new out" in lines[0]
    assert "2.00 ms *" in lines[2] and "3.00 ms" in lines[2]
    assert "*" not in lines[3] and lines[3].count("4.00 ms") == 2


def test_alternated_timed_takes_turns():
    """One sample of each call per round (after a warm-up each), until each
    has min_repeat samples and about min_time seconds, or max_repeat."""
    order: list[str] = []
    fake = _recorder(order)

    a, b = _bench.alternated_timed(
        [fake("a", 0.1), fake("b", 0.3)], min_time=1.0, min_repeat=2, max_repeat=50
    )
    assert order[:2] == ["a", "b"]  # warm-up
    assert order[2:] == ["a", "b"] * len(a.times)
    assert len(a.times) == len(b.times) == 5  # 5 rounds of 0.4 s >= 2 x 1.0 s
    (c,) = _bench.alternated_timed([fake("c", 1.0)], min_time=10.0, min_repeat=1, max_repeat=3)
    assert c.times == [1.0] * 3


def test_bench_decode_quick_json():
    """The decode bench: each case's K+V fraction of the stream is the median
    of per-round ratios against the streaming read sampled in the same rounds."""
    r = run_cli("bench", "--kernel", "decode", "--quick", "--json", "--no-baselines")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["all_ok"] is True and doc["stream_read_gbs"] > 0
    for x in doc["decode"]:
        assert x["check"]["ok"] is True
        assert x["median_s"] > 0 and x["kv_gbs"] > 0 and x["stream_read_gbs"] > 0
        assert 0 < x["kv_fraction_of_stream"]
        assert x["torch_s"] is None
