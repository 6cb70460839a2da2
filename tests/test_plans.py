"""Call plans (numbattn._plans): a repeated CPU call replays the launches its
signature's first call recorded.

Replays are compared bitwise with the full path (plans cleared) on poisoned
outputs, for every option and layout that a plan may hold; a property that
changes between two calls (a stride, a dtype, an overlapping output, a length
past Nk, a knob) gets the error the full path raises, before anything is
written; plans keep no caller's array alive, are shared safely by threads,
and are bounded.
"""

import gc
import weakref

import numpy as np
import pytest

import numbattn
from numbattn import _plans, reference

from .helpers import assert_close, poisoned, randn, run_threads


@pytest.fixture(autouse=True)
def _fresh_plans():
    _plans.clear()
    yield
    _plans.clear()


def _full_path(fn):
    """``fn()`` through the full path: no plan is looked up or stored."""
    saved = _plans.signature
    _plans.signature = lambda *a: None
    try:
        return fn()
    finally:
        _plans.signature = saved


def _problem(rng, dtype, lead=(2, 4), hk=None, nq=5, nk=9, d=8, dv=6):
    hk = lead[-1] if hk is None else hk
    q = randn(rng, lead + (nq, d), dtype)
    k = randn(rng, lead[:-1] + (hk, nk, d), dtype)
    v = randn(rng, lead[:-1] + (hk, nk, dv), dtype)
    return q, k, v


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": (3, 1), "diagonal": -2},
    "lengths": {"key_lengths": np.array([9, 4]), "query_lengths": np.array([5, 2])},
    "bias-mask": {"bias": "bias", "mask": "mask"},
    "splits": {"num_splits": 3},
    "scale": {"scale": 0.3},
    "per-batch-diagonal": {"diagonal": np.array([1, -3]), "causal": True},
}


def _options(rng, name, dtype, nq, nk):
    opts = dict(CASES[name])
    if "bias" in opts:
        opts["bias"] = randn(rng, (1, 4, nq, nk), dtype)
        opts["mask"] = rng.random((2, 1, 1, nk)) > 0.3
    return opts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", ["tiled", "decode", "gqa-decode", "3-d", "transposed"])
@pytest.mark.parametrize("case", list(CASES))
def test_replay_matches_the_full_path(rng, case, shape, dtype):
    nq = {"tiled": 40, "decode": 1, "gqa-decode": 2, "3-d": 5, "transposed": 7}[shape]
    hk = 2 if shape == "gqa-decode" else None
    q, k, v = _problem(rng, dtype, hk=hk, nq=nq)
    if shape == "3-d":
        q, k, v = q[0], k[0], v[0]
    if shape == "transposed":  # (B, N, H, d) storage, viewed as (B, H, N, d)
        q, k, v = (np.ascontiguousarray(x.swapaxes(1, 2)).swapaxes(1, 2) for x in (q, k, v))
    opts = _options(rng, case, dtype, nq, k.shape[-2])
    if "query_lengths" in opts:
        opts["query_lengths"] = np.minimum(opts["query_lengths"], nq)
    if shape == "3-d":
        if case in ("lengths", "per-batch-diagonal"):
            pytest.skip("lengths and per-batch diagonals need a batch axis of 2")
        opts = {n: (x[0] if n in ("bias", "mask") else x) for n, x in opts.items()}
    out_shape, lse_shape = q.shape[:-1] + (v.shape[-1],), q.shape[:-1]
    want_out, want_lse = poisoned(out_shape, dtype), poisoned(lse_shape, dtype)
    _full_path(lambda: numbattn.attention(q, k, v, out=want_out, lse=want_lse, **opts))
    ref_opts = {n: x for n, x in opts.items() if n != "num_splits"}
    assert_close(want_out, reference.attention(q, k, v, **ref_opts)[0], dtype, "full path")
    for call in range(4):  # the full path, records, then replays twice on new buffers
        out, lse = poisoned(out_shape, dtype), poisoned(lse_shape, dtype)
        assert numbattn.attention(q, k, v, out=out, lse=lse, **opts) is out
        assert out.tobytes() == want_out.tobytes(), f"call {call}"
        assert lse.tobytes() == want_lse.tobytes(), f"call {call}"
        fresh = numbattn.attention(q, k, v, **opts)
        assert fresh is not out and fresh.tobytes() == want_out.tobytes()
    # New inputs of the same signature: the replay reads them, not the first call's.
    q2 = randn(rng, q.shape, dtype)
    out = poisoned(out_shape, dtype)
    numbattn.attention(q2.copy(), k, v, out=out, **opts)
    assert_close(out, reference.attention(q2, k, v, **ref_opts)[0], dtype, "new q")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nq", [1, 3, 40])
@pytest.mark.parametrize("case", list(CASES))
def test_serial_twins_for_small_calls(rng, monkeypatch, case, nq, dtype):
    """Calls of at most config.CPU_SERIAL_WORK multiply-adds run the kernels'
    serial twins, with the parallel kernels' results bit for bit, recorded
    and replayed as such."""
    from numbattn.cpu import backend

    q, k, v = _problem(rng, dtype, nq=nq)
    opts = _options(rng, case, dtype, nq, k.shape[-2])
    if "query_lengths" in opts:
        opts["query_lengths"] = np.minimum(opts["query_lengths"], nq)
    shape = q.shape[:-1] + (v.shape[-1],)
    want = _full_path(lambda: numbattn.attention(q, k, v, out=poisoned(shape, dtype), **opts))
    monkeypatch.setattr(numbattn.config, "CPU_SERIAL_WORK", 1 << 30)
    ran = []
    real = backend.run_kernel
    monkeypatch.setattr(backend, "run_kernel", lambda kern, a: (ran.append(kern), real(kern, a)))
    for _ in range(4):  # the full path, records, then replays
        out = numbattn.attention(q, k, v, out=poisoned(shape, dtype), **opts)
        assert out.tobytes() == want.tobytes()
    assert ran and all(kern.__name__.endswith("_serial") for kern in ran)


def test_replays_come_from_a_plan(rng, monkeypatch):
    """The second call with one signature validates nothing (the plan holds
    it) and launches the recorded kernels; a new signature records anew."""
    q, k, v = _problem(rng, np.float32, nq=1)
    out = poisoned(q.shape[:-1] + (6,), np.float32)
    numbattn.attention(q, k, v, out=out)
    assert len(_plans._plans) == 0  # a signature seen once records nothing
    numbattn.attention(q, k, v, out=out)
    assert len(_plans._plans) == 1
    calls = []
    monkeypatch.setattr(numbattn.api, "_prepare", lambda *a: calls.append(a))
    numbattn.attention(q, k, v, out=out)
    assert calls == []
    with pytest.raises(TypeError):  # a new signature takes the full path (here patched)
        numbattn.attention(q, k, v, out=out, causal=True)
    assert len(calls) == 1


def test_a_signature_called_once_records_nothing(rng, monkeypatch):
    """A loop whose signature changes every call (here the scale) pays for no
    recording: only a second call with one signature records."""
    q, k, v = _problem(rng, np.float32, nq=1)
    recorded = []
    real = _plans.store
    monkeypatch.setattr(_plans, "store", lambda *a: (recorded.append(a[0]), real(*a)))
    for scale in np.linspace(0.1, 1.0, 5):
        numbattn.attention(q, k, v, scale=float(scale))
    assert recorded == [] and len(_plans._plans) == 0


def _expect_untouched(fn, exc, match, *buffers):
    before = [b.copy() for b in buffers]
    with pytest.raises(exc, match=match):
        fn()
    for b, orig in zip(buffers, before):
        assert b.tobytes() == orig.tobytes()


def test_one_property_changed_after_a_warm_plan(rng, monkeypatch):
    """Each call first warms the plan of a good call, then changes one thing."""
    q, k, v = _problem(rng, np.float32, nq=7, dv=8)
    out, lse = poisoned((2, 4, 7, 8), np.float32), poisoned((2, 4, 7), np.float32)

    def warm(**kw):
        numbattn.attention(q, k, v, out=poisoned(out.shape, np.float32), **kw)
        numbattn.attention(q, k, v, out=poisoned(out.shape, np.float32), **kw)

    warm()
    # A stride: q read through a strided view (same shape).
    wide = np.zeros(q.shape[:-1] + (16,), np.float32)[..., ::2]
    wide[...] = q
    numbattn.attention(wide, k, v, out=out)
    assert_close(out, reference.attention(q, k, v)[0], np.float32, "strided q")
    # A dtype.
    _expect_untouched(
        lambda: numbattn.attention(q, k, v.astype(np.float64), out=out),
        TypeError,
        "v must have dtype float32",
        out,
    )
    # An output overlapping an input, through a view of the same layout (the
    # signature cannot see it: the replay's overlap check must).
    buf = poisoned(out.shape, np.float32)
    q_in_buf = buf[:]
    q_in_buf[...] = 0.5
    for _ in range(2):  # warm: out with buf's layout
        numbattn.attention(q, k, v, out=buf.copy())
    _expect_untouched(
        lambda: numbattn.attention(q_in_buf[..., :8], k, v, out=buf),
        ValueError,
        "out must not overlap q",
        buf,
    )
    lse_in_out = out[..., 0]
    for _ in range(2):
        numbattn.attention(
            q,
            k,
            v,
            out=poisoned(out.shape, np.float32),
            lse=poisoned(out.shape, np.float32)[..., 0],
        )
    _expect_untouched(
        lambda: numbattn.attention(q, k, v, out=out, lse=lse_in_out),
        ValueError,
        "lse must not overlap out",
        out,
    )
    # A length past Nk, after the same call with good lengths.
    warm(key_lengths=np.array([9, 3]))
    _expect_untouched(
        lambda: numbattn.attention(q, k, v, out=out, lse=lse, key_lengths=np.array([9, 10])),
        ValueError,
        r"key_lengths must lie in \[0, 9\], got 10",
        out,
        lse,
    )
    # A read-only output of the same layout.
    ro = poisoned(out.shape, np.float32)
    ro.flags.writeable = False
    _expect_untouched(
        lambda: numbattn.attention(q, k, v, out=ro), ValueError, "out must be writeable", ro
    )
    # The same object as two arguments (self-attention) after distinct ones.
    x = randn(rng, (2, 4, 7, 8), np.float32)
    warm_out = poisoned(out.shape, np.float32)
    for _ in range(2):
        numbattn.attention(x.copy(), x.copy(), x.copy(), out=warm_out)
    numbattn.attention(x, x, x, out=out)
    assert_close(out, reference.attention(x, x, x)[0], np.float32, "x, x, x")
    # A knob.
    monkeypatch.setattr(numbattn.config, "CPU_STREAM_KEY_TILE", 0)
    _expect_untouched(
        lambda: numbattn.attention(q, k, v, out=out),
        ValueError,
        "CPU_STREAM_KEY_TILE must be a positive integer",
        out,
    )


def test_plans_keep_no_caller_array(rng):
    q, k, v = _problem(rng, np.float64, nq=1)
    out = poisoned(q.shape[:-1] + (6,), np.float64)
    for _ in range(3):
        numbattn.attention(q, k, v, out=out)
    refs = [weakref.ref(x) for x in (q, k, v, out)]
    del q, k, v, out
    gc.collect()
    assert all(r() is None for r in refs)
    assert len(_plans._plans) == 1


def test_threads_share_a_plan(rng):
    """Four threads replay one plan on their own arrays (split-K decode:
    the streaming kernel's scratch is per call)."""
    problems = [_problem(np.random.default_rng(i), np.float64, nq=1, nk=300) for i in range(4)]
    refs = [reference.attention(*p)[0] for p in problems]
    numbattn.attention(*problems[0], num_splits=3)
    errors = []

    def worker(i):
        for _ in range(100):
            out = numbattn.attention(*problems[i], num_splits=3)
            if out.tobytes() != numbattn.attention(*problems[i], num_splits=3).tobytes():
                errors.append(f"thread {i}: replays differ")
            if np.abs(out - refs[i]).max() > 1e-12:
                errors.append(f"thread {i}: wrong result")
                return

    run_threads(worker, 4)
    assert not errors, errors[:3]
    assert len(_plans._plans) == 1


def test_plans_are_bounded(rng, monkeypatch):
    monkeypatch.setattr(_plans, "MAX_PLANS", 4)
    q, k, v = _problem(rng, np.float32, nq=1)
    for scale in np.linspace(0.1, 1.0, 10):
        numbattn.attention(q, k, v, scale=float(scale))
        numbattn.attention(q, k, v, scale=float(scale))
    assert len(_plans._plans) == 4


def test_calls_outside_a_signature_take_the_full_path(rng):
    """Lists for lengths and windows given as lists are not cached (their
    contents could change); nor are GPU arrays (another backend)."""
    q, k, v = _problem(rng, np.float32, nq=1)
    for _ in range(2):
        numbattn.attention(q, k, v, key_lengths=[9, 2])
        numbattn.attention(q, k, v, window=[2, 0])
    assert len(_plans._plans) == 0 and len(_plans._seen) == 0
    assert _plans.signature("attention", (q.tolist(), k, v), ()) is None


def test_reloading_config_starts_a_new_generation():
    """A reload (shipped values back) and every knob assignment change the
    signature; a copy of the module loaded from its file leaves it alone."""
    import importlib
    import importlib.util

    before = numbattn.config._generation
    importlib.reload(numbattn.config)
    after = numbattn.config._generation
    assert after > before
    numbattn.config.CPU_SERIAL_WORK = 0
    assert numbattn.config._generation > after
    spec = importlib.util.spec_from_file_location("_copy_of_config", numbattn.config.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.CPU_KEY_TILE == numbattn.config.CPU_KEY_TILE
