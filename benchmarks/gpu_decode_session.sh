#!/usr/bin/env bash
# One 1-GPU lease (issue 9, decode EP72 projection): the MLA decode q_in_loop tiles, the absorption matmul
# (einsum vs per-head Triton), the fused MoE retuned for E4 decode (512 rows per expert), then the EP72
# decode projection on the result. The tuned table is written into this checkout (copy it back from OUTDIR).
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_decode_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-decode}
mkdir -p "$out"
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
stamp start
timeout 60 python3 benchmarks/mla_absorb.py > "$out/mla_absorb.txt" 2>&1
timeout 150 python3 benchmarks/attention_kernels.py --mla-only --sweep > "$out/mla_sweep.txt" 2>&1
timeout 100 python3 benchmarks/tune_fused_moe.py --tune --budget-s 80 --dtypes bf16 --shapes "E4 decode" \
  > "$out/tune_e4.txt" 2>&1
cp engine/kernels/fused_moe_configs.json "$out/"
stamp bench
timeout 130 moefleet bench --preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 \
  --num-redundant-experts 32 --dense-layers 3 --project-depths 4,8 --project-layers 61 \
  --json "$out/emulate_decode_ep72.json" > "$out/emulate_decode_ep72.txt" 2>&1
timeout 90 python3 -m pytest -q -p no:cacheprovider -rf --timeout 80 tests/gpu/test_head_matmul_gpu.py \
  tests/gpu/test_attention_kernels_gpu.py -k "head_matmul or mla" > "$out/tests.txt" 2>&1
stamp done
cat "$out/mla_absorb.txt"; grep -E "^\|" "$out/mla_sweep.txt"; tail -15 "$out/tune_e4.txt"
grep -vE "^\[W|Warning|warn" "$out/emulate_decode_ep72.txt" | tail -12; tail -5 "$out/tests.txt"
