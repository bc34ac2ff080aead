"""The masked fused-MoE kernel's FP8-row variants (bf16 and FP8 weights, gate/up and down), the masked
(de)quantisation kernel, the MLA decode tile (TMA descriptors and pointers, loads pipelined) and the split-K
FP8 GEMM (its dot a wgmma) compile for Hopper (sm_90, to a cubin, with the ptxas bundled in the Triton wheel)
on a CPU-only machine: the interpreter tests check the numbers, not what only the compiler sees (loop-carried
types, fp8 conversions, dot operand types). Runs tests/engine/compile_sm90.py in a subprocess without
TRITON_INTERPRET; skipped where Triton has no NVIDIA compiler backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_fp8_masked_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from another run's cache
    script = Path(__file__).with_name("compile_sm90.py")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    if result.returncode == 3:
        pytest.skip("this Triton has no NVIDIA compiler backend (ptxas)")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("OK ") == 11, result.stdout
