"""The typed CUDA kernel arguments (numbattn.cuda.args) are the kernels'
parameters: same names, same order, and the signature the backend compiles
types every flag as a boolean. Runs without a GPU and without the simulator:
making a ``@cuda.jit`` dispatcher compiles nothing."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

pytest.importorskip("numba_cuda")

from numbattn.cuda import args as A
from numbattn.cuda import backend as BE
from numbattn.cuda import backward as B
from numbattn.cuda import decode as D
from numbattn.cuda import geometry as G
from numbattn.cuda import kernels as K
from numbattn.cuda import tensor as T

DTYPES = (np.float32, np.float64)


def _kernels(dtype):
    """(args type, dispatcher) for every kernel factory, at a small geometry."""
    geo = (4, 4, 1, 2, 8, 2)  # TY, TX, RQ, RK, DC, RC
    out = (
        [(A.AttentionArgs, K.make_attention(dtype, *geo, hw=hw)) for hw in (False, True)]
        + [
            (A.ScoresArgs, K.make_scores(dtype, 8, 2, 4)),
            (A.SoftmaxArgs, K.make_softmax(dtype, 8, 64)),
            (A.MergeArgs, K.make_merge(dtype, 128)),
            (A.SplitMergeArgs, D.make_split_merge(dtype, 8)),
        ]
        + [(A.BackwardArgs, B.make_backward(dtype, kv, 2, 2, 2, 2, 8, 8)) for kv in (False, True)]
        + [(A.DecodeArgs, D.make_decode(dtype, 4, 2, 2, 2, 2, hw=hw)) for hw in (False, True)]
    )
    for kind in G.KINDS[np.dtype(dtype).name]:
        tc = G.TensorCoreGeometry(np.dtype(dtype).name, kind, 1, 8, 8, 8)
        out += [(A.AttentionArgs, T.make_attention_tc(tc, hw=hw)) for hw in (False, True)]
    return out


def _params(dispatcher) -> list[str]:
    return list(inspect.signature(dispatcher.py_func).parameters)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fields_are_the_kernel_parameters(dtype):
    for args_type, kern in _kernels(dtype):
        assert list(args_type._fields) == _params(kern), kern.py_func.__name__


def test_tensor_core_kernels_checked():
    """Every product step's forward kernel is among those checked above."""
    names = {kern.py_func.__name__ for dt in DTYPES for _, kern in _kernels(dt)}
    assert "attention_tc_kernel" in names
    assert {k for ks in G.KINDS.values() for k in ks} == {"tf32x3", "tf32", "f64", "f64x4"}


def _split(sig: str) -> list[str]:
    m = re.fullmatch(r"void\((.*)\)", sig)
    assert m, sig
    return [part.strip() for part in m.group(1).split(", ")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "args_type",
    [
        A.AttentionArgs,
        A.ScoresArgs,
        A.SoftmaxArgs,
        A.MergeArgs,
        A.BackwardArgs,
        A.DecodeArgs,
        A.SplitMergeArgs,
    ],
)
def test_signature_types(args_type, dtype):
    """Flags are b1, counts and windows int64, scale the call's dtype, and
    arrays the dtype (mask: b1, sequence table: int64) with 3 or 4 dims."""
    name = np.dtype(dtype).name
    types_ = dict(zip(args_type._fields, _split(A.signature(args_type, dtype)), strict=True))
    for field, t in types_.items():
        if field.startswith(("has_", "write_")) or field == "paged":
            assert t == "b1", field
        elif field in ("n_qt", "n_it", "n_tiles", "k_rows", "wl", "wr", "gh", "n_rt", "n_split",
                       "split_rows", "block_size"):  # fmt: skip
            assert t == "int64", field
        elif field == "table":
            assert t == "int32[:,:]"
        elif field == "scale":
            assert t == name
        elif field == "mask":
            assert t == "b1[:,:,:,:]"
        elif field == "seq":
            assert t == "int64[:,:,:]"
        else:
            assert t in (f"{name}[:,:,:]", f"{name}[:,:,:,:]"), field


@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_signatures_and_launches_use_the_descriptions(dtype):
    sigs = {
        A.AttentionArgs: BE.attention_signature,
        A.ScoresArgs: BE.scores_signature,
        A.SoftmaxArgs: BE.softmax_signature,
        A.MergeArgs: BE.merge_signature,
        A.BackwardArgs: BE.backward_signature,
        A.DecodeArgs: BE.decode_signature,
        A.SplitMergeArgs: BE.split_merge_signature,
    }
    for args_type, fn in sigs.items():
        assert fn(dtype) == A.signature(args_type, dtype)
    launches = BE.kernel_launches(dtype)
    assert {launch["kernel"] for launch in launches} == {
        "attention", "scores", "softmax", "merge", "backward_dq", "backward_dkdv", "decode",
        "split_merge",
    }  # fmt: skip
    for launch in launches:
        assert launch["signature"] == A.signature(launch["args"], dtype)
        assert list(launch["args"]._fields) == _params(launch["dispatcher"])


def test_flags_are_booleans_in_the_compiled_types():
    """Numba parses the signature with every flag a boolean."""
    from numba import types
    from numba.core import sigutils

    args, _ = sigutils.normalize_signature(A.signature(A.AttentionArgs, np.float32))
    typed = dict(zip(A.AttentionArgs._fields, args, strict=True))
    for flag in ("write_lse", "has_bias", "has_mask"):
        assert typed[flag] == types.boolean
    assert typed["n_qt"] == types.int64
    assert typed["scale"] == types.float32


def test_backend_builds_flags_by_name(monkeypatch):
    dummies = []

    def dummy(dtype, ndim):
        dummies.append((np.dtype(dtype), ndim))
        return f"dummy{ndim}"

    monkeypatch.setattr(BE, "_dummy", dummy)
    q = np.zeros((1, 1, 2, 3), np.float32)
    mask = np.ones((1, 1, 2, 2), dtype=bool)
    args = BE.attention_args(q, q, q, q, None, "table", 1, None, mask, 0.5, -3, 0)
    assert isinstance(args, A.AttentionArgs)
    assert (args.write_lse, args.has_bias, args.has_mask) == (False, False, True)
    assert (args.lse, args.bias, args.mask, args.seq) == ("dummy3", "dummy4", mask, "table")
    assert (args.n_qt, args.wl, args.wr) == (1, -1, 0)
    assert args.scale == 0.5 and type(args.scale) is np.float32
    args = BE.scores_args(q, q, q, "table", 2, q, None, 1.0, 4, -1)
    assert isinstance(args, A.ScoresArgs)
    assert (args.has_bias, args.has_mask, args.n_it, args.wl, args.wr) == (True, False, 2, 4, -1)
    assert args.bias is q and args.mask == "dummy4"
