#!/usr/bin/env bash
# One 1-GPU call: the EP72 decode projection (FP8, 64-token pages) with the previous MLA decode kernel and the
# new one interleaved (REPS, default twice) in one run, then the GPU tests of engines on 64-token MLA pages. The previous tree is an export of
# the last commit in .prev/ (git archive HEAD engine src | tar -x -C .prev), carried to the machine.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_mla_projection_session.sh OUTDIR
set -uo pipefail
out=${1:-/tmp/gpu-mla-proj}
mkdir -p "$out" /tmp/mfold/moefleet
cp .prev/src/moefleet/*.py /tmp/mfold/moefleet/ && ln -sfn "$PWD/.prev/engine" /tmp/mfold/moefleet/engine
ln -sfn "$PWD/operator" /tmp/mfold/moefleet/operator
EMU_DEC="--preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3"
run() {  # tree name
  local root=$1 name=$2
  PYTHONPATH=$root:${PYTHONPATH} timeout 170 python3 -c "import sys; from moefleet.engine.cli import main; sys.exit(main())" \
    bench $EMU_DEC --quantization fp8 --project-depths 4,12 --project-layers 61 --steps 20 --warmup 3 --no-breakdown \
    --json "$out/$name.json" > "$out/$name.txt" 2>&1
  echo "$name: $(grep -E '^\| deepseek-v3 \| decode \| [0-9]+ \|' "$out/$name.txt" | tail -1)"
}
reps=${REPS:-1 2}
for rep in $reps; do
  run /tmp/mfold "decode_ep72_fp8_prev_$rep"
  run /tmp/mf "decode_ep72_fp8_new_$rep"
done
# the engine on CUDA with MLA models now defaults to 64-token pages: graphs, parity, FP8 and the wide FP8 model
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_cuda_graphs.py \
  tests/gpu/test_cuda_parity.py tests/gpu/test_fp8_models_gpu.py tests/gpu/test_fp8_cublas_model_gpu.py \
  tests/gpu/test_moe_local_path_gpu.py > "$out/tests.txt" 2>&1
tail -3 "$out/tests.txt"
