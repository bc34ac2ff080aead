"""The wall-clock GPU wait (engine/kernels/gpu_wait.py) on CPU: the nanoseconds a transfer waits, the choice
between the Triton timer spin and the cycle-spin fallback (GPU calls faked), and the kernel compiled for Hopper
(sm_90 PTX and cubin, in a subprocess without TRITON_INTERPRET: inline PTX cannot run on CPU). Its timing on a
GPU: tests/gpu/test_gpu_wait_gpu.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from moefleet.engine.kernels import gpu_wait as gw


def test_wait_ns_is_proportional_to_the_tokens_moved():
    assert gw.wait_ns(300.0, 256, 256) == 300_000
    assert gw.wait_ns(300.0, 128, 256) == 150_000  # a TBO micro-batch of half the tokens
    assert gw.wait_ns(1.2, 2, 8) == 300
    assert gw.wait_ns(0.0005, 1, 1) == 0 and gw.wait_ns(0.0015, 1, 1) == 2  # to the nanosecond
    assert gw.wait_ns(300.0, 0, 256) == 0  # an empty micro-batch
    for bad in ((-1.0, 1, 1), (1.0, -1, 1), (1.0, 1, 0)):
        with pytest.raises(ValueError):
            gw.wait_ns(*bad)


def test_gpu_wait_of_zero_launches_nothing_and_negative_is_refused():
    gw.gpu_wait(0)  # on CPU a launch would fail: nothing was launched
    with pytest.raises(ValueError, match="ns"):
        gw.gpu_wait(-1)


@pytest.fixture
def fake_cuda(monkeypatch):
    """No GPU: device switches and synchronisations do nothing, every timed wait "took" 201 us."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    timed: list[int] = []

    def timed_us(fn):
        fn()
        timed.append(1)
        return 201.0

    monkeypatch.setattr(gw, "_timed_us", timed_us)
    return timed


def test_choose_wait_takes_the_timer_spin_when_it_runs(monkeypatch, fake_cuda):
    calls: list[tuple[int, object]] = []
    monkeypatch.setattr(gw, "gpu_wait", lambda ns, device=None: calls.append((ns, device)))
    device = torch.device("cuda", 0)
    wait, how = gw.choose_wait(device)
    assert calls == [(1_000, device), (200_000, device)]  # the probe (compiles it), then the timed check
    wait(5)
    assert calls[-1] == (5, device)
    assert how == "Triton %globaltimer spin (wall clock); a 200 us wait took 201.0 us at idle"


def test_choose_wait_falls_back_to_the_cycle_spin_and_says_why(monkeypatch, fake_cuda):
    def broken(ns, device=None):
        raise RuntimeError("PTX .version 8.7 does not support .target sm_90\nmore")

    slept: list[int] = []
    monkeypatch.setattr(gw, "gpu_wait", broken)
    monkeypatch.setattr(gw, "sleep_cycles_per_us", lambda device: 1500.0)
    monkeypatch.setattr(torch.cuda, "_sleep", slept.append)
    wait, how = gw.choose_wait(torch.device("cuda", 0), check_us=100.0)
    assert slept == [150_000]  # the timed check: 100 us x 1,500 cycles/us
    wait(2_000)
    assert slept[-1] == 3_000
    wait(0)
    assert len(slept) == 2  # nothing to wait
    assert how.startswith("torch.cuda._sleep FALLBACK, 1500 cycles/us calibrated at idle")
    assert "the Triton wait failed: PTX .version 8.7 does not support .target sm_90;" in how
    assert how.endswith("a 100 us wait took 201.0 us at idle")


COMPILE = """
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)
from moefleet.engine.kernels.gpu_wait import gpu_wait_kernel
for ns_type in ("i32", "i64"):
    source = ASTSource(fn=gpu_wait_kernel, signature={"ns": ns_type}, constexprs={})
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    except FileNotFoundError:  # no ptxas
        sys.exit(3)
    assert kernel.asm["cubin"]
    print(kernel.asm["ptx"])
    print("== OK", ns_type)
"""


def test_the_wait_kernel_compiles_for_sm90_to_a_timer_loop(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env, timeout=300
    )
    if result.returncode == 3:
        pytest.skip("this Triton has no NVIDIA compiler backend (ptxas)")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for ptx in result.stdout.split("== OK")[:2]:
        body = ptx[ptx.index(".entry gpu_wait_kernel(") :]
        assert body.count("mov.u64") >= 2 and body.count("%globaltimer;") == 2  # the start, and in the loop
        assert ".reqntid 32" in body  # one warp
        assert "gpu_wait_kernel_param_0" in body  # ns: a runtime argument, not a constant
    assert "== OK i32" in result.stdout and "== OK i64" in result.stdout
