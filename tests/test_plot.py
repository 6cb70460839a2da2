"""Drawing bench runs: ``bench --plot``, ``python -m numbattn plot`` and numbattn._plot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from numbattn import _plot

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run() -> dict:
    """A bench --json document: attention at three N in both dtypes."""
    rows = []
    for dtype, slow in (("float32", 1.0), ("float64", 2.0)):
        for n in (256, 512, 1024):
            t = slow * 1e-3 * (n / 256) ** 2
            rows.append(
                {
                    "kernel": "attention",
                    "dtype": dtype,
                    "shape": [1, 8, n, 64],
                    "causal": False,
                    "check": {"ok": True},
                    "median_s": t,
                    "new_out_s": t,
                    "numpy_s": 2.5 * t,
                    "torch_s": None if n == 1024 else 1.1 * t,  # a missing timing
                }
            )
    return {
        "numbattn": {"version": "9.9", "numba": "0.68.1", "numpy": "2.4.6", "torch": None},
        "device": "cpu",
        "threads": 2,
        "machine": {"cpu": "Test CPU", "cpu_family": "25", "cpu_model": "17", "cpu_count": 2},
        "date": "2026-12-05T12:00:00Z",
        "results": rows,
    }


def run_cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_series_groups_by_dtype_case_and_implementation():
    data = _plot.series(fake_run())
    assert sorted(data) == ["float32", "float64"]
    impls = data["float64"]["attention 1x8xNx64"]
    assert [n for n, _ in impls["numbattn"]] == [256, 512, 1024]
    assert [n for n, _ in impls["torch"]] == [256, 512]  # None is left out
    assert impls["NumPy"][0][1] == pytest.approx(2.5 * 2e-3)


def test_draw_writes_a_png_with_one_panel_per_dtype(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_run()))
    out = tmp_path / "sub" / "bench.png"
    fig = _plot.draw(path, out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split()[0] for t in titles] == ["float32", "float64"]
    for ax in fig.axes:
        labels = ax.get_legend_handles_labels()[1]
        assert labels == ["numbattn", "NumPy", "torch"]
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    suptitle = fig.get_suptitle()
    assert "Test CPU (family 25, model 17), 2 CPUs, 2 threads, 2026-12-05" in suptitle


def test_plot_command(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_run()))
    out = tmp_path / "bench.png"
    r = run_cli("-m", "numbattn", "plot", str(path), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_refuses_other_json(tmp_path):
    path = tmp_path / "decode.json"
    path.write_text(json.dumps({"decode": []}))
    with pytest.raises(_plot.PlotError, match="not the JSON of"):
        _plot.draw(path)
    r = run_cli("-m", "numbattn", "plot", str(path), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "not the JSON of" in r.stderr


def test_missing_matplotlib_names_the_plot_extra(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_run()))
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import numbattn\n"
        "from numbattn import __main__ as cli\n"
        f"rc = cli.main(['plot', {str(path)!r}, '--out', {str(tmp_path / 'x.png')!r}])\n"
        "rc2 = cli.main(['bench', '--quick', '--plot', 'x.png'])\n"
        "sys.exit(10 * rc + rc2)\n"
    )
    r = run_cli("-c", code)
    assert r.returncode == 22, r.stderr
    assert r.stderr.count('pip install "numbattn[plot]"') == 2
    assert not (tmp_path / "x.png").exists()


def test_importing_numbattn_does_not_import_matplotlib():
    code = "import sys, numbattn, numbattn.__main__; print('matplotlib' in sys.modules)"
    r = run_cli("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize(
    "run", sorted((ROOT / "docs" / "results").glob("*.json")), ids=lambda p: p.name
)
def test_committed_runs_can_be_drawn(run):
    """The documentation draws every committed run: each names its machine and dtypes."""
    doc = _plot.load(run)
    assert doc["all_ok"] is True and doc["machine"]["cpu"]
    assert _plot.series(doc)


def test_bench_plot_draws_the_run(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    r = run_cli(
        "-m", "numbattn", "bench", "--json", "--no-progress", "--no-peak", "--no-torch",
        "--kernel", "attention", "--causal", "no", "--dtype", "float32,float64",
        "--shape", "1,2,64,16", "--shape", "1,2,128,16", "--plot", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
    doc = json.loads(r.stdout)
    assert doc["machine"]["cpu_count"] == os.cpu_count() and doc["date"].endswith("Z")
    assert sorted(_plot.series(doc)) == ["float32", "float64"]


def test_bench_plot_refuses_decode_and_dask():
    for extra in (["--kernel", "decode"], ["--dask"]):
        r = run_cli("-m", "numbattn", "bench", "--plot", "x.png", *extra)
        assert r.returncode == 2 and "--plot draws" in r.stderr
