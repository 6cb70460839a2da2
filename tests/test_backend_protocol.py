"""Both backend modules satisfy the one written interface, numbattn._backend.Backend:
the same functions, parameter names, kinds and defaults."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from numbattn._backend import Backend
from numbattn.cpu import backend as cpu_backend
from numbattn.cuda import backend as cuda_backend

BACKENDS = {"cpu": cpu_backend, "cuda": cuda_backend}


def _members():
    names = [n for n, v in vars(Backend).items() if not n.startswith("_") and inspect.isfunction(v)]
    return sorted(names)


def test_protocol_lists_the_interface():
    assert {"attention", "scores", "softmax", "merge", "resolve_stream"} <= set(_members())
    assert "name" in Backend.__annotations__


@pytest.mark.parametrize("which", sorted(BACKENDS))
def test_backend_matches_protocol(which):
    module = BACKENDS[which]
    assert module.name == which
    for member in _members():
        assert hasattr(module, member), f"{which} backend lacks {member}"
        want = list(inspect.signature(getattr(Backend, member)).parameters.values())[1:]
        got = list(inspect.signature(getattr(module, member)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in got] == [
            (p.name, p.kind, p.default) for p in want
        ], f"{which}.{member}"


def test_cpu_merge_without_lse():
    rng = np.random.default_rng(0)
    o1, o2 = (rng.standard_normal((1, 2, 3, 4)) for _ in range(2))
    l1, l2 = (rng.standard_normal((1, 2, 3)) for _ in range(2))
    out, ref_out, ref_lse = (np.empty_like(a) for a in (o1, o1, l1))
    cpu_backend.merge(o1, l1, o2, l2, ref_out, ref_lse)
    cpu_backend.merge(o1, l1, o2, l2, out, None)
    np.testing.assert_array_equal(out, ref_out)
