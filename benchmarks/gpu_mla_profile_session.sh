#!/usr/bin/env bash
# One 2-GPU lease (issue 9): where the deployment-shape steps go, the MLA decode tile sweep, DeepEP
# low-latency against DeepEP's own test at 256 tokens. Everything time-boxed, both GPUs busy at once.
#   GPU 0: MLA decode sweep (attention_kernels.py --mla-only --sweep), the MLA GPU tests, FP8 emulate decode;
#   GPU 1: per-kernel profiles of the EP72 decode and EP32 prefill emulations (eager), FP8 emulate prefill;
#   CPU meanwhile: DeepEP build; then both GPUs: DeepEP's test_low_latency at 256 tokens, ours profiled.
# On a 1-GPU lease the GPU-0 and GPU-1 parts run one after the other and phase 2 is skipped.
#   source benchmarks/device_setup.sh && DEEPEP_DIR=.deepep bash benchmarks/gpu_mla_profile_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-mla}
mkdir -p "$out"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
deepep=${DEEPEP_DIR:-.deepep}
EMU_DEC="--preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3"
EMU_PRE="--preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3"
stamp "phase 1"
(bash -c "source $deepep/build.sh" > "$out/deepep_build.txt" 2>&1) &
build=$!
ngpu=$(nvidia-smi -L | wc -l)
gpu1=1; (( ngpu < 2 )) && gpu1=0
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 benchmarks/attention_kernels.py --mla-only --sweep > "$out/mla_sweep.txt" 2>&1
  timeout 120 moefleet bench $EMU_DEC --quantization fp8 --project-depths 4,6 --project-layers 61 \
    --json "$out/emulate_decode_ep72_fp8.json" > "$out/emulate_decode_ep72_fp8.txt" 2>&1
) &
g0=$!
(( ngpu < 2 )) && wait $g0  # one GPU: one after the other (timings stay clean)
(
  export CUDA_VISIBLE_DEVICES=$gpu1
  timeout 120 python3 benchmarks/profile_step.py --steps 3 --skip 2 --rows 30 -- bench $EMU_DEC --layers 6 \
    --steps 3 --warmup 2 --cuda-graphs off --no-breakdown > "$out/profile_decode_ep72.txt" 2>&1
  timeout 150 python3 benchmarks/profile_step.py --steps 2 --skip 1 --rows 30 -- bench $EMU_PRE --layers 6 \
    --steps 2 --warmup 1 --no-breakdown > "$out/profile_prefill_ep32.txt" 2>&1
  timeout 150 moefleet bench $EMU_PRE --quantization fp8 --project-depths 4,6 --project-layers 61 \
    --json "$out/emulate_prefill_ep32_fp8.json" > "$out/emulate_prefill_ep32_fp8.txt" 2>&1
) &
g1=$!
wait $build $g0 $g1
stamp "phase 2"
if (( ngpu < 2 )); then echo "one GPU: no DeepEP low-latency runs" > "$out/deepep_own_ll.txt"; else
source "$deepep/build.sh" >> "$out/deepep_build.txt" 2>&1
(cd /tmp/deepep && timeout 120 python3 tests/test_low_latency.py --num-processes 2 --num-tokens 256 \
  --hidden 7168 --num-topk 8 --num-experts 256) > "$out/deepep_own_ll.txt" 2>&1
timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py \
  --backends deepep-ll --chain 8 --iters 30 --profile 10 --expert-weights none > "$out/ep_dispatch_ll_profile.txt" 2>&1
fi
CUDA_VISIBLE_DEVICES=0 timeout 90 python3 -m pytest -q -p no:cacheprovider -rf --timeout 80 \
  tests/gpu/test_attention_kernels_gpu.py -k "mla" > "$out/mla_tests.txt" 2>&1
stamp "done"
grep -E "^\|" "$out/mla_sweep.txt" | head -30
grep -E "passed|failed|^FAILED" "$out/mla_tests.txt" | tail -5
for f in profile_decode_ep72 profile_prefill_ep32; do echo "== $f"; grep -E "^\|" "$out/$f.txt" | head -32; tail -3 "$out/$f.txt"; done
for f in emulate_decode_ep72_fp8 emulate_prefill_ep32_fp8; do echo "== $f"; grep -vE "^\[W|Warning|warn" "$out/$f.txt" | tail -14; done
echo "== deepep own"; grep -vE "^\[W|Warning|warn" "$out/deepep_own_ll.txt" | tail -25
echo "== ours"; grep -vE "^\[W|Warning|warn|OMP_NUM|^\*" "$out/ep_dispatch_ll_profile.txt" | tail -40
