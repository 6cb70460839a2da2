"""Typed descriptions of the CUDA kernels' positional arguments.

Mirror of :mod:`numbattn.cpu.args`. One :class:`~typing.NamedTuple` per
kernel family. Its fields are the kernel's parameters, in order and with the
same names (a test compares them with the Python functions of the
``@cuda.jit`` kernels that :mod:`numbattn.cuda.kernels` makes), and each
field's ``Annotated`` metadata is its *kind*, from which :func:`signature`
builds the Numba signature string that :mod:`numbattn.cuda.backend` compiles
and launches (and ``python -m numbattn gpu-report`` compiles):

* ``ARR3`` / ``ARR4``: an array of the call's float dtype with that many
  dimensions (layout 'A': any strides);
* ``MASK`` (``b1``) / ``SEQ`` (``int64``): an array of that element type;
* ``SCALAR``: a scalar of the call's float dtype;
* ``INT`` / ``FLAG``: a scalar typed ``int64`` / ``b1`` (boolean), so a flag
  passed where an integer belongs (or the reverse) is a typing error.

Importing this module does not import Numba (``import numbattn`` stays
light). Callers build the tuple by keyword
(:func:`numbattn.cuda.backend.attention_args` and friends), so a flag cannot
land in another flag's slot, and launch ``kernel[grid, block, stream](*args)``.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, NamedTuple, get_type_hints

import numpy as np

#: Argument kinds (see the module docstring).
Kind = Any
ARR3: Kind = ("float", 3)
ARR4: Kind = ("float", 4)
MASK: Kind = ("b1", 4)
SEQ: Kind = ("int64", 3)
SCALAR: Kind = "float"
INT: Kind = "int64"
FLAG: Kind = "b1"

#: A device array (numba-cuda's, or the simulator's) of the given kind.
Arr3 = Annotated[Any, ARR3]
Arr4 = Annotated[Any, ARR4]
Mask = Annotated[Any, MASK]
Seq = Annotated[Any, SEQ]
Scalar = Annotated[Any, SCALAR]  # a NumPy scalar of the call's dtype
Int = Annotated[int, INT]
Flag = Annotated[bool, FLAG]


class AttentionArgs(NamedTuple):
    """``attention_kernel`` / ``attention_mma_kernel``: fused attention of
    ``n_qt`` query tiles per sequence of the table ``seq``."""

    q: Arr4
    k: Arr4
    v: Arr4
    out: Arr4
    lse: Arr3
    seq: Seq
    bias: Arr4
    mask: Mask
    scale: Scalar
    n_qt: Int
    wl: Int
    wr: Int
    write_lse: Flag
    has_bias: Flag
    has_mask: Flag


class ScoresArgs(NamedTuple):
    """``scores_kernel``: masked, biased ``scale * q @ k^T``, ``n_it`` row tiles."""

    q: Arr4
    k: Arr4
    out: Arr4
    seq: Seq
    bias: Arr4
    mask: Mask
    scale: Scalar
    n_it: Int
    wl: Int
    wr: Int
    has_bias: Flag
    has_mask: Flag


class SoftmaxArgs(NamedTuple):
    """``softmax_kernel``: row-wise softmax (``out`` may be ``x``)."""

    x: Arr3
    out: Arr3


class MergeArgs(NamedTuple):
    """``merge_kernel``: combine two partial results (in place allowed)."""

    o1: Arr4
    l1: Arr3
    o2: Arr4
    l2: Arr3
    out: Arr4
    lse: Arr3
    write_lse: Flag


class BackwardArgs(NamedTuple):
    """``backward_kernel`` (both kernels of :mod:`numbattn.cuda.backward`):
    gradients of attention, ``n_tiles`` own-row tiles per sequence; the
    query kernel writes ``dq`` and ``delta``, the key kernel ``dk`` and ``dv``
    (``k_rows``: dk/dv rows per sequence beyond its key length, as
    ``key_rows`` of :meth:`numbattn._backend.Backend.attention_backward`)."""

    q: Arr4
    k: Arr4
    v: Arr4
    out: Arr4
    dout: Arr4
    lse: Arr3
    delta: Arr3
    dq: Arr4
    dk: Arr4
    dv: Arr4
    seq: Seq
    bias: Arr4
    mask: Mask
    scale: Scalar
    n_tiles: Int
    k_rows: Int
    wl: Int
    wr: Int
    has_bias: Flag
    has_mask: Flag


def arg_kinds(args_type: type) -> tuple[Kind, ...]:
    """The kinds of ``args_type``'s fields, in order."""
    hints = get_type_hints(args_type, include_extras=True)
    return tuple(hints[name].__metadata__[0] for name in args_type._fields)  # type: ignore[attr-defined]


def _type(kind: Kind, float_name: str) -> str:
    if isinstance(kind, tuple):
        elem, nd = kind
        elem = float_name if elem == "float" else elem
        return f"{elem}[{','.join([':'] * nd)}]"
    return float_name if kind == SCALAR else kind


@functools.cache
def _signature(args_type: type, dtype: np.dtype) -> str:
    name = dtype.name
    return f"void({', '.join(_type(kind, name) for kind in arg_kinds(args_type))})"


def signature(args_type: type, dtype) -> str:
    """The Numba signature string of a kernel taking ``args_type`` for float
    ``dtype`` (cached: a launch asks for it on every call)."""
    return _signature(args_type, np.dtype(dtype))


#: The paged cache's int32 block table (a dummy when the cache is contiguous).
BLOCKS: Kind = ("int32", 2)
Blocks = Annotated[Any, BLOCKS]


class DecodeArgs(NamedTuple):
    """``decode_kernel``: streaming split-K attention over a contiguous or
    paged KV cache (:mod:`numbattn.cuda.decode`)."""

    q: Arr4
    k: Arr4
    v: Arr4
    out: Arr4
    lse: Arr3
    seq: Seq
    table: Blocks
    bias: Arr4
    mask: Mask
    scale: Scalar
    gh: Int
    n_rt: Int
    n_split: Int
    split_rows: Int
    block_size: Int
    wl: Int
    wr: Int
    write_lse: Flag
    has_bias: Flag
    has_mask: Flag
    paged: Flag


class SplitMergeArgs(NamedTuple):
    """``split_merge_kernel``: combine ``n_split`` partial results per row."""

    part_o: Arr4
    part_l: Arr3
    out: Arr4
    lse: Arr3
    seq: Seq
    n_split: Int
    split_rows: Int
    write_lse: Flag
