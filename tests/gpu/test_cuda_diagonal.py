"""The ``diagonal`` keyword on GPU arrays (tests/test_diagonal.py on the CPU):
every CUDA kernel reads the alignment from the sequence table's ALIGN column."""

import numpy as np
import pytest

import numbattn
from numbattn import reference
from tests.helpers import DTYPES, assert_close, poisoned, randn

cuda = pytest.importorskip("numba.cuda")


def dev(x):
    return cuda.to_device(np.ascontiguousarray(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal, window", [(True, None), (False, (2, 1))])
def test_matches_reference(dtype, causal, window):
    rng = np.random.default_rng(7)
    nq, nk = 9, 13
    q, k, v = (randn(rng, (2, 1, n, 4), dtype) for n in (nq, nk, nk))
    klen, qlen = np.array([13, 6]), np.array([9, 4])
    for diagonal in (-5, 0, 11, 2**60, np.array([3, -2])):
        kw = dict(causal=causal, window=window, diagonal=diagonal)
        kw.update(key_lengths=klen, query_lengths=qlen)
        out, lse = dev(poisoned((2, 1, nq, 4), dtype)), dev(poisoned((2, 1, nq), dtype))
        numbattn.attention(dev(q), dev(k), dev(v), out=out, lse=lse, **kw)
        ref_out, ref_lse = reference.attention(q, k, v, **kw)
        assert_close(out.copy_to_host(), ref_out, dtype, f"out diagonal={diagonal}")
        assert_close(lse.copy_to_host(), ref_lse, dtype, f"lse diagonal={diagonal}")
        s = dev(poisoned((2, 1, nq, nk), dtype))
        numbattn.scores(dev(q), dev(k), out=s, **kw)
        assert_close(s.copy_to_host(), reference.scores(q, k, **kw), dtype, "scores")
