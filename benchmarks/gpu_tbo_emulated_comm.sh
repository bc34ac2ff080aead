#!/usr/bin/env bash
# Two-batch overlap on ONE GPU at a deployment's shape with its transfers emulated (issue 15): `--emulate-ep`
# gives the GPU the per-GPU experts and rows of EP72 decode / EP32 prefill, `--emulate-comm-us` makes each
# dispatch and each combine of the step's tokens wait that long on the GPU (a TBO micro-batch in proportion to
# its tokens; a one-thread spin on TBO's comm stream, the other SMs free), standing for inter-node transfers (DeepEP low-latency over RDMA: dispatch 77-194 us, combine 114-360 us
# at 128 tokens, ANCHORS.md). TBO off vs on per point, FP8 weights, 2 layers, decode steps from CUDA graphs;
# the `on` runs also print the per-stage timeline (--tbo-timeline). Results: one line per run, logs and JSON in OUT.
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_tbo_emulated_comm.sh OUT
set -uo pipefail
out=${1:-/tmp/tbo_emu}; mkdir -p "$out"
DECODE_COMM=${DECODE_COMM-"0 300 600"}; PREFILL_COMM=${PREFILL_COMM-"0 5000"}
STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
common=(--preset deepseek-v3 --layers 2 --quantization fp8 --num-redundant-experts 32 --no-breakdown
        --steps "$STEPS" --warmup "$WARMUP")
run() {  # stem, then bench arguments
  local stem=$1; shift
  timeout -k 5 110 moefleet bench "${common[@]}" "$@" --json "$out/$stem.json" > "$out/$stem.log" 2>&1
  echo "== $stem rc=$? $(grep -m1 -E '^\| deepseek' "$out/$stem.log" | cut -d'|' -f8,9,22) $(grep -m1 'TBO timeline' "$out/$stem.log" | cut -c30-)"
}
for c in $DECODE_COMM; do for t in off on; do
  run "decode_ep72_comm${c}_$t" --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --emulate-comm-us "$c" \
    --tbo "$t" $([ "$t" = on ] && echo --tbo-timeline)
done; done
for c in $PREFILL_COMM; do for t in off on; do
  run "prefill_ep32_comm${c}_$t" --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --emulate-ep 32 \
    --emulate-comm-us "$c" --tbo "$t" $([ "$t" = on ] && echo --tbo-timeline)
done; done
