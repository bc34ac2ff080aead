#!/usr/bin/env bash
# One 1-GPU call: TBO on vs off projected to the full model (61 layers from depths 4 and 12; the 2-layer runs
# carry one layer's fill / drain per step) at the deployment's shape with emulated transfers in wall-clock time
# (gpu_wait): decode EP72 256/GPU x 2,000 cached tokens (graphs) at COMMS us per dispatch / combine (full
# batch; a micro-batch waits in proportion), and prefill EP32 16k/GPU at PREFILL_COMM us (eager, depths 4, 6).
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_tbo_projection.sh OUT
set -uo pipefail
out=${1:-/tmp/gpu-tbo-proj}; mkdir -p "$out"
COMMS=${COMMS:-"0 300"}; PREFILL_COMM=${PREFILL_COMM:-}; STEPS=${STEPS:-10}
DEC="--preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3 --quantization fp8 --project-depths 4,12 --project-layers 61"
PRE="--preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3 --quantization fp8 --project-depths 4,6 --project-layers 61"
line() { grep -E '^\| deepseek-v3 \| (decode|prefill) \| [0-9]+ \|' "$1" | tail -1 | cut -d'|' -f8-14; }
for c in $COMMS; do for t in off on; do
  name=decode_ep72_comm${c}_tbo$t
  timeout 150 moefleet bench $DEC --emulate-comm-us "$c" --tbo $t --steps "$STEPS" --warmup 3 --no-breakdown \
    --json "$out/$name.json" > "$out/$name.txt" 2>&1
  echo "$name rc=$?: $(line "$out/$name.txt")"
done; done
for c in $PREFILL_COMM; do for t in off on; do
  name=prefill_ep32_comm${c}_tbo$t
  timeout 200 moefleet bench $PRE --emulate-comm-us "$c" --tbo $t --steps 3 --warmup 1 --no-breakdown \
    --json "$out/$name.json" > "$out/$name.txt" 2>&1
  echo "$name rc=$?: $(line "$out/$name.txt")"
done; done
