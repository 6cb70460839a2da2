"""numbattn: batched scaled-dot-product attention kernels compiled with Numba.

Three kernels, each on the CPU (``@njit(parallel=True)``) and on NVIDIA GPUs
(``@cuda.jit``, with the ``cuda`` extra), chosen by where the inputs live:

- :func:`scores`: blocked pairwise scores ``scale * q @ k^T``;
- :func:`softmax`: row-wise numerically stable softmax;
- :func:`attention`: fused attention with an online softmax, never storing
  the (Nq, Nk) score matrix; with key/query lengths, bias, boolean masks,
  sliding windows and grouped-query heads;
- :func:`varlen_attention`: packed variable-length batches (cu_seqlens);
- :func:`paged_attention`: attention over a paged KV cache (block table);
- :func:`merge_attention`: exact combination of partial results;
- :func:`attention_backward` / :func:`varlen_attention_backward`: gradients
  of :func:`attention` / :func:`varlen_attention` (FlashAttention-2's
  backward, from the forward's ``out`` and ``lse``).

:mod:`numbattn.reference` is the float64 NumPy specification they are tested
against. Importing numbattn never needs CUDA.
"""

from . import config, reference
from .api import (
    attention,
    attention_backward,
    merge_attention,
    paged_attention,
    scores,
    softmax,
    varlen_attention,
    varlen_attention_backward,
)
from .cpu import backend as _cpu_backend  # noqa: F401  (fork guard; imports no Numba)

__version__ = "0.1.0"


def cuda_problem() -> str | None:
    """None when the CUDA backend is usable, else why not (one sentence).

    The one place that decides (it asks ``numbattn.cuda.backend.cuda_problem``);
    never raises.
    """
    try:
        from .cuda import backend
    except ImportError as exc:  # pragma: no cover - broken installations
        return f"numbattn.cuda.backend cannot be imported ({type(exc).__name__}: {exc})"
    return backend.cuda_problem()


def cuda_available() -> bool:
    """True when numba-cuda (NVIDIA implementation) and a usable GPU are present.

    Never raises; :func:`cuda_problem` says why when it returns False.
    """
    return cuda_problem() is None


__all__ = [
    "__version__",
    "attention",
    "attention_backward",
    "config",
    "cuda_available",
    "cuda_problem",
    "merge_attention",
    "paged_attention",
    "reference",
    "scores",
    "softmax",
    "varlen_attention",
    "varlen_attention_backward",
]
