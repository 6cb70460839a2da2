"""scripts/gpu_check.py runs end to end (--tiny: tiny sizes, 1 repetition)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_gpu_check_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("numbattn_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["failures"] == [] and all(c["ok"] for c in results["checks"])
    assert len(results["timings"]) == 4
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == "correctness: all OK"
    assert (tmp_path / "gpu_check.log").read_text().strip().splitlines()[-1] == printed[-1]
