"""numbattn: batched scaled-dot-product attention kernels compiled with Numba.

Three kernels, each on the CPU (``@njit(parallel=True)``) and on NVIDIA GPUs
(``@cuda.jit``, with the ``cuda`` extra), chosen by where the inputs live:

- :func:`scores`: blocked pairwise scores ``scale * q @ k^T``;
- :func:`softmax`: row-wise numerically stable softmax;
- :func:`attention`: fused attention with an online softmax, never storing
  the (Nq, Nk) score matrix; with key/query lengths, bias, boolean masks,
  sliding windows and grouped-query heads;
- :func:`varlen_attention`: packed variable-length batches (cu_seqlens);
- :func:`merge_attention`: exact combination of partial results.

:mod:`numbattn.reference` is the float64 NumPy specification they are tested
against. Importing numbattn never needs CUDA.
"""

from . import config, reference
from .api import attention, merge_attention, scores, softmax, varlen_attention
from .cpu import backend as _cpu_backend  # noqa: F401  (fork guard; imports no Numba)

__version__ = "0.1.0"


def cuda_available() -> bool:
    """True when numba-cuda (NVIDIA implementation) and a usable GPU are present.

    Never raises; see :func:`numbattn.cuda.backend.require_cuda` for the
    reason when it returns False.
    """
    try:
        from .cuda import backend
    except ImportError:
        return False
    return backend.cuda_problem() is None


__all__ = [
    "__version__",
    "attention",
    "config",
    "cuda_available",
    "merge_attention",
    "reference",
    "scores",
    "softmax",
    "varlen_attention",
]
