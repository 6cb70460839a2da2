"""Run the whole test suite: CPU tests, then GPU tests in their own process.

The GPU tests (tests/gpu) run on a real GPU when one is usable and under
Numba's CUDA simulator otherwise; the simulator must be switched on before
Numba is imported, hence the second process. Extra arguments go to pytest.

    python run_tests.py            # everything
    python run_tests.py -x -q      # pytest options apply to both runs
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def gpu_usable() -> bool:
    probe = "import numbattn, sys; sys.exit(0 if numbattn.cuda_available() else 1)"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT).returncode == 0


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest"]
    print("== CPU tests", flush=True)
    rc = subprocess.run(pytest + ["tests", "--ignore=tests/gpu", *argv], cwd=ROOT).returncode
    if (ROOT / "tests" / "gpu").is_dir():
        env = dict(os.environ)
        if env.get("NUMBA_ENABLE_CUDASIM") != "1" and not gpu_usable():
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        where = "CUDA simulator" if env.get("NUMBA_ENABLE_CUDASIM") == "1" else "GPU"
        print(f"== GPU tests ({where})", flush=True)
        rc_gpu = subprocess.run(pytest + ["tests/gpu", *argv], cwd=ROOT, env=env).returncode
        rc = rc or rc_gpu
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
