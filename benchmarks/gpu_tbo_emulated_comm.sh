#!/usr/bin/env bash
# Two-batch overlap on ONE GPU at a deployment's shape with its transfers emulated (issue 15): `--emulate-ep`
# gives the GPU the per-GPU experts and rows of EP72 decode / EP32 prefill, `--emulate-comm-us` makes each
# dispatch and each combine of the step's tokens wait that long on the GPU (a TBO micro-batch in proportion to
# its tokens; one warp spinning on the GPU's nanosecond timer, engine/kernels/gpu_wait.py: wall-clock time
# whatever the SM clock, on TBO's comm stream, the other SMs free; the runs of 2026-12-01 used an idle-calibrated
# torch.cuda._sleep cycle spin instead, whose waits ran ~1.5x long under load), standing for inter-node
# transfers (DeepEP low-latency over RDMA: dispatch 77-194 us, combine 114-360 us at 128 tokens, ANCHORS.md).
# TBO off vs on per point, FP8 weights, 2 layers, decode steps from CUDA graphs. --tbo-timeline: decode runs
# print the timeline of 3 profiled graph replays (the transfer waits' time spent vs asked, and the share of it
# other kernels ran under), the `on` runs also the eager per-stage one. Results: one line per run, logs and
# JSON in OUT.
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
  echo "== $stem rc=$? $(grep -m1 -E '^\| deepseek' "$out/$stem.log" | cut -d'|' -f8,9,22)"
  grep -m1 'TBO timeline, graph' "$out/$stem.log" | sed 's/^rank 0: TBO timeline, /   /'
  grep -m1 'TBO timeline, eager' "$out/$stem.log" | sed 's/^rank 0: TBO timeline, /   /'
}
for c in $DECODE_COMM; do for t in off on; do
  run "decode_ep72_comm${c}_$t" --mode decode --batch-size 256 --kv-len 2000 --emulate-ep 72 --emulate-comm-us "$c" \
    --tbo "$t" --tbo-timeline
done; done
for c in $PREFILL_COMM; do for t in off on; do
  run "prefill_ep32_comm${c}_$t" --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 --emulate-ep 32 \
    --emulate-comm-us "$c" --tbo "$t" $([ "$t" = on ] && echo --tbo-timeline)
done; done
