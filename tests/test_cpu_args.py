"""The typed CPU kernel arguments (numbattn.cpu.args) are the kernels' parameters:
same names, same order, and the kinds the one-layout dispatcher compiles."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from numbattn.cpu import args as A
from numbattn.cpu import backend as BE
from numbattn.cpu import kernels as K

KERNELS = {
    "scores": (K.scores_kernel, A.ScoresArgs),
    "softmax": (K.softmax_kernel, A.SoftmaxArgs),
    "attention": (K.attention_kernel, A.AttentionArgs),
    "merge": (K.merge_kernel, A.MergeArgs),
    "attention_backward": (K.attention_backward_kernel, A.AttentionBackwardArgs),
}


@pytest.mark.parametrize("which", sorted(KERNELS))
def test_fields_are_the_kernel_parameters(which):
    kernel, args_type = KERNELS[which]
    params = list(inspect.signature(kernel.py_func).parameters)
    assert list(args_type._fields) == params
    assert kernel.args_type is args_type
    assert kernel.serial.args_type is args_type


@pytest.mark.parametrize("which", sorted(KERNELS))
def test_kinds_match_defaults(which):
    """Flags are booleans, floats float64, ints int64, arrays 3- or 4-d."""
    _, args_type = KERNELS[which]
    for name, kind in zip(args_type._fields, A.arg_kinds(args_type)):
        if name.startswith("has_"):
            assert kind == A.FLAG, name
        elif name == "scale":
            assert kind == A.FLOAT
        elif isinstance(kind, tuple):
            assert kind[1] in (3, 4)
        else:
            assert kind == A.INT, name


def test_signature_types_flags_as_booleans():
    from numba import types

    sig = dict(zip(A.AttentionArgs._fields, K.attention_kernel.signature_for(np.float32)))
    for flag in ("has_lse", "has_bias", "has_mask"):
        assert sig[flag] == types.boolean
    assert sig["lse"] == types.Array(types.float32, 3, "A")
    assert sig["mask"] == types.Array(types.boolean, 4, "A", readonly=True)


def test_backend_builds_flags_by_name():
    q = np.zeros((1, 1, 2, 3))
    mask = np.ones((1, 1, 2, 2), dtype=bool)
    args = BE.attention_args(q, q, q, q.copy(), None, None, 2, None, mask, 1.0, -1, 0)
    assert (args.has_lse, args.has_bias, args.has_mask) == (False, False, True)
    assert args.mask is mask
    args = BE.scores_args(q, q, np.zeros((1, 1, 2, 2)), None, 2, q, None, 1.0, -1, 0, 8, 16)
    assert (args.has_bias, args.has_mask, args.q_tile, args.k_tile) == (True, False, 8, 16)
