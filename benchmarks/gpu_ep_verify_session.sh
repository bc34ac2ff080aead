#!/usr/bin/env bash
# One 2-GPU lease that verifies what was built without one (issue 9), time-boxed, in order of value:
#   1. symm: the dispatcher round trips and `moefleet serve` with expert-parallel CUDA graphs (--cuda-graphs on:
#      group-agreed buckets, idle ranks replaying padding) against transformers; DeepEP builds meanwhile.
#   2. DeepEP: round trips with bf16 low-latency rows, and DeepEP inside `moefleet serve` at hidden 2048
#      (normal prefill + low-latency decode, eager and from EP graphs) against a2a.
#      Then dispatch + combine per layer (DeepEP low-latency eager and from a CUDA graph, symm from a graph).
#   3. the EP2 decode step's HBM-floor ratio (DeepEP, symm) beside the 1-GPU step, while DEADLINE (540 s) allows.
# A pass of (1) lets cuda_graph_runner.EP_GRAPHS_VERIFIED (and backends.VERIFIED_ON_GPU["symm"]) be set;
# (2) the same for deepep.
#   source benchmarks/device_setup.sh && DEEPEP_DIR=.deepep bash benchmarks/gpu_ep_verify_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-ep-verify}
mkdir -p "$out"
export EP_SERVE_LOG_DIR="$out"
deepep=${DEEPEP_DIR:-.deepep}
(bash -c "source $deepep/build.sh" > "$out/deepep_build.txt" 2>&1) &
build=$!
timeout 300 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_ep_backends_gpu.py \
  -k "symm or a2a" > "$out/symm_tests.txt" 2>&1
wait $build
source "$deepep/build.sh" >> "$out/deepep_build.txt" 2>&1
timeout 240 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_ep_backends_gpu.py \
  -k "deepep" > "$out/deepep_tests.txt" 2>&1
# 2b. dispatch + combine per layer at DeepSeek-V3 width, 256 tokens/GPU, eager and replayed from CUDA graphs
timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py \
  --backends deepep-ll,deepep-ll-graph,symm-graph --chain 8 --iters 30 --expert-weights none > "$out/ep_dispatch.txt" 2>&1
grep -E "^\|" "$out/ep_dispatch.txt" | head -8
# 3. the EP2 decode step's HBM-floor ratio next to the 1-GPU step (same width, 2 layers), while time is left
floor() {  # tag, then bench arguments
  local tag=$1; shift
  if (( SECONDS > ${DEADLINE:-540} - 60 )); then echo "== $tag skipped (deadline)"; return; fi
  NVSHMEM_SYMMETRIC_SIZE=$(( 8 << 30 )) timeout -k 10 90 moefleet bench --preset deepseek-v3 --layers 2 --mode decode \
    --batch-size 256 --kv-len 2000 "$@" --json "$out/$tag.json" > "$out/$tag.log" 2>&1
  echo "== $tag rc=$? $(grep -m1 -E '^\| deepseek' "$out/$tag.log")"
}
CUDA_VISIBLE_DEVICES=0 floor floor_1gpu
floor floor_ep2_deepep --nproc-per-node 2 --moe-backend deepep
floor floor_ep2_symm --nproc-per-node 2 --moe-backend symm
tail -4 "$out/deepep_build.txt"
grep -E "passed|failed|^FAILED|^ERROR" "$out/symm_tests.txt" "$out/deepep_tests.txt" | tail -12
