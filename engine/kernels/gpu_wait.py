"""A GPU wait of a wall-clock duration: one program of one warp spins on the GPU's nanosecond global timer (PTX
`%globaltimer`) until `ns` nanoseconds have passed since it started.

`moefleet bench --emulate-comm-us` stands for a deployment's dispatch / combine transfers with it
(bench/emulate.py): it holds its stream for the time asked and leaves the other SMs free, and the time does not
depend on the SM clock. `torch.cuda._sleep` (a spin of N clock cycles, calibrated once at idle) is the fallback
only: under load the SM clock drops and its waits ran ~1.5x longer than asked (docs/benchmarks.md).

    wait, how = choose_wait(device)     # gpu_wait when the kernel compiles and runs here, else the cycle spin
    wait(wait_ns(300.0, 128, 256))      # 150 us on the current stream (a micro-batch of half the tokens)

`ns` is a runtime argument, not specialised: one compiled kernel serves every duration, and a CUDA graph
captures each launch with its own value. The pure part (`wait_ns`) is tested on CPU; inline PTX does not run
there (not under TRITON_INTERPRET either), so the kernel is tested on a GPU (tests/gpu/test_gpu_wait_gpu.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import triton
import triton.language as tl


def wait_ns(us: float, tokens: int, full_tokens: int) -> int:
    """Nanoseconds a transfer of `tokens` waits when one of `full_tokens` (the step's batch) waits `us`
    microseconds: in proportion, rounded to the nanosecond (a TBO micro-batch of half the tokens: half)."""
    if us < 0 or tokens < 0 or full_tokens < 1:
        raise ValueError(f"us ({us}) and tokens ({tokens}) must be >= 0 and full_tokens ({full_tokens}) >= 1")
    return round(us * 1e3 * tokens / full_tokens)


@triton.jit
def _globaltimer():
    """The GPU's global nanosecond timer (is_pure=False: read anew at every call, never hoisted)."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit(do_not_specialize=["ns"])
def gpu_wait_kernel(ns):
    start = _globaltimer()
    now = start
    while now - start < ns:
        now = _globaltimer()


def gpu_wait(ns: int, device: torch.device | None = None) -> None:
    """Hold the current stream of `device` (None: the current device) for `ns` nanoseconds (0: nothing)."""
    if ns < 0:
        raise ValueError(f"ns ({ns}) must be >= 0")
    if not ns:
        return
    if device is None or device.index is None or device.index == torch.cuda.current_device():
        gpu_wait_kernel[(1,)](int(ns), num_warps=1)
        return
    with torch.cuda.device(device):
        gpu_wait_kernel[(1,)](int(ns), num_warps=1)


def cycle_wait(ns: int, cycles_per_ns: float) -> None:
    """The fallback: `torch.cuda._sleep` for the cycles `ns` took at idle (longer when the SM clock drops)."""
    cycles = round(ns * cycles_per_ns)
    if cycles:
        torch.cuda._sleep(cycles)


def sleep_cycles_per_us(device: torch.device, cycles: int = 2_000_000) -> float:
    """GPU clock cycles per microsecond of `torch.cuda._sleep`, measured now (at idle): the fallback's scale."""
    with torch.cuda.device(device):
        torch.cuda._sleep(cycles // 10)  # warm up
        return cycles / (sorted(_timed_us(lambda: torch.cuda._sleep(cycles)) for _ in range(3))[1])


def _timed_us(fn: Callable[[], None]) -> float:
    """GPU microseconds of `fn` by CUDA events, its launch queued behind a 1 ms spin so the host's launch time
    (~50 us for a Triton launch from Python) is not counted as GPU time."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(2_000_000)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def choose_wait(device: torch.device, check_us: float = 200.0) -> tuple[Callable[[int], None], str]:
    """(wait(ns) on the current stream, what it is): `gpu_wait` if its kernel compiles and runs on `device`
    (compiled here, so no capture compiles it), else the calibrated `torch.cuda._sleep` spin, saying why;
    either way one `check_us` wait is timed now (idle) and reported."""
    ns = round(check_us * 1e3)
    try:
        wait: Callable[[int], None] = partial(gpu_wait, device=device)
        wait(1_000)
        torch.cuda.synchronize(device)
        how = "Triton %globaltimer spin (wall clock)"
    except Exception as exc:  # noqa: BLE001 - any compile or launch failure: fall back to the cycle spin
        cycles_per_us = sleep_cycles_per_us(device)
        wait = partial(cycle_wait, cycles_per_ns=cycles_per_us / 1e3)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        how = (
            f"torch.cuda._sleep FALLBACK, {cycles_per_us:.0f} cycles/us calibrated at idle (waits stretch when the "
            f"SM clock drops under load); the Triton wait failed: {reason}"
        )
    with torch.cuda.device(device):
        measured = _timed_us(lambda: wait(ns))
    return wait, f"{how}; a {check_us:g} us wait took {measured:.1f} us at idle"
