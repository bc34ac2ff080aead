#!/usr/bin/env bash
# The 2-GPU session of the EP backends (issue 9): dispatcher checks, serve parity, and the side-by-side table.
# Run from the checkout root on a 2-GPU machine after `source benchmarks/device_setup.sh`; DeepEP from
# $DEEPEP_DIR/build.sh (default ../.deepep). Logs go to ${OUT:-/tmp/ep_out}. Each step is time-boxed.
OUT=${OUT:-/tmp/ep_out}; mkdir -p "$OUT"
W=tests/gpu/ep_gpu_worker.py
run() { local t=$1 name=$2; shift 2; echo "== $name"; timeout "$t" "$@" >"$OUT/$name.log" 2>&1; echo "rc=$? ($name)";
        grep -E "PASS|FAIL|Error|error:|passed|failed|\|" "$OUT/$name.log" | grep -v "^\[rank 1\] PASS" | tail -${TAIL:-40}; }
run 60 worker_symm python3 -m torch.distributed.run --nproc-per-node 2 $W symm
run 45 bench_pre python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py --backends a2a,symm,symm-graph
[ "${SERVE_T:-100}" -gt 0 ] && run ${SERVE_T:-100} serve_symm python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_ep_backends_gpu.py -k "symm_serve and qwen3"
source "${DEEPEP_DIR:-../.deepep}/build.sh" >"$OUT/deepep_build.log" 2>&1; echo "deepep build rc=$?"; tail -2 "$OUT/deepep_build.log"
run 45 worker_deepep_normal python3 -m torch.distributed.run --nproc-per-node 2 $W deepep_normal
run 45 worker_deepep_ll python3 -m torch.distributed.run --nproc-per-node 2 $W deepep_ll
run 60 bench python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/ep_dispatch.py
