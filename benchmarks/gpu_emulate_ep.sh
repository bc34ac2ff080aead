#!/usr/bin/env bash
# Deployment-shape runs on ONE GPU (issue 9): DeepSeek-V3 width, one GPU of the reference deployment,
# projected to 61 layers. Usage (on the GPU machine): source benchmarks/device_setup.sh && bash benchmarks/gpu_emulate_ep.sh OUTDIR
# COMM_US (optional): dispatch + combine microseconds per MoE layer to add (e.g. measured on 2 GPUs).
set -euo pipefail
out=${1:-emulate-out}
comm=${COMM_US:-0}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# Decode: EP72, 256 + 32 redundant experts -> 4 per GPU, 256 sequences x 2,000 cached tokens per GPU.
moefleet bench --preset deepseek-v3 --mode decode --batch-size 256 --kv-len 2000 \
  --emulate-ep 72 --num-redundant-experts 32 --dense-layers 3 --project-depths 4,6 --project-layers 61 \
  --comm-us-per-layer "$comm" --json "$out/emulate_decode_ep72.json" 2>&1 | tee "$out/emulate_decode_ep72.txt"
# Prefill: EP32, 288 physical experts -> 9 per GPU, 16,384 tokens per GPU as 4 sequences of 4,096.
moefleet bench --preset deepseek-v3 --mode prefill --prefill-tokens 16384 --prefill-seq-len 4096 \
  --emulate-ep 32 --num-redundant-experts 32 --dense-layers 3 --project-depths 4,6 --project-layers 61 \
  --comm-us-per-layer "$comm" --json "$out/emulate_prefill_ep32.json" 2>&1 | tee "$out/emulate_prefill_ep32.txt"
