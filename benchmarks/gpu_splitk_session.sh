#!/usr/bin/env bash
# One 1-GPU call: the split-K decode FP8 GEMM. (1) its GPU tests; (2) the sweep per decode shape and M, which
# writes the measured table into this checkout (engine/kernels/fp8_splitk_configs.json) and OUT; (3) the EP72
# decode projection (FP8, depths 4 and 12, graphs) with --gemm-backend cublas vs auto (split-K where the table
# says) interleaved, TBO off and on; (4) the MLA/attention GPU suite (not run since the split-rule change).
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_splitk_session.sh OUT
set -uo pipefail
out=${1:-/tmp/gpu-splitk}; mkdir -p "$out"
ROWS=${ROWS:-16,32,64,128,256}; REPS=${REPS:-1}; TBO=${TBO:-"off on"}
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_splitk_gpu.py > "$out/test_splitk.txt" 2>&1
echo "splitk tests: $(tail -1 "$out/test_splitk.txt")"
timeout 300 python3 benchmarks/fp8_splitk_probe.py --rows "$ROWS" --quick --write "$out/fp8_splitk_configs.json" \
  > "$out/sweep.txt" 2> "$out/sweep.err"; echo "sweep rc=$?"; cat "$out/sweep.txt"
[ -s "$out/fp8_splitk_configs.json" ] && cp "$out/fp8_splitk_configs.json" engine/kernels/fp8_splitk_configs.json
EMU_DEC="--preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3 --quantization fp8"
for rep in $(seq "$REPS"); do for tbo in $TBO; do for g in cublas auto; do
  name=decode_ep72_fp8_${g}_tbo${tbo}_$rep
  timeout 150 moefleet bench $EMU_DEC --gemm-backend $g --tbo $tbo --project-depths 4,12 --project-layers 61 \
    --steps 20 --warmup 3 --no-breakdown --json "$out/$name.json" > "$out/$name.txt" 2>&1
  echo "$name rc=$?: $(grep -E '^\| deepseek-v3 \| decode \| [0-9]+ \|' "$out/$name.txt" | tail -1)"
done; done; done
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_attention_kernels_gpu.py > "$out/test_attention.txt" 2>&1
echo "attention tests: $(tail -1 "$out/test_attention.txt")"
cd "$out" && tar czf logs.tgz *.txt *.json *.err 2>/dev/null; ls "$out"
