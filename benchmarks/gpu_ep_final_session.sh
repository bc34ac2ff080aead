#!/usr/bin/env bash
# One 2-GPU lease for the EP backends and two-batch overlap (issues 8, 9 and 15), everything time-boxed:
#   phase 1: DeepEP builds on the CPUs meanwhile; the fused rotary and MoE kernel GPU tests on GPU 0;
#   phase 2: a2a / symm dispatch + combine side by side with round trips back to back (--chain), then
#            DeepEP low-latency correctness (ep_gpu_worker) and its dispatch + combine beside normal mode;
#   phase 3: benchmarks/gpu_tbo.sh (two-batch overlap on vs off; its "off" points are the EP2 decode/prefill
#            steps of symm with CUDA graphs and of a2a) on the points TBO_DECODE / TBO_PREFILL, within what is
#            left of DEADLINE seconds (default 540) since this script started.
#   source benchmarks/device_setup.sh && DEEPEP_DIR=.deepep bash benchmarks/gpu_ep_final_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-ep}
mkdir -p "$out"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
TR="python3 -m torch.distributed.run --nproc-per-node 2"
bench() {
  local tag=$1; shift
  echo "== [$tag] moefleet bench $*"
  timeout 150 moefleet bench "$@" --json "$out/$tag.json" 2>&1 | grep -v '^$' | grep -vE "Warning|warn\(|^\[W" | tail -8
}
stamp "phase 1"
deepep=${DEEPEP_DIR:-.deepep}
(bash -c "source $deepep/build.sh" > "$out/deepep_build.txt" 2>&1) &
build=$!
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -p no:cacheprovider -rf --timeout 120 \
  tests/gpu/test_fused_elementwise_gpu.py tests/gpu/test_moe_kernels_gpu.py > "$out/kernel_tests.txt" 2>&1
wait $build
stamp "phase 2"
# after the build: eager launch rates would suffer from the compiler on every core
timeout 100 $TR benchmarks/ep_dispatch.py --backends a2a,symm,symm-graph --chain 8 --iters 30 --expert-weights none \
  > "$out/ep_dispatch.txt" 2>&1
source "$deepep/build.sh" >> "$out/deepep_build.txt" 2>&1
timeout 90 $TR tests/gpu/ep_gpu_worker.py deepep_ll > "$out/worker_deepep_ll.txt" 2>&1
echo "worker rc=$?" >> "$out/worker_deepep_ll.txt"
timeout 120 $TR benchmarks/ep_dispatch.py --backends deepep-normal,deepep-ll --chain 8 --iters 30 ${DEEPEP_BENCH_ARGS:-} \
  > "$out/ep_dispatch_deepep.txt" 2>&1
stamp "phase 3"
left=$(( ${DEADLINE:-540} - SECONDS ))
if (( left > 60 )); then
  DECODE="${TBO_DECODE-64 256}" PREFILL="${TBO_PREFILL-16384}" A2A_DECODE="${TBO_A2A_DECODE-256}" A2A_PREFILL="" \
    BUDGET=$(( left - 50 )) timeout "$left" bash benchmarks/gpu_tbo.sh "$out/tbo" > "$out/tbo.txt" 2>&1
else
  echo "no time left for TBO ($left s)" > "$out/tbo.txt"
fi
stamp "done"
grep -E "passed|failed|^FAILED" "$out/kernel_tests.txt" | tail -8; tail -3 "$out/deepep_build.txt"
grep -vE "^\[W|Warning|warn|^\*|OMP_NUM" "$out/ep_dispatch.txt" "$out/ep_dispatch_deepep.txt" | grep -E "\||dispatch \+" | head -20
grep -E "PASS|FAIL|rc=|Error" "$out/worker_deepep_ll.txt" | head -12
[ -f "$out/tbo.txt" ] && tail -30 "$out/tbo.txt"
