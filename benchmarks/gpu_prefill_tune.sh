#!/usr/bin/env bash
# One 2-GPU lease for the prefill side of issue 8: tune the fused MoE GEMMs for the DeepSeek-V3 shapes that had
# no tuned entry (all 256 experts on one GPU, decode and prefill; EP32 prefill with 9 local experts), one tuner
# per GPU, merge both into engine/kernels/fused_moe_configs.json, then measure with the merged table:
# 1-GPU prefill (16k tokens, 4 x 4k), 1-GPU decode, the EP32 prefill projection, and the fused rotary test.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_prefill_tune.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-tune}
mkdir -p "$out"
table=engine/kernels/fused_moe_configs.json
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
bench() {
  local tag=$1; shift
  echo "== [$tag] moefleet bench $*"
  timeout 200 moefleet bench "$@" --json "$out/$tag.json" 2>&1 | grep -v '^$' | grep -v "Warning\|warn(" | tail -12
}
stamp "tuning"
cp $table "$out/t0.json"; cp $table "$out/t1.json"
CUDA_VISIBLE_DEVICES=0 timeout 260 python3 benchmarks/tune_fused_moe.py --tune --budget-s ${TUNE_S0:-210} --dtypes bf16 \
  --shapes "E256" --out "$out/t0.json" > "$out/tune0.txt" 2> "$out/tune0.err" &
t0=$!
CUDA_VISIBLE_DEVICES=1 timeout 260 python3 benchmarks/tune_fused_moe.py --tune --budget-s ${TUNE_S1:-150} --dtypes bf16,fp8 \
  --shapes "E9" --out "$out/t1.json" > "$out/tune1.txt" 2> "$out/tune1.err"
wait $t0
python3 - "$table" "$out/t0.json" "$out/t1.json" <<'EOF'
import json, sys
merged = json.load(open(sys.argv[1]))
for path in sys.argv[2:]:
    for key, entries in json.load(open(path)).items():
        rows = {int(m): c for m, c in merged.get(key, [])}
        rows.update({int(m): c for m, c in entries})
        merged[key] = sorted(([m, c] for m, c in rows.items()), key=lambda e: e[0])
open(sys.argv[1], "w").write(json.dumps(merged, indent=1, sort_keys=True) + "\n")
EOF
cp $table "$out/fused_moe_configs.json"
stamp "benches"
(
  export CUDA_VISIBLE_DEVICES=0
  bench ds2_prefill --preset deepseek-v3 --layers 2 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --attention-backend triton
  bench ds4_decode --preset deepseek-v3 --layers 4 --mode decode --batch-size 256 --kv-len 2000 --attention-backend triton --cuda-graphs auto --no-breakdown
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_elementwise_gpu.py 2>&1 | tail -4
) > "$out/bench_gpu0.txt" 2>&1 &
g0=$!
(
  export CUDA_VISIBLE_DEVICES=1
  bench ep32_prefill --preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 \
    --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3 --project-depths 4,6 --project-layers 61 --attention-backend triton
) > "$out/bench_gpu1.txt" 2>&1
wait $g0
stamp "done"
cat "$out/tune0.txt" "$out/tune1.txt"
grep -hE "^==|^\| deepseek|projected|slope|passed|failed" "$out"/bench_gpu*.txt | cut -c1-330
