"""GPU tests: run with a real GPU, or on the simulator with

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/gpu

(in its own process: the simulator is chosen when numba.cuda is imported).
Everything is skipped when numbattn's CUDA backend is unavailable.
"""

import pytest

import numbattn

PROBLEM = numbattn.cuda_problem()


def pytest_collection_modifyitems(config, items):
    if PROBLEM is None:
        return
    skip = pytest.mark.skip(reason=f"CUDA backend unavailable: {PROBLEM}")
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


def on_simulator() -> bool:
    from numba.cuda.core import config as ncfg

    return bool(ncfg.ENABLE_CUDASIM)


#: Small tiles so that tiny shapes cross every tile boundary (and the
#: simulator, one Python thread per CUDA thread, stays fast).
SMALL_TILES = dict(
    CUDA_QUERY_TILE=8,
    CUDA_KEY_TILE=8,
    CUDA_QUERY_TILE_F64=8,
    CUDA_KEY_TILE_F64=8,
    CUDA_ROWS_PER_THREAD=4,
    CUDA_ROWS_PER_THREAD_F64=2,
    CUDA_KEYS_PER_THREAD=4,
    CUDA_HEAD_CHUNK=8,
    CUDA_VALUE_CHUNK=8,
    # The FMA forward and scores; tests/gpu/test_cuda_tensor_cores.py runs
    # the tensor-core forward (one warp, 8-key tiles) through the same cases.
    CUDA_TENSOR_CORES=False,
    CUDA_TC_WARPS=1,
    CUDA_TC_WARPS_F64=1,
    CUDA_TC_KEY_TILE=8,
    CUDA_TC_KEY_TILE_F64=8,
    # scores on the tensor cores (tests/gpu/test_cuda_scores_tensor_cores.py):
    # one warp, 8-column tiles, head chunks of 8.
    CUDA_TC_SCORES_WARPS=1,
    CUDA_TC_SCORES_TILE=8,
    CUDA_TC_SCORES_HEAD_CHUNK=8,
    CUDA_SCORES_TILE=8,
    CUDA_SCORES_PER_THREAD=2,
    CUDA_SCORES_HEAD_CHUNK=4,
    CUDA_SOFTMAX_THREADS=8,
    # backward: 4-row tiles, 2 x 2 threads (its own knobs)
    CUDA_BWD_ROW_TILE=4,
    CUDA_BWD_COL_TILE=4,
    CUDA_BWD_ROWS_PER_THREAD=2,
    CUDA_BWD_COLS_PER_THREAD=2,
    CUDA_BWD_ROW_TILE_F64=4,
    CUDA_BWD_COL_TILE_F64=4,
    CUDA_BWD_ROWS_PER_THREAD_F64=2,
    CUDA_BWD_COLS_PER_THREAD_F64=2,
    # Streaming split-K kernel (tests/gpu/test_cuda_decode.py): 2 teams of 4
    # lanes, 2 rows and 2 keys a step; attention() keeps the fused kernel
    # here (the streaming tests raise CUDA_STREAM_ROWS themselves).
    CUDA_STREAM_ROWS=0,
    CUDA_DECODE_LANES=4,
    CUDA_DECODE_TEAMS=2,
    CUDA_DECODE_ROWS=2,
    CUDA_DECODE_KEYS=2,
    CUDA_DECODE_KEYS_F64=2,
    CUDA_SPLIT_MERGE_THREADS=4,
)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(numbattn.config, name, value)
