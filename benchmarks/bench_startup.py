"""Start-up costs, each measured in a fresh interpreter (asv ``timeraw_*``):

- ``timeraw_import_numbattn`` (and ``timeraw_import_numba`` for scale);
- ``FirstCall.timeraw_first_call``: the first call of a kernel in a new
  process, with a **cold** cache (``NUMBA_CACHE_DIR`` pointing at a new empty
  directory: the call includes the full JIT compilation) versus a **warm**
  one (the ``cache=True`` kernels were compiled into that directory by an
  earlier process: the call includes loading them). The import happens in the
  untimed setup of the child process, so only the call is timed.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

from . import common as C


def _numbattn_path() -> str:
    """Folder holding the numbattn under test, for the child interpreters: asv
    passes its ASV_PYTHONPATH (used with ``-E existing`` on an uninstalled
    checkout) to the benchmark process only, not to the processes it starts."""
    spec = importlib.util.find_spec("numbattn")
    if spec is None or spec.origin is None:
        return ""
    return os.path.dirname(os.path.dirname(spec.origin))


_PATH_SETUP = "import sys; sys.path.insert(0, {path!r})\n"


class Import:
    repeat = (3, 10, 20.0)
    timeout = 300

    def timeraw_import_numbattn(self):
        return "import numbattn", _PATH_SETUP.format(path=_numbattn_path())

    def timeraw_import_numba(self):
        return "import numba"


_SETUP = """
import sys
sys.path.insert(0, {path!r})
import atexit, os, shutil, tempfile
cache = {cache_dir!r}
if cache is None:  # cold: a new, empty cache directory per sample
    cache = tempfile.mkdtemp(prefix="numbattn-cold-")
    atexit.register(shutil.rmtree, cache, True)
os.environ["NUMBA_CACHE_DIR"] = cache
import numpy as np
import numbattn
device = {device!r}
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 2, 64, 32)).astype(np.float32) for _ in range(3))
x = rng.standard_normal((1, 2, 64, 64)).astype(np.float32)
sync = lambda: None
if device == "cuda":
    from numba import cuda
    q, k, v, x = (cuda.to_device(a) for a in (q, k, v, x))
    sync = cuda.synchronize
    sync()
"""

_CALL = {
    "attention": "numbattn.attention(q, k, v); sync()",
    "scores": "numbattn.scores(q, k); sync()",
    "softmax": "numbattn.softmax(x); sync()",
}


def _gpu_usable() -> bool:
    from .common import nvidia_present

    if not nvidia_present():
        return False
    try:
        import numbattn

        return bool(numbattn.cuda_available())
    except Exception:
        return False


FIRST_CALL_PARAMS = C.grid([["attention", "scores", "softmax"], ["cold", "warm"], ["cpu", "cuda"]])
FIRST_CALL_NAMES = ["kernel", "cache", "device"]


class FirstCall:
    """First call in a new process: cold (compile) vs warm (cache load)."""

    params = FIRST_CALL_PARAMS
    param_names = FIRST_CALL_NAMES
    repeat = (1, 3, 60.0)
    timeout = 900

    def setup(self, kernel, cache, device):
        if device == "cuda" and not _gpu_usable():
            raise NotImplementedError("no usable CUDA GPU for numbattn")
        self.cache_dir = None
        if cache == "warm":
            self.cache_dir = tempfile.mkdtemp(prefix="numbattn-warm-")
            code = textwrap.dedent(
                _SETUP.format(cache_dir=self.cache_dir, device=device, path=_numbattn_path())
            )
            code += "\n" + _CALL[kernel] + "\n"
            subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))

    def teardown(self, kernel, cache, device):
        if getattr(self, "cache_dir", None):
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    def timeraw_first_call(self, kernel, cache, device):
        setup = _SETUP.format(cache_dir=self.cache_dir, device=device, path=_numbattn_path())
        return _CALL[kernel], setup
