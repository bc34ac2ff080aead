#!/usr/bin/env bash
# One 2-GPU lease after the MoE combine kernel and the in-place MLA prefill (issues 8 and 9):
#   phase 1: GPU 0 runs the kernel / parity tests that changed; GPU 1 the prefill MFU benches (1 GPU; EP32
#            projection) and the EP72 decode projection;
#   phase 2: both GPUs: the EP dispatch backends side by side with a kernel profile of each, and the symm
#            serve parity test.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_combine_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-combine}
mkdir -p "$out"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
bench() {
  local tag=$1; shift
  echo "== [$tag] moefleet bench $*"
  timeout 200 moefleet bench "$@" --json "$out/$tag.json" 2>&1 | grep -v '^$' | grep -v "Warning\|warn(" | tail -12
}
stamp "phase 1"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 250 python3 -m pytest -q -p no:cacheprovider --timeout 200 -rf -l tests/gpu/test_fused_elementwise_gpu.py \
    tests/gpu/test_moe_combine_gpu.py tests/gpu/test_attention_kernels_gpu.py tests/gpu/test_moe_local_path_gpu.py \
    "tests/gpu/test_cuda_parity.py" -k "rotary or combine or varlen or mla or local or deepseek or qwen3" 2>&1 | tail -80
) > "$out/tests.txt" 2>&1 &
tests=$!
(
  export CUDA_VISIBLE_DEVICES=1
  bench ds2_prefill --preset deepseek-v3 --layers 2 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --attention-backend triton
  bench ep32_prefill --preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 \
    --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3 --project-depths 4,6 --project-layers 61 --attention-backend triton
  bench ep72_decode --preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 \
    --num-redundant-experts 32 --dense-layers 3 --project-depths 4,6 --project-layers 61 --attention-backend triton --cuda-graphs auto
) > "$out/bench.txt" 2>&1
wait $tests
stamp "phase 2"
timeout 150 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py --backends a2a,symm,symm-graph \
  --profile 10 > "$out/ep_dispatch.txt" 2>&1
timeout 200 python3 -m pytest -q -p no:cacheprovider -rA --timeout 180 tests/gpu/test_ep_backends_gpu.py -k symm_serve \
  > "$out/serve_symm.txt" 2>&1
stamp "done"
grep -E "passed|failed|^FAILED|^E " "$out/tests.txt" | head -30
grep -hE "^==|^\| deepseek|projected|Projected" "$out/bench.txt" | cut -c1-300
grep -vE "^\[W|Warning|warn" "$out/ep_dispatch.txt" | head -70
grep -E "passed|failed|Error" "$out/serve_symm.txt" | tail -5
