#!/usr/bin/env bash
# Two-batch overlap on vs off side by side on 2 GPUs (issue 15): DeepSeek-V3 width, decode (kv-len 2000) and
# prefill (4096-token prompts), tbo off then on per point.
# First, deployment-shaped points (`--emulate-ep N --nproc-per-node 2`, engine/bench/emulate.py): each GPU holds
# the experts one GPU of an N-way deployment holds ((256 + 32 redundant) / N: 4 at EP72, 9 at EP32) and gets
# its routed-row volume, with the real dispatch/combine between the 2 GPUs; so splitting a batch in two does
# not double expert-weight reads the way it does with 128 experts per GPU. Decode EMU_DECODE tokens/GPU at
# EP72, prefill EMU_PREFILL at EP32, backends EMU_BACKENDS (default nvlink; a second call with EMU_BACKENDS=symm
# DECODE= PREFILL= A2A_DECODE= A2A_PREFILL= adds symm); files emu72_* / emu32_*, rows "nvlink@EP72" etc.
# Then the plain EP2 points (128 experts per GPU): decode 32/64/128/256 tokens/GPU and prefill 4k/8k/16k with
# --moe-backend symm (comm stream, CUDA graph of the TBO decode step) and a2a for reference (comm stream,
# eager: its host sync is not capturable).
# Every point is its own `moefleet bench` (one process group), time-boxed; a failure is logged and the script
# goes on; past BUDGET seconds the remaining points are skipped and say so (the emulated points run first, so a
# tight budget skips plain EP2 points). Ends with one table (on/off ratio per point) and the `auto` threshold
# each mode would get (engine/tbo.py AUTO_MIN_TOKENS).
# Run from the checkout root on a 2-GPU machine:
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_tbo.sh [OUTDIR]     (NSYS=1: also an Nsight timeline)
set -uo pipefail
out=${1:-/tmp/tbo_out}; mkdir -p "$out"
BUDGET=${BUDGET:-480}                 # seconds for all runs (8 min); later points are skipped past it
LAYERS=${LAYERS:-2}                   # decoder layers, all MoE at full width (4 doubles the model time)
STEPS=${STEPS:-5}; WARMUP=${WARMUP:-2}
DECODE=${DECODE-"32 64 128 256"}; PREFILL=${PREFILL-"4096 8192 16384"}
A2A_DECODE=${A2A_DECODE-"256"}; A2A_PREFILL=${A2A_PREFILL-"16384"}   # reference backend: fewer points (empty: none)
# deployment-shaped points (empty: none): decode at EP72, prefill at EP32, 32 redundant experts (288 slots)
EMU_DECODE=${EMU_DECODE-"64 128 256"}; EMU_PREFILL=${EMU_PREFILL-"16384"}; EMU_BACKENDS=${EMU_BACKENDS-"nvlink"}
EMU_DECODE_EP=${EMU_DECODE_EP:-72}; EMU_PREFILL_EP=${EMU_PREFILL_EP:-32}; EMU_REDUNDANT=${EMU_REDUNDANT:-32}
DECODE_T=${DECODE_T:-75}; PREFILL_T=${PREFILL_T:-100}                  # per-run time limits (s)
FIRST_T=${FIRST_T:-150}               # the first run compiles the Triton kernels (cold cache)
first=1
start=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpus.csv" 2>&1
echo "gpus: $(tr '\n' ';' < "$out/gpus.csv")  commit: $(git rev-parse --short HEAD 2>/dev/null)"
common=(--preset deepseek-v3 --layers "$LAYERS" --nproc-per-node 2 --attention-backend triton --no-breakdown
        --steps "$STEPS" --warmup "$WARMUP")
point() {  # backend mode tokens/GPU tbo [emulated EP size]
  local backend=$1 mode=$2 n=$3 tbo=$4 ep=${5:-} stem="$1_$2_$3_$4" limit shape emu=()
  if [ -n "$ep" ]; then stem="emu${ep}_$stem"; emu=(--emulate-ep "$ep" --num-redundant-experts "$EMU_REDUNDANT"); fi
  if (( SECONDS - start > BUDGET )); then
    echo "skipped: budget of ${BUDGET}s spent" > "$out/$stem.log"; echo "== $stem skipped (budget)"; return
  fi
  if [ "$mode" = decode ]; then limit=$DECODE_T; shape=(--mode decode --batch-size "$n" --kv-len 2000)
  else limit=$PREFILL_T; shape=(--mode prefill --prefill-tokens "$n" --prefill-seq-len 4096); fi
  if [ $first = 1 ]; then limit=$(( limit > FIRST_T ? limit : FIRST_T )); first=0; fi
  # symm: two workspaces (one per micro-batch) of ~0.64 MiB per token/GPU at this width, plus margin
  local heap_gib=$(( n * 22 / 16384 + 4 ))
  local t0=$SECONDS
  NVSHMEM_SYMMETRIC_SIZE=$(( heap_gib << 30 )) timeout -k 10 "$limit" moefleet bench "${common[@]}" "${shape[@]}" \
    ${emu[@]+"${emu[@]}"} --moe-backend "$backend" --tbo "$tbo" $([ "$tbo" = on ] && echo --tbo-timeline) \
    --json "$out/$stem.json" > "$out/$stem.log" 2>&1
  local rc=$?
  echo "rc=$rc" >> "$out/$stem.log"
  [ $rc -eq 124 ] && echo "timed out after ${limit}s" >> "$out/$stem.log"
  echo "== $stem rc=$rc $((SECONDS - t0))s: $(grep -m1 -E '^\| deepseek' "$out/$stem.log" | cut -d'|' -f8,9)" \
       "$(grep -E 'rank 0: (TBO overlap|CUDA graphs)' "$out/$stem.log" | cut -c9- | tr '\n' ' ')"
  [ $rc -ne 0 ] && grep -E "Error|error" "$out/$stem.log" | grep -v Assertion | tail -3
  sleep 1
}
for b in $EMU_BACKENDS; do
  for n in $EMU_DECODE; do for tbo in off on; do point "$b" decode "$n" "$tbo" "$EMU_DECODE_EP"; done; done
  for n in $EMU_PREFILL; do for tbo in off on; do point "$b" prefill "$n" "$tbo" "$EMU_PREFILL_EP"; done; done
done
for n in $DECODE; do for tbo in off on; do point symm decode "$n" "$tbo"; done; done
for n in $PREFILL; do for tbo in off on; do point symm prefill "$n" "$tbo"; done; done
for n in $A2A_DECODE; do for tbo in off on; do point a2a decode "$n" "$tbo"; done; done
for n in $A2A_PREFILL; do for tbo in off on; do point a2a prefill "$n" "$tbo"; done; done
echo "== all runs: $((SECONDS - start))s"
python3 benchmarks/tbo_table.py "$out" | tee "$out/table.md"
# Optional timeline (NSYS=1, needs nsys): symm decode 256 with TBO, eager (graph replays hide the ranges), every
# stage in an NVTX range "mb<i> <compute|comm> <n>"; open $out/tbo_symm_decode256.nsys-rep in Nsight Systems
if [ "${NSYS:-0}" = 1 ] && command -v nsys >/dev/null; then
  echo "== nsys timeline"
  MOEFLEET_TBO_NVTX=1 timeout -k 10 150 nsys profile --trace cuda,nvtx --force-overwrite true \
    -o "$out/tbo_symm_decode256" moefleet bench "${common[@]}" --mode decode --batch-size 256 --kv-len 2000 \
    --moe-backend symm --tbo on --cuda-graphs off > "$out/nsys.log" 2>&1
  echo "nsys rc=$?"; ls -la "$out"/tbo_symm_decode256* 2>/dev/null
fi
