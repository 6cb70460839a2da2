"""Run the whole test suite: CPU tests, then GPU tests in their own process.

The GPU tests (tests/gpu) run on a real GPU when one is usable and under
Numba's CUDA simulator otherwise; the simulator must be switched on before
Numba is imported, hence the second process. Extra arguments go to pytest.

    python run_tests.py            # everything
    python run_tests.py -x -q      # pytest options apply to both runs
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def gpu_usable() -> bool:
    probe = "import numbattn, sys; sys.exit(0 if numbattn.cuda_available() else 1)"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT).returncode == 0


def _spread(simulated: bool, argv: list[str]) -> list[str]:
    """pytest-xdist options for the simulator run: the simulator is pure Python
    (one core per process), so its tests spread over the machine's cores; a
    real GPU runs in one process. Nothing when xdist is missing or the caller
    chose ``-n`` / ``-p no:xdist`` / ``-x`` (which xdist would not honour at once)."""
    if not simulated or importlib.util.find_spec("xdist") is None:
        return []
    if any(a.startswith(("-n", "--numprocesses", "-x", "--exitfirst")) for a in argv):
        return []
    if "no:xdist" in argv:
        return []
    return ["-n", str(max(1, min(4, os.cpu_count() or 1)))]


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    print("== CPU tests", flush=True)
    rc = subprocess.run(pytest + ["tests", "--ignore=tests/gpu", *argv], cwd=ROOT).returncode
    if (ROOT / "tests" / "gpu").is_dir():
        env = dict(os.environ)
        if env.get("NUMBA_ENABLE_CUDASIM") != "1" and not gpu_usable():
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        simulated = env.get("NUMBA_ENABLE_CUDASIM") == "1"
        print(f"== GPU tests ({'CUDA simulator' if simulated else 'GPU'})", flush=True)
        rc_gpu = subprocess.run(
            pytest + ["tests/gpu", *_spread(simulated, argv), *argv], cwd=ROOT, env=env
        ).returncode
        rc = rc or rc_gpu
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
