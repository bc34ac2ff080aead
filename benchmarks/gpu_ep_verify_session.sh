#!/usr/bin/env bash
# One 2-GPU lease that verifies what was built without one (issues 9 and 15), time-boxed, calls of <= 10 min:
#   PHASE=1 (nvlink):
#     1. dispatch + combine per layer at DeepSeek-V3 width, 256 tokens/GPU: nvlink eager, from a CUDA graph, and
#        with FP8 rows from a graph (the <= 150 us target), with a kernel profile.
#     2. the nvlink round trips (5 routings, no host sync, CUDA graph replay; bf16 and FP8 rows) and `moefleet
#        serve` (float32, both tiny models; --cuda-graphs on: group-agreed buckets, idle ranks replaying padding)
#        against transformers; symm serve with EP graphs (the EP_GRAPHS_VERIFIED gate).
#     3. the EP2 decode step's HBM-floor ratio (nvlink) beside the 1-GPU step, while DEADLINE (540 s) allows.
#   PHASE=3: symm and a2a round trips and serve tests, symm per layer from a graph, the symm EP2 floor.
#   PHASE=2 (DeepEP built from DEEPEP_DIR first, ~1.5 min):
#     4. DeepEP round trips (bf16 low-latency rows too) and DeepEP inside `moefleet serve` at hidden 2048 (normal
#        prefill + low-latency decode, eager and from EP graphs) against a2a; DeepEP low-latency per layer, eager
#        and from a graph; the EP2 floor with DeepEP.
# A pass of (1) lets cuda_graph_runner.EP_GRAPHS_VERIFIED and backends.VERIFIED_ON_GPU["nvlink"/"symm"] be set;
# (4) the same for deepep.
#   source benchmarks/device_setup.sh && PHASE=1 bash benchmarks/gpu_ep_verify_session.sh OUTDIR
#   source benchmarks/device_setup.sh && PHASE=2 DEEPEP_DIR=.deepep bash benchmarks/gpu_ep_verify_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-ep-verify}
mkdir -p "$out"
export EP_SERVE_LOG_DIR="$out"
floor() {  # tag, then bench arguments
  local tag=$1; shift
  if (( SECONDS > ${DEADLINE:-540} - 60 )); then echo "== $tag skipped (deadline)"; return; fi
  NVSHMEM_SYMMETRIC_SIZE=$(( 8 << 30 )) timeout -k 10 90 moefleet bench --preset deepseek-v3 --layers 2 --mode decode \
    --batch-size 256 --kv-len 2000 "$@" --json "$out/$tag.json" > "$out/$tag.log" 2>&1
  echo "== $tag rc=$? $(grep -m1 -E '^\| deepseek' "$out/$tag.log")"
}
case "${PHASE:-1}" in
1)
  timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py \
    --backends nvlink,nvlink-graph,nvlink-fp8-graph --chain 8 --iters 30 --expert-weights none --profile 4 \
    > "$out/ep_dispatch_nvlink.txt" 2>&1
  grep -E "^\||^==" "$out/ep_dispatch_nvlink.txt" | head -30
  timeout 270 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_ep_backends_gpu.py \
    -k "nvlink or symm_serve_with_expert_parallel" > "$out/nvlink_tests.txt" 2>&1
  grep -E "passed|failed|^FAILED|^ERROR" "$out/nvlink_tests.txt" | tail -12
  CUDA_VISIBLE_DEVICES=0 floor floor_1gpu
  floor floor_ep2_nvlink --nproc-per-node 2 --moe-backend nvlink
  ;;
2)
  deepep=${DEEPEP_DIR:-.deepep}
  source "$deepep/build.sh" > "$out/deepep_build.txt" 2>&1
  tail -2 "$out/deepep_build.txt"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_ep_backends_gpu.py \
    -k "deepep" > "$out/deepep_tests.txt" 2>&1
  grep -E "passed|failed|^FAILED|^ERROR" "$out/deepep_tests.txt" | tail -12
  timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py \
    --backends deepep-ll,deepep-ll-graph --chain 8 --iters 30 --expert-weights none > "$out/ep_dispatch_deepep.txt" 2>&1
  grep -E "^\|" "$out/ep_dispatch_deepep.txt" | head -8
  floor floor_ep2_deepep --nproc-per-node 2 --moe-backend deepep
  ;;
3)
  timeout 330 python3 -m pytest -q -p no:cacheprovider -rf tests/gpu/test_ep_backends_gpu.py \
    -k "(symm or a2a) and not symm_serve_with_expert_parallel" > "$out/symm_tests.txt" 2>&1
  grep -E "passed|failed|^FAILED|^ERROR" "$out/symm_tests.txt" | tail -12
  timeout 60 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py \
    --backends symm-graph --chain 8 --iters 30 --expert-weights none > "$out/ep_dispatch_symm.txt" 2>&1
  grep -E "^\| symm" "$out/ep_dispatch_symm.txt"
  floor floor_ep2_symm --nproc-per-node 2 --moe-backend symm
  ;;
esac
