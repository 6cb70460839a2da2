"""Robustness (issue 8, items 3, 4 and 6): read-only installations, fork after
first use, and rough edges (masked arrays, byte order, huge scale, scratch
sized by the work present, per-call rather than per-item allocations).

The process-level tests run a fresh interpreter each (a subprocess), as the
conditions they check (a read-only file system, a forked pool, resident
memory, Numba's allocation counters) belong to a whole process.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import numbattn

ROOT = Path(__file__).resolve().parents[1]


def _run(code, env=None, prefix=(), timeout=600, cwd=None):
    """Run ``code`` in a fresh interpreter (this checkout first on the path,
    Numba's cache variables unset unless ``env`` sets them); returns its last
    stdout line parsed as JSON."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    base["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        env=dict(base, **(env or {})),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# 6. Rough edges
# ---------------------------------------------------------------------------


def _qkv(dtype=np.float32):
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, 3, 5, 4)).astype(dtype) for _ in range(3))


@pytest.mark.parametrize("which", ["q", "k", "v", "out", "bias"])
def test_masked_array_refused(which):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    if which in ("out", "bias"):
        shape = (2, 3, 5, 4) if which == "out" else (5, 5)
        args[which] = np.ma.masked_array(np.zeros(shape, np.float32), mask=False)
    else:
        args[which] = np.ma.masked_array(args[which], mask=args[which] > 0)
    with pytest.raises(
        TypeError, match=rf"{which} is a numpy.ma.MaskedArray.*mask would be ignored"
    ):
        numbattn.attention(**args)


def test_masked_array_refused_everywhere():
    q, k, _ = _qkv()
    m = np.ma.masked_array(q, mask=q > 0)
    with pytest.raises(TypeError, match=r"x is a numpy.ma.MaskedArray"):
        numbattn.softmax(m)
    with pytest.raises(TypeError, match=r"k is a numpy.ma.MaskedArray"):
        numbattn.scores(q, np.ma.masked_array(k))
    with pytest.raises(TypeError, match=r"key_lengths is a numpy.ma.MaskedArray"):
        numbattn.attention(q, k, k, key_lengths=np.ma.masked_array([1, 2]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_native_byte_order(dtype):
    dt = np.dtype(dtype).newbyteorder("S")  # swapped: '>f4' on little-endian machines
    q, k, v = (x.astype(dt) for x in _qkv(dt.newbyteorder("=")))
    msg = rf"q has non-native byte order {dt.str}: .* q.astype\(q.dtype.newbyteorder\('='\)\)"
    with pytest.raises(TypeError, match=msg):
        numbattn.attention(q, k, v)
    native = [x.astype(x.dtype.newbyteorder("=")) for x in (q, k, v)]
    out = np.empty(native[0].shape, dt)
    with pytest.raises(TypeError, match=rf"out has non-native byte order {dt.str}"):
        numbattn.attention(*native, out=out)


def test_non_native_cu_seqlens_accepted():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, 2, 4))
    cu = np.array([0, 2, 5], dtype=np.dtype(np.int32).newbyteorder("S"))
    expected = numbattn.varlen_attention(q, q, q, cu.astype(np.int32), cu.astype(np.int32))
    np.testing.assert_array_equal(numbattn.varlen_attention(q, q, q, cu, cu), expected)


@pytest.mark.parametrize("scale", [10**400, -(10**400)], ids=["1e400", "-1e400"])
def test_huge_scale_is_a_value_error(scale):
    q, k, v = _qkv()
    for s in (scale, Fraction(scale, 3)):
        with pytest.raises(ValueError, match=r"scale must be finite, got a value too large"):
            numbattn.attention(q, k, v, scale=s)
        with pytest.raises(ValueError, match=r"scale must be finite"):
            numbattn.scores(q, k, scale=s)


# ---------------------------------------------------------------------------
# 6. Rough edges: scratch sized by the work present, allocated per call
# ---------------------------------------------------------------------------


_SCRATCH = """
import json
import numpy as np
import numbattn


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024


t = np.ones((1, 1, 8, 16), np.float32)
numbattn.attention(t, t, t)
numbattn.scores(t, t)
d = 10**6
q, k, v = (np.full((1, 1, 1, d), 1e-3, np.float32) for _ in range(3))
added = {}
for name, fn in (("attention", lambda: numbattn.attention(q, k, v)),
                 ("scores", lambda: numbattn.scores(q, k))):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    fn()
    added[name] = status("VmHWM:") - before
print(json.dumps(added))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_scratch_sized_by_rows_present():
    """d = 10**6 with Nq = Nk = 1: scratch follows the rows and keys present,
    not a full tile x d (was: about 1 GB for float32)."""
    added = _run(_SCRATCH)
    # The output is 4 MB; a few padded rows of d stay well under 100 MiB.
    assert added["attention"] < 100 * 2**20, added
    assert added["scores"] < 100 * 2**20, added


_ALLOCS = """
import json
import numpy as np
import numbattn
from numba.core.runtime import rtsys
from numbattn import reference

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((20000, 1, 8)) for _ in range(3))
numbattn.attention(q[:2], k[:2], v[:2])
numbattn.scores(q[:2], k[:2])
result = {}
for name, fn, ref in (
    ("attention", lambda: numbattn.attention(q, k, v), reference.attention(q, k, v)[0]),
    ("scores", lambda: numbattn.scores(q, k), reference.scores(q, k)),
):
    before = rtsys.get_allocation_stats().alloc
    out = fn()
    result[name] = rtsys.get_allocation_stats().alloc - before
    result[name + "_err"] = float(np.abs(out - ref).max())
print(json.dumps(result))
"""


def test_tiny_problems_allocate_per_call_not_per_item():
    """20,000 sequences of length 1: the kernels' scratch is allocated per
    call (per thread), not per work item (was: 6 and 3 allocations per item)."""
    result = _run(_ALLOCS, env={"NUMBA_NRT_STATS": "1"})
    assert result["attention_err"] < 1e-12 and result["scores_err"] < 1e-12
    assert result["attention"] < 100, result
    assert result["scores"] < 100, result


# ---------------------------------------------------------------------------
# 3. A read-only installation runs
# ---------------------------------------------------------------------------


def _read_only_prefix(paths):
    """A command prefix under which ``paths`` are read-only, or None (not possible).

    Permission bits do not stop root, so as root each path becomes a
    read-only bind mount in a private mount namespace (``unshare -m``);
    otherwise the caller removes write permission (see ``_read_only``).
    """
    if not paths or os.geteuid() != 0:
        return ()
    if not shutil.which("unshare") or not shutil.which("mount"):
        return None
    binds = " && ".join(
        f"mount --bind {p} {p} && mount -o remount,bind,ro {p} {p}"
        for p in map(shlex.quote, map(str, paths))
    )
    prefix = ("unshare", "-m", "sh", "-c", f'{binds} && exec "$0" "$@"')
    probe = subprocess.run([*prefix, "true"], capture_output=True)  # e.g. no CAP_SYS_ADMIN
    return prefix if probe.returncode == 0 else None


class _read_only:
    """Context: ``paths`` read-only for the commands run with ``.prefix``."""

    def __init__(self, paths):
        self.paths = [Path(p) for p in paths]
        self.prefix = _read_only_prefix(self.paths)
        if self.prefix is None:  # pragma: no cover
            pytest.skip("cannot make a directory read-only for root here (unshare -m, mount)")

    def _chmod(self, writable):
        for top in self.paths:
            for path in [top, *top.rglob("*")]:
                if path.is_symlink():
                    continue
                mode = path.stat().st_mode
                path.chmod(mode | 0o200 if writable else mode & ~0o222)

    def __enter__(self):
        if os.geteuid() != 0:
            self._chmod(writable=False)
        return self

    def __exit__(self, *exc):
        if os.geteuid() != 0:
            self._chmod(writable=True)  # let pytest clean tmp_path up


_PROBE = """
    import json, os, tempfile
    import numpy as np
    import numbattn
    from numbattn import reference
    from numbattn.cpu import kernels

    # The directories must really be read-only (else the test proves nothing).
    writable = []
    for path in {read_only!r}:
        try:
            tempfile.TemporaryFile(dir=path).close()
            writable.append(path)
        except OSError:
            pass
    rng = np.random.default_rng(0)
    # 20 queries: more than config.CPU_STREAM_ROWS, so the tiled kernel runs.
    q, k, v = (rng.standard_normal((2, 3, 20, 4)) for _ in range(3))
    if {kernel!r} == "attention":
        out = numbattn.attention(q, k, v, causal=True)
        ref = reference.attention(q, k, v, causal=True)[0]
        disp = kernels.attention_kernel._dispatcher
    else:
        out = numbattn.softmax(q)
        ref = reference.softmax(q)
        disp = kernels.softmax_kernel._dispatcher
    print(json.dumps({{
        "file": numbattn.__file__,
        "writable": writable,
        "err": float(np.abs(out - ref).max()),
        "cache": "none" if type(disp._cache).__name__ == "NullCache"
        else "read-only" if getattr(disp._cache, "read_only", False) else "write",
        "hits": sum(disp.stats.cache_hits.values()),
    }}))
"""


def _install(tmp_path, name, with_cache):
    """A copy of the package under tmp_path/name/site (with or without the
    checkout's compiled-kernel cache), plus an empty home and cache dir."""
    base = tmp_path / name
    ignore = None if with_cache else shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "numbattn", base / "site" / "numbattn", ignore=ignore)
    for sub in ("home", "numba-cache"):
        (base / sub).mkdir()
    return base


def _env(base, cache_dir=True):
    env = {"PYTHONPATH": str(base / "site"), "HOME": str(base / "home")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["XDG_CACHE_HOME"] = str(base / "home" / ".cache")
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = str(base / "numba-cache")
    return env


def _probe(base, kernel, env, read_only=()):
    code = _PROBE.format(read_only=[str(p) for p in read_only], kernel=kernel)
    with _read_only(read_only) as ro:
        result = _run(code, env, prefix=ro.prefix, cwd=base)  # not the checkout
    assert result["file"].startswith(str(base / "site"))
    return result


def test_read_only_install_without_cache_compiles_in_memory(tmp_path):
    """Package, HOME and NUMBA_CACHE_DIR read-only, no cache anywhere: works,
    compiling without an on-disk cache (was: RuntimeError 'no locator')."""
    base = _install(tmp_path, "cold", with_cache=False)
    read_only = [base / "site", base / "home", base / "numba-cache"]
    result = _probe(base, "softmax", _env(base), read_only)
    assert result["writable"] == []
    assert result["err"] < 1e-12
    assert result["cache"] == "none"


def test_read_only_install_loads_a_warm_cache(tmp_path):
    """A cache built at install time in the package's __pycache__ is loaded
    from the read-only tree (NUMBA_CACHE_DIR read-only and empty)."""
    base = _install(tmp_path, "warm", with_cache=True)
    # "Install time": the tree is writable; Numba caches in its __pycache__.
    built = _probe(base, "attention", _env(base, cache_dir=False))
    assert built["cache"] == "write"
    read_only = [base / "site", base / "home", base / "numba-cache"]
    result = _probe(base, "attention", _env(base), read_only)
    assert result["writable"] == []
    assert result["err"] < 1e-12
    assert result["cache"] == "read-only"
    assert result["hits"] >= 1


def test_warm_read_only_cache_preferred_to_a_later_writable_one(tmp_path):
    """Read-only package with a warm cache, writable HOME: the package's
    cache is loaded (Numba alone would compile again into ~/.cache)."""
    base = _install(tmp_path, "mixed", with_cache=True)
    built = _probe(base, "attention", _env(base, cache_dir=False))
    assert built["cache"] == "write"
    result = _probe(base, "attention", _env(base, cache_dir=False), [base / "site"])
    assert result["writable"] == []
    assert result["err"] < 1e-12
    assert result["cache"] == "read-only"
    assert result["hits"] >= 1
    written = [p for p in (base / "home").rglob("*") if p.is_file()]
    assert written == []  # attention was loaded, not compiled into ~/.cache


# ---------------------------------------------------------------------------
# 4. fork after first use
# ---------------------------------------------------------------------------

_FORK = """
import json, multiprocessing, sys
import numpy as np
import numbattn
from numbattn import reference

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 3, 17, 8)) for _ in range(3))


def work(i):
    from numbattn.cpu import backend

    out = numbattn.attention(q * (i + 1), k, v, causal=True, window=(5, -1))
    s = numbattn.softmax(numbattn.scores(q * (i + 1), k))
    return out, s, getattr(backend, "serial", lambda: None)()


if __name__ == "__main__":
    import numba

    work(0)  # a CPU kernel runs in the parent first: Numba's threads start
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(work, range(4))
    err = 0.0
    for i, (out, s, _) in enumerate(results):
        ref = reference.attention(q * (i + 1), k, v, causal=True, window=(5, -1))[0]
        sref = reference.softmax(reference.scores(q * (i + 1), k))
        err = max(err, float(np.abs(out - ref).max()), float(np.abs(s - sref).max()))
    omppool = sys.modules.get("numba.np.ufunc.omppool")
    gnu = numba.threading_layer() == "omp" and getattr(omppool, "openmp_vendor", "") == "GNU"
    print(json.dumps({"err": err, "gnu_openmp": gnu, "serial": [r[2] for r in results]}))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="no fork on Windows")
def test_fork_pool_after_first_call(tmp_path):
    """multiprocessing's fork Pool after a CPU kernel ran: correct results, no
    hang (was: GNU OpenMP killed each child and the pool waited forever)."""
    script = tmp_path / "fork_pool.py"
    script.write_text(_FORK)
    result = _run(f"exec(open({str(script)!r}).read())", timeout=300)
    assert result["err"] < 1e-12
    # Under GNU OpenMP the children ran the serial kernels (tbb, workqueue
    # and Intel OpenMP are fork-safe: the parallel ones).
    assert result["serial"] == [result["gnu_openmp"]] * 4
