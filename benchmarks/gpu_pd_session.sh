#!/usr/bin/env bash
# One 2-GPU lease: PD over the GPU transfer path (issue 11) and the single-GPU fast-path measurements (issue 8).
#   phase 1: KV transfer time per request, tcp vs p2p, GPU 0 -> GPU 1 (benchmarks/kv_transfer.py --device cuda),
#            beside the gateway overhead benchmark (CPU only, loopback, the host's own cores);
#   phase 2: correctness, both GPUs shared (no timing): p2p blocks GPU 0 -> GPU 1, PD (prefill GPU 0, decode
#            GPU 1, p2p over NCCL) vs mixed and transformers, and the single-GPU kernel/graph tests;
#   phase 3: the decode and prefill benches, one per GPU at a time (timings), and a per-kernel profile.
# Run from the repo root on a 2-GPU machine:
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_pd_session.sh OUTDIR
# MOEFLEET_LOADGEN may name a prebuilt gateway load generator (no Go on the GPU host).
set -uo pipefail
out=${1:-/tmp/gpu-pd}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv"
lscpu | grep -E "^Model name|^CPU\(s\)" >> "$out/gpus.csv"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
bench() {
  local tag=$1; shift
  echo "== [$tag] moefleet bench $*"
  timeout 170 moefleet bench "$@" --json "$out/$tag.json" 2>&1 | grep -v '^$' | tail -14
}
pyt() { timeout "$1" python3 -m pytest -q -p no:cacheprovider -rA "${@:2}" 2>&1 | grep -vE "^(PASSED|SKIPPED) " | tail -40; }

stamp "phase 1"
python3 benchmarks/kv_transfer.py --device cuda --tokens 2048 8192 32768 --repeats 3 > "$out/kv_transfer.txt" 2>&1 &
kv=$!
timeout 150 python3 benchmarks/gateway_overhead.py --pin --rates 100 500 --seconds 8 > "$out/gateway_overhead.txt" 2>&1
wait $kv
stamp "phase 2"
pyt 280 --timeout 270 tests/gpu/test_kv_transfer_p2p_gpu.py tests/gpu/test_pd_gpu.py > "$out/pd_tests.txt" &
pd=$!
(
  export CUDA_VISIBLE_DEVICES=0
  pyt 280 --timeout 120 tests/gpu/test_attention_kernels_gpu.py tests/gpu/test_fused_elementwise_gpu.py \
    tests/gpu/test_fp8_models_gpu.py tests/gpu/test_cuda_graphs.py tests/gpu/test_moe_local_path_gpu.py
) > "$out/kernel_tests.txt" 2>&1
wait $pd
stamp "phase 3"
decode=(--mode decode --batch-size 256 --kv-len 2000 --attention-backend triton --cuda-graphs auto --no-breakdown)
(
  export CUDA_VISIBLE_DEVICES=0
  bench qw48_decode --preset qwen3-30b-a3b --layers 48 "${decode[@]}"
  bench ds2_prefill --preset deepseek-v3 --layers 2 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --attention-backend triton
  echo "== profile: deepseek-v3 prefill 16k, 2 layers"
  timeout 150 python3 benchmarks/profile_step.py --steps 3 --skip 1 --rows 30 -- bench --preset deepseek-v3 --layers 2 \
    --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --attention-backend triton --steps 3 --warmup 1 --no-breakdown 2>&1 | tail -36
) > "$out/bench_gpu0.txt" 2>&1 &
g0=$!
(
  export CUDA_VISIBLE_DEVICES=1
  bench ds4_decode --preset deepseek-v3 --layers 4 "${decode[@]}"
  echo "== profile: qwen3-30b-a3b decode 256 x 2000, 4 layers, eager"
  timeout 150 python3 benchmarks/profile_step.py --steps 5 --skip 2 --rows 30 -- bench --preset qwen3-30b-a3b --layers 4 \
    --mode decode --batch-size 256 --kv-len 2000 --attention-backend triton --cuda-graphs off --steps 5 --warmup 2 --no-breakdown 2>&1 | tail -36
) > "$out/bench_gpu1.txt" 2>&1
wait $g0
stamp "done"
tail -n 12 "$out/kv_transfer.txt" "$out/gateway_overhead.txt"
tail -n 8 "$out/pd_tests.txt" "$out/kernel_tests.txt"
grep -hE "^==|tok/s|floor|MFU|rror" "$out"/bench_gpu*.txt | head -40
