"""scripts/ab.py: argument parsing, alternation and aggregation (no bench run)."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("ab", ROOT / "scripts" / "ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_args_passes_bench_options_through(ab):
    argv = ["main", "--shape", "1,8,256,64", "--ab-rounds", "3", "--rounds", "2", "--no-peak"]
    args = ab.parse_args(argv)
    assert (args.old, args.ab_rounds) == ("main", 3)
    assert args.bench == ["--shape", "1,8,256,64", "--rounds", "2", "--no-peak"]
    args = ab.parse_args(["HEAD~2"])
    assert (args.ab_rounds, args.bench) == (5, [])
    assert ab.bench_command(["--quick"])[-4:] == ["bench", "--json", "--no-progress", "--quick"]
    with pytest.raises(SystemExit):
        ab.parse_args(["main", "--ab-rounds", "0"])


def test_summarise_takes_medians_and_ratios(ab):
    a, b = "attention float32 1x8x256x64", "attention float64 1x8x256x64 causal"
    runs = {
        "old": [{a: 3.0, b: 1.0}, {a: 2.0, b: 1.0}, {a: 9.0, b: 1.0}],
        "new": [{a: 1.0, b: 2.0}, {a: 1.0, b: 2.0}, {a: 1.0, b: 2.0}],
    }
    rows = ab.summarise(runs)
    assert rows == [(a, 3.0, 1.0, 3.0), (b, 1.0, 2.0, 0.5)]
    text = ab.table(rows)
    assert "old/new" in text.splitlines()[0]
    assert "3000.000" in text and "0.500" in text


def test_run_bench_reads_the_json(ab, monkeypatch, tmp_path):
    doc = {
        "all_ok": True,
        "results": [
            {"kernel": "attention", "dtype": "float32", "shape": [1, 2, 64, 16],
             "causal": True, "median_s": 0.25},
        ],
    }  # fmt: skip
    seen = {}

    def fake_run(cmd, cwd, env, **kw):
        seen.update(cmd=cmd, cwd=cwd, path=env["PYTHONPATH"])
        return subprocess.CompletedProcess(cmd, 0, json.dumps(doc), "")

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    assert ab.run_bench(tmp_path, ["--quick"]) == {"attention float32 1x2x64x16 causal": 0.25}
    assert seen["cwd"] == tmp_path and seen["path"] == str(tmp_path)
    assert seen["cmd"][-1] == "--quick"


def test_main_alternates_and_removes_the_worktree(ab, monkeypatch, capsys):
    calls, order = [], []
    monkeypatch.setattr(ab, "git", lambda *a: calls.append(a) or "0123456789abcdef")

    def fake_bench(tree, options):
        order.append("new" if tree == ab.ROOT else "old")
        return {"attention float32 1x8x256x64": 2.0 if tree == ab.ROOT else 3.0}

    monkeypatch.setattr(ab, "run_bench", fake_bench)
    assert ab.main(["main", "--ab-rounds", "3", "--no-peak"]) == 0
    assert order == ["old", "new", "new", "old", "old", "new"]
    assert calls[1][:2] == ("worktree", "add") and calls[-1][:2] == ("worktree", "remove")
    assert "1.500" in capsys.readouterr().out
