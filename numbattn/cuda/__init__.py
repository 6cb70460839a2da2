"""CUDA backend of numbattn (numba-cuda): kernels and host glue.

Importing this package never requires numba-cuda or a GPU; see
:func:`numbattn.cuda.backend.cuda_problem`. Under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) the simulator's device arrays are given a
``__cuda_array_interface__`` so that the public API accepts them.
"""

import os as _os

if _os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    try:
        from . import _sim

        _sim.install()
    except ImportError:  # numba-cuda missing: cuda_problem() explains
        pass
