"""CPU backend: Numba ``@njit(parallel=True)`` kernels.

The kernels do no validation; :mod:`numbattn.api` calls them with arrays
already checked and reshaped to exactly two leading batch dimensions.
"""
