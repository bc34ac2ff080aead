#!/usr/bin/env bash
# One 2-GPU lease for the whole integrated engine: GPU tests and the issue-8/10 benchmarks, with the two GPUs
# used in parallel where the work needs one (tests on GPU 0, single-GPU benches on GPU 1), then the 2-GPU runs.
# Run from the repo root on a 2-GPU machine:
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-session}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpus.csv"
bench() { local tag=$1; shift; echo "== [$tag] moefleet bench $*"; timeout 150 moefleet bench "$@" --json "$out/$tag.json" 2>&1 | grep -v '^$' | tail -16; }
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 330 python3 -m pytest -q -p no:cacheprovider --timeout 300 tests/gpu -k "not nccl" -rA 2>&1 | tail -60
) > "$out/gpu_tests.txt" 2>&1 &
tests=$!
(
  export CUDA_VISIBLE_DEVICES=1
  bench ds_decode_new --preset deepseek-v3 --layers 2 --mode decode --batch-size 256 --kv-len 2000 --attention-backend triton --cuda-graphs auto
  bench ds_decode_old --preset deepseek-v3 --layers 2 --mode decode --batch-size 256 --kv-len 2000 --attention-backend torch --cuda-graphs off --no-breakdown
  bench qw_decode_new --preset qwen3-30b-a3b --layers 4 --mode decode --batch-size 256 --kv-len 2000 --attention-backend triton --cuda-graphs auto
  bench qw_decode_old --preset qwen3-30b-a3b --layers 4 --mode decode --batch-size 256 --kv-len 2000 --attention-backend torch --cuda-graphs off --no-breakdown
  bench ds_prefill_new --preset deepseek-v3 --layers 2 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --attention-backend triton
  bench ds_decode_fp8 --preset deepseek-v3 --layers 2 --mode decode --batch-size 256 --kv-len 2000 --attention-backend triton --cuda-graphs auto --quantization fp8 --no-breakdown
) > "$out/bench_1gpu.txt" 2>&1
wait $tests
(
  timeout 150 python3 -m pytest -q -p no:cacheprovider --timeout 140 tests/gpu -k "nccl" -rA 2>&1 | tail -30
) > "$out/gpu_nccl_tests.txt" 2>&1
bench ep2_decode --preset deepseek-v3 --layers 2 --nproc-per-node 2 --mode decode --batch-size 256 --kv-len 2000 --attention-backend triton --no-breakdown > "$out/bench_ep2.txt" 2>&1
bench ep2_eplb --preset deepseek-v3 --layers 2 --nproc-per-node 2 --mode decode --batch-size 256 --kv-len 2000 --attention-backend triton --routing-skew zipf:1.2 --num-redundant-experts 32 --eplb --no-breakdown >> "$out/bench_ep2.txt" 2>&1
tail -n 3 "$out"/gpu_tests.txt "$out"/gpu_nccl_tests.txt; cat "$out"/bench_1gpu.txt "$out"/bench_ep2.txt | grep -E "^==|tok/s|floor|MFU|error|Error|balanced" | head -80
