#!/usr/bin/env bash
# One prepared run of numbattn's GPU checks on a machine with an NVIDIA GPU
# (../shared/DEVICE.md): versions and device, the timing tables against torch
# SDPA and CuPy, tests/gpu on the hardware, compute-sanitizer (memcheck,
# racecheck, synccheck) on a small multi-tile case with tails, one ncu
# profile, the varlen and decode cases, the static kernel report, and the
# PyTorch autograd adapter (numbattn.torch) on CUDA tensors.
# Steps run in the order given (most valuable first) and each has its own time
# limit; everything goes to $OUT/log as it happens, so a run cut short keeps
# its log.
#
#   bash scripts/gpu_device_run.sh                    # on the GPU machine, every step
#   STEPS="tests memcheck" bash scripts/gpu_device_run.sh
#   SHAPES=0 STEPS=timings bash scripts/gpu_device_run.sh   # only (4, 16, 4096, 64)
#   STEPS="env backward bwdtests bwdracecheck" bash scripts/gpu_device_run.sh   # the backward (issue 14)
#   STEPS="env scores" bash scripts/gpu_device_run.sh  # the scores kernel (issue 10)
#   TINY=1 bash scripts/gpu_device_run.sh             # rehearsal under the CUDA simulator
set -u -o pipefail
O=${OUT:-/tmp/numbattn-gpu}
mkdir -p "$O"
if compgen -G ".whl/*.whl" >/dev/null; then  # numpy < 2.5 for numba-cuda 0.30 (DEVICE.md)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STEPS=${STEPS:-env timings backward decode torch tests decodetests memcheck ncu varlen scores hostprof racecheck synccheck dask report}
T=()
if [ -n "${TINY:-}" ]; then export NUMBA_ENABLE_CUDASIM=1; T=(--tiny); fi
have() { command -v "$1" >/dev/null 2>&1; }
gpu() { [ -z "${TINY:-}" ]; }
dev() { $PY scripts/gpu_device.py "$@" "${T[@]}"; }

step_env() {
  have nvidia-smi && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  uname -r
  $PY -m numbattn info
  $PY -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" || true
}
step_timings() {
  local sh=()
  [ -n "${SHAPES:-}" ] && sh=(--shapes "$SHAPES")
  timeout 150 $PY scripts/gpu_device.py timings --out "$O" "${sh[@]}" "${T[@]}" 2>&1 | grep -v '^time {'
}
step_tests() {
  # The whole output goes to its own file as it happens (a run cut short by
  # the time limit keeps it); the log gets failures and the slowest tests.
  # (tests/gpu/test_cuda_decode.py has its own step, decodetests.)
  gpu && timeout "${TESTS_TIMEOUT:-200}" $PY -m pytest tests/gpu tests/test_gpu_report.py -q -rf \
    --ignore=tests/gpu/test_cuda_decode.py -p no:cacheprovider --durations=8 2>&1 |
    tee "$O/tests.log" | tail -40
}
sanitize() {  # tool, time limit[, gpu_device.py command]
  local what=${3:-sanitize}
  if gpu && have compute-sanitizer; then
    timeout "$2" compute-sanitizer --tool "$1" --print-limit 10 $PY scripts/gpu_device.py "$what" 2>&1 | tail -14
  else
    dev "$what"
  fi
}
step_memcheck() { sanitize memcheck 70; }
step_racecheck() { sanitize racecheck 60; }
step_synccheck() { sanitize synccheck 50; }
step_bwdracecheck() { sanitize racecheck 90 sanitize_backward; }
step_bwdmemcheck() { sanitize memcheck 90 sanitize_backward; }
step_ncu() {
  if gpu && have ncu; then
    local s=(--clock-control none -k regex:attention --launch-skip 1 --launch-count 1
             --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats
             --section Occupancy --section LaunchStats)
    local m=sm__issue_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio
    timeout 60 ncu "${s[@]}" --metrics "$m" $PY scripts/gpu_device.py profile 2>&1 | tail -100 ||
      timeout 45 ncu "${s[@]}" $PY scripts/gpu_device.py profile 2>&1 | tail -100
  else
    dev profile
  fi
}
step_backward() { timeout "$(gpu && echo 150 || echo 1200)" $PY scripts/gpu_device.py backward "${T[@]}"; }
step_varlen() { timeout 45 $PY scripts/gpu_device.py varlen "${T[@]}"; }
step_scores() { timeout 60 $PY scripts/gpu_device.py scores "${T[@]}"; }
step_decode() { timeout 120 $PY scripts/gpu_device.py decode "${T[@]}"; }
step_decodetests() {  # the streaming split-K kernel's tests, hardware paths included
  gpu && timeout "${DECODETESTS_TIMEOUT:-240}" $PY -m pytest tests/gpu/test_cuda_decode.py -q -rf \
    -p no:cacheprovider --durations=5 2>&1 | tee "$O/decodetests.log" | tail -30
}
step_bwdtests() {  # the backward's tests, production geometry (fast loop) included
  gpu && timeout "${BWDTESTS_TIMEOUT:-150}" $PY -m pytest tests/gpu/test_cuda_backward_production.py \
    tests/gpu/test_cuda_backward.py -q -rf -p no:cacheprovider --durations=5 2>&1 |
    tee "$O/bwdtests.log" | tail -30
}
step_hostprof() { timeout 60 $PY scripts/gpu_device.py hostprof "${T[@]}" 2>&1 | head -60; }
step_dask() { timeout 90 $PY scripts/gpu_device.py dask "${T[@]}"; }
step_torch() { timeout 90 $PY scripts/gpu_device.py torch "${T[@]}"; }
step_report() { timeout 100 $PY -m numbattn gpu-report 2>&1 || echo "gpu-report unavailable"; }

{
  for s in $STEPS; do
    printf '\n=== %s (%s)\n' "$s" "$(date +%T)"
    "step_$s"
  done
  printf '\n=== end (%s)\n' "$(date +%T)"
} 2>&1 | tee "$O/log"
