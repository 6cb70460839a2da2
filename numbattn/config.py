"""Tuning knobs, read at call time (never baked into compiled code).

Kernels receive these as ordinary arguments, so tests can shrink them to
force multi-tile paths on tiny inputs without triggering a recompilation::

    monkeypatch.setattr(numbattn.config, "CPU_KEY_TILE", 8)
"""

# --- CPU (numbattn.cpu) ----------------------------------------------------
#: Query rows handled by one parallel work item of the fused kernel and of
#: ``scores``. Also the granularity of load balancing across threads.
CPU_QUERY_TILE = 64
#: Keys per online-softmax step of the fused kernel (and per ``scores`` tile).
#: The working set is about CPU_QUERY_TILE x CPU_KEY_TILE scores plus a
#: packed K and V tile, sized to stay in L1/L2.
CPU_KEY_TILE = 128

# --- CUDA (numbattn.cuda) --------------------------------------------------
#: Query rows per thread block of the fused attention kernel.
CUDA_QUERY_TILE = 64
#: Keys staged in shared memory per step of the fused attention kernel.
CUDA_KEY_TILE = 64
#: Threads per block for the row-wise softmax kernel.
CUDA_SOFTMAX_THREADS = 128
#: Square tile edge of the ``scores`` kernel (threads per block = edge**2).
CUDA_SCORES_TILE = 16
