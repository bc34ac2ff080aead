#!/usr/bin/env bash
# The 2-GPU session of the EP backends (issue 9): dispatcher checks, serve parity, and the side-by-side table.
# Run from the checkout root on a 2-GPU machine after `source benchmarks/device_setup.sh`; DeepEP is built from
# ${DEEPEP_DIR:-../.deepep}/build.sh. STEPS picks the steps (default: all, in this order); logs go to
# ${OUT:-/tmp/ep_out}; each step is time-boxed.
OUT=${OUT:-/tmp/ep_out}; mkdir -p "$OUT"
STEPS=${STEPS:-"kernels worker_symm worker_a2a bench_symm serve_symm deepep worker_deepep_normal worker_deepep_ll bench_deepep serve_deepep"}
export EP_SERVE_LOG_DIR=$OUT
W=tests/gpu/ep_gpu_worker.py
TR="python3 -m torch.distributed.run --nproc-per-node 2"
run() { local t=$1 name=$2; shift 2; echo "== $name"; timeout "$t" "$@" >"$OUT/$name.log" 2>&1; echo "rc=$? ($name)";
        grep -E "PASS|FAIL|Error|error:|passed|failed|^\||^dispatch|^identity" "$OUT/$name.log" | grep -v "Assertion" | tail -${TAIL:-40}; }
for step in $STEPS; do
  case $step in
    # the fused-MoE kernels incl. the masked kernel on DeepEP-layout FP8 rows + scales (one GPU)
    kernels) run "${KERNELS_T:-400}" kernels python3 -m pytest -q -rA -p no:cacheprovider --timeout 300 tests/gpu/test_moe_kernels_gpu.py ;;
    worker_*) run "${WORKER_T:-150}" "$step" $TR $W "${step#worker_}" ;;
    deepep) source "${DEEPEP_DIR:-../.deepep}/build.sh" >"$OUT/deepep_build.log" 2>&1; echo "deepep build rc=$?" ;;
    # symm and DeepEP each initialise NVSHMEM their own way: never both in one process
    bench_symm) run "${BENCH_T:-240}" bench_symm $TR benchmarks/ep_dispatch.py --backends a2a,symm,symm-graph ;;
    # + experts column: 128 local experts of DeepSeek-V3's shape, fp8 weights (~5.6 GB per GPU)
    bench_deepep) run "${BENCH_T:-240}" bench_deepep $TR benchmarks/ep_dispatch.py --backends deepep-normal,deepep-ll ;;
    serve_symm) run "${SERVE_T:-200}" serve_symm python3 -m pytest -q -rA -p no:cacheprovider --timeout 150 tests/gpu/test_ep_backends_gpu.py -k symm_serve ;;
    serve_deepep) run "${SERVE_T:-200}" serve_deepep python3 -m pytest -q -rA -p no:cacheprovider --timeout 150 tests/gpu/test_ep_backends_gpu.py -k deepep_serve ;;
  esac
done
