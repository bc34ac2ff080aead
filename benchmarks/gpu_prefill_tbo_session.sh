#!/usr/bin/env bash
# One 1-GPU call on prefill two-batch overlap's experts stage:
#  1. the per-expert cuBLAS FP8 path's host launch cost vs its GPU time (prefill_experts_host_probe.py) and the
#     router gate's float32 vs bf16 GEMM (router_gate_probe.py);
#  2. the GPU tests of the early host counts (HostCounts), the cuBLAS FP8 path and the bf16 gate;
#  3. TBO on vs off projected to 61 layers (gpu_tbo_projection.sh: decode EP72 at COMMS us, prefill EP32 16k/GPU
#     at PREFILL_COMM us per dispatch / combine), and the same from BEFORE (a checkout of an earlier commit);
#  4. with TIMELINE=1, one 4-layer on and off run each with --tbo-timeline (kernels per stream of 3 eager steps).
#   source benchmarks/device_setup.sh && BEFORE=.before bash benchmarks/gpu_prefill_tbo_session.sh OUT
set -uo pipefail
out=${1:-/tmp/gpu-prefill-tbo}; mkdir -p "$out"
here=$PWD
PREFILL_COMM=${PREFILL_COMM:-5000}
COMMS=${COMMS:-"0 300"}
python3 benchmarks/prefill_experts_host_probe.py > "$out/probe.txt" 2>&1; cat "$out/probe.txt"
python3 benchmarks/router_gate_probe.py > "$out/router_gate.txt" 2>&1; cat "$out/router_gate.txt"
python3 -m pytest -q -p no:cacheprovider tests/gpu/test_host_counts_gpu.py tests/gpu/test_fp8_cublas_gpu.py \
  tests/gpu/test_router_gate_gpu.py > "$out/tests.txt" 2>&1; tail -3 "$out/tests.txt"
COMMS=$COMMS PREFILL_COMM=$PREFILL_COMM bash benchmarks/gpu_tbo_projection.sh "$out/after"
if [ -n "${BEFORE:-}" ]; then
  (cd "$BEFORE" && source benchmarks/device_setup.sh > /dev/null \
    && COMMS=$COMMS PREFILL_COMM=$PREFILL_COMM bash benchmarks/gpu_tbo_projection.sh "$out/before")
  source "$here/benchmarks/device_setup.sh" > /dev/null  # back to this checkout's engine
fi
if [ -n "${TIMELINE:-}" ]; then
  for t in off on; do
    timeout 200 moefleet bench --preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 \
      --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3 --quantization fp8 --layers 4 \
      --emulate-comm-us "$PREFILL_COMM" --tbo $t --tbo-timeline --steps 2 --warmup 1 --no-breakdown \
      > "$out/timeline_$t.txt" 2>&1
    echo "timeline $t rc=$?"; grep -A3 "TBO timeline" "$out/timeline_$t.txt" | head -8
  done
fi
