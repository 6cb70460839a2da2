"""Split and paged calls own their scratch: two calls queued on one stream
never read each other's partials, and device memory stays flat over any
number of calls and stream objects.

A split call makes two launches (the streaming kernel writes partials into
scratch, the merge kernel reads them). The simulator runs one host thread's
kernels at a time, so the interleaving of two threads' calls on one stream
is reproduced at the launch boundary: call B runs whole between call A's two
launches. On a GPU the same is also run with real threads.
"""

import gc
import tracemalloc

import numpy as np
import pytest

import numbattn
from numbattn import reference
from numbattn.cuda import backend as BE
from tests.gpu.conftest import on_simulator
from tests.helpers import assert_close, poisoned, randn, run_threads

cuda = pytest.importorskip("numba.cuda")


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


def _problem(seed, b=2, hq=2, hk=1, nq=2, nk=13, d=4, dv=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = randn(rng, (b, hq, nq, d), dtype)
    k, v = randn(rng, (b, hk, nk, d), dtype), randn(rng, (b, hk, nk, dv), dtype)
    return q, k, v


@pytest.fixture
def interleave(monkeypatch):
    """Patches the launch boundary: ``interleave(other)`` makes ``other()``
    run whole right after the next split call's first (streaming) launch,
    before that call's merge launch is queued."""
    real = BE._launch
    pending = []

    def launch(kern, sig, grid, block, stream, args):
        real(kern, sig, grid, block, stream, args)
        if pending and sig == BE.decode_signature(args.q.dtype) and args.split_rows:
            pending.pop()()

    monkeypatch.setattr(BE, "_launch", launch)
    return pending.append


@pytest.mark.parametrize("paged", [False, True])
def test_interleaved_split_calls_on_one_stream(interleave, paged):
    stream = cuda.stream()
    qa, ka, va = _problem(1)
    qb, kb, vb = (x * 3 for x in _problem(2))
    ref_a, ref_b = (reference.attention(*p)[0] for p in ((qa, ka, va), (qb, kb, vb)))
    out_a, out_b = dev(poisoned(ref_a.shape, np.float64)), dev(poisoned(ref_b.shape, np.float64))

    def call(q, k, v, out):
        if not paged:
            return numbattn.attention(dev(q), dev(k), dev(v), num_splits=3, out=out, stream=stream)
        # One block per sequence: block b holds sequence b's keys.
        kc, vc = (dev(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (k, v))
        table = dev(np.arange(q.shape[0], dtype=np.int32).reshape(-1, 1))
        lengths = np.full(q.shape[0], k.shape[2])
        return numbattn.paged_attention(
            dev(q), kc, vc, table, lengths, num_splits=3, out=out, stream=stream
        )

    interleave(lambda: call(qb, kb, vb, out_b))
    call(qa, ka, va, out_a)
    assert_close(out_a.copy_to_host(), ref_a, np.float64, "call A")
    assert_close(out_b.copy_to_host(), ref_b, np.float64, "call B")


def _device_bytes_in_use() -> int:
    """Device memory in use after every freed Numba array is released."""
    gc.collect()
    ctx = cuda.current_context()
    ctx.synchronize()
    ctx.deallocations.clear()
    free, total = ctx.get_memory_info()
    return total - free


def test_memory_flat_over_calls_and_stream_objects(monkeypatch):
    """``stream=1`` builds a new Numba stream object on every call: memory
    after 1000 split calls equals memory after 10. On the simulator (no
    device memory to read) the host memory holding its device arrays is
    measured, with the kernels themselves skipped to keep it fast."""
    q, k, v = (dev(x) for x in _problem(3, nq=4, dv=64))
    out = dev(poisoned((2, 2, 4, 64), np.float64))
    if on_simulator():
        monkeypatch.setattr(BE, "_launch", lambda *args: None)
        tracemalloc.start()
        usage = lambda: (gc.collect(), tracemalloc.get_traced_memory()[0])[1]  # noqa: E731
    else:
        usage = _device_bytes_in_use
    try:
        for _ in range(10):
            numbattn.attention(q, k, v, num_splits=2, out=out, stream=1)
        after_10 = usage()
        for _ in range(990):
            numbattn.attention(q, k, v, num_splits=2, out=out, stream=1)
        after_1000 = usage()
    finally:
        if on_simulator():
            tracemalloc.stop()
    # One call's scratch is 2 * 2 * 2 * 4 * 65 * 8 = 16.6 kB: 990 of them kept
    # would be 16 MB. The tolerance covers allocator granularity and, on the
    # simulator, whose streams have no handle, the sequence-table cache
    # filling to its 64 entries (about 0.1 MB there; one entry on a GPU).
    assert after_1000 - after_10 <= 256 * 1024, (after_10, after_1000)


@pytest.mark.skipif(on_simulator(), reason="real threads need a GPU")
def test_threads_sharing_one_stream():
    """Four host threads call split attention on one stream, each on its
    own inputs; every result matches its reference."""
    stream = cuda.stream()
    problems = [_problem(10 + i, b=4, nk=4099, d=64, dv=64) for i in range(4)]
    refs = [reference.attention(*p)[0] for p in problems]
    errors: list[str] = []

    def worker(i):
        q, k, v = (dev(x) for x in problems[i])
        for it in range(50):
            out = numbattn.attention(q, k, v, num_splits=4, stream=stream)
            stream.synchronize()
            try:
                assert_close(out.copy_to_host(), refs[i], np.float64, f"thread {i} call {it}")
            except AssertionError as exc:
                errors.append(str(exc))
                return

    run_threads(worker, 4)
    assert not errors, errors[:3]


@pytest.mark.skipif(on_simulator(), reason="torch's CUDA allocator needs a GPU")
def test_torch_scratch_memory_flat():
    """With torch tensors the scratch comes from torch's caching allocator
    on the call's stream: torch's allocated bytes are flat over 1000 calls."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float64, generator=g)
    k, v = (torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.float64, generator=g)
            for _ in range(2))  # fmt: skip
    out = torch.full_like(q, float("nan"))
    side = torch.cuda.Stream()
    for s in (None, side):
        for n in (10, 990):
            for _ in range(n):
                numbattn.attention(q, k, v, num_splits=4, out=out, stream=s)
            torch.cuda.synchronize()
            if n == 10:
                before = torch.cuda.memory_allocated()
        assert torch.cuda.memory_allocated() == before
        ref = reference.attention(*(t.cpu().numpy() for t in (q, k, v)))[0]
        assert_close(out.cpu().numpy(), ref, np.float64, f"stream {s}")
