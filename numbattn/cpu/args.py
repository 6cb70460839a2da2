"""Typed descriptions of the CPU kernels' positional arguments.

One :class:`~typing.NamedTuple` per kernel family. Its fields are the
kernel's parameters, in order and with the same names (a test compares them
with the ``@njit`` implementations' parameters), and each field's
``Annotated`` metadata is its *kind*, from which
:class:`numbattn.cpu.dispatch.OneLayoutKernel` builds the one Numba
signature it compiles per dtype:

* ``IN3`` / ``IN4`` / ``OUT3`` / ``OUT4``: an array of the call's float
  dtype with that many dimensions, read-only (``in``) or written (``out``);
* ``MASK`` (bool) / ``SEQ`` (int64) / ``BLOCKS`` (int32): a read-only array
  of that element type;
* ``INT`` / ``FLOAT`` / ``FLAG``: a scalar typed int64 / float64 / boolean.

Importing this module does not import Numba (``import numbattn`` stays
light); the kinds are plain data that the kernels module translates.

Callers build the tuple by keyword (:func:`numbattn.cpu.backend.attention_args`
and friends), so a flag cannot land in another flag's slot, and call
``kernel(*args)``.
"""

from typing import Annotated, Any, NamedTuple, get_type_hints

import numpy as np

#: Argument kinds (see the module docstring).
Kind = Any
IN3: Kind = ("in", 3)
IN4: Kind = ("in", 4)
OUT3: Kind = ("out", 3)
OUT4: Kind = ("out", 4)
MASK: Kind = ("bool", 4)
SEQ: Kind = ("int", 3)
BLOCKS: Kind = ("int32", 2)
INT: Kind = "int64"
FLOAT: Kind = "float64"
FLAG: Kind = "boolean"

In3 = Annotated[np.ndarray, IN3]
In4 = Annotated[np.ndarray, IN4]
Out3 = Annotated[np.ndarray, OUT3]
Out4 = Annotated[np.ndarray, OUT4]
Mask = Annotated[np.ndarray, MASK]
Seq = Annotated[np.ndarray, SEQ]
Blocks = Annotated[np.ndarray, BLOCKS]
Int = Annotated[int, INT]
Float = Annotated[float, FLOAT]
Flag = Annotated[bool, FLAG]


class ScoresArgs(NamedTuple):
    """``scores_kernel``: masked, biased ``scale * q @ k^T`` per sequence."""

    q: In4
    k: In4
    out: Out4
    bias: In4
    mask: Mask
    seq: Seq
    max_rows: Int
    has_bias: Flag
    has_mask: Flag
    scale: Float
    left: Int
    right: Int
    q_tile: Int
    k_tile: Int
    n_threads: Int


class SoftmaxArgs(NamedTuple):
    """``softmax_kernel``: row-wise softmax (``out`` may be ``x``)."""

    x: In3
    out: Out3


class AttentionArgs(NamedTuple):
    """``attention_kernel``: fused attention per sequence."""

    q: In4
    k: In4
    v: In4
    out: Out4
    lse: Out3
    bias: In4
    mask: Mask
    seq: Seq
    max_rows: Int
    has_lse: Flag
    has_bias: Flag
    has_mask: Flag
    scale: Float
    left: Int
    right: Int
    q_tile: Int
    k_tile: Int
    n_threads: Int


class MergeArgs(NamedTuple):
    """``merge_kernel``: combine two partial results (in place allowed)."""

    o1: In4
    l1: In3
    o2: In4
    l2: In3
    out: Out4
    lse: Out3


class AttentionBackwardArgs(NamedTuple):
    """``attention_backward_kernel``: dq, dk, dv of fused attention per sequence
    (``delta``: scratch for rowsum(dout * out); ``splits``: key-tile slices
    per key head, each with its own dQ accumulator)."""

    q: In4
    k: In4
    v: In4
    out: In4
    lse: In3
    dout: In4
    delta: Out3
    dq: Out4
    dk: Out4
    dv: Out4
    bias: In4
    mask: Mask
    seq: Seq
    max_rows: Int
    key_rows: Int
    max_keys: Int
    has_bias: Flag
    has_mask: Flag
    scale: Float
    left: Int
    right: Int
    q_tile: Int
    k_tile: Int
    splits: Int
    n_threads: Int


class DecodeArgs(NamedTuple):
    """``decode_kernel``: streaming split-K attention, dense or paged K / V."""

    q: In4
    k: In4
    v: In4
    table: Blocks
    out: Out4
    lse: Out3
    bias: In4
    mask: Mask
    seq: Seq
    max_rows: Int
    has_lse: Flag
    has_bias: Flag
    has_mask: Flag
    scale: Float
    left: Int
    right: Int
    num_splits: Int
    heads_per_item: Int
    q_tile: Int
    k_tile: Int
    wide_rows: Int
    n_threads: Int


def arg_kinds(args_type: type) -> tuple[Kind, ...]:
    """The kinds of ``args_type``'s fields, in order."""
    hints = get_type_hints(args_type, include_extras=True)
    return tuple(hints[name].__metadata__[0] for name in args_type._fields)  # type: ignore[attr-defined]
