"""Per-kernel GPU time of a `moefleet bench` run, from torch.profiler (CUPTI), as a table.

    python3 benchmarks/profile_step.py --steps N -- bench --preset qwen3-30b-a3b --layers 4 --mode decode \
        --batch-size 256 --kv-len 2000 --attention-backend triton --cuda-graphs off --no-breakdown

Runs the given `moefleet` command in this process and profiles it from the (--skip + 1)-th batch prepared by the
bench (skip the bench's --warmup steps: model init and warm-up stay out of the trace) to the end; prints the
kernels by total CUDA time divided by --steps (the bench's --steps, with --no-breakdown), so the "us/step"
column is the kernel's time per measured step. Single process only (--nproc-per-node 1). Eager mode
(`--cuda-graphs off`) names every kernel launch; the kernels are the same ones the graphs replay.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, required=True, help="measured steps (the bench's --steps)")
    parser.add_argument(
        "--skip", type=int, required=True, help="steps before the trace (the bench's --warmup)"
    )
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the moefleet arguments")
    args = parser.parse_args()
    argv = [a for a in args.command if a != "--"]
    from moefleet.engine.bench import runner
    from moefleet.engine.cli import main as moefleet_main

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    calls = [0]
    prepare = runner.prepare

    def traced_prepare(*a, **k):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == args.skip + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.start()
        return prepare(*a, **k)

    runner.prepare = traced_prepare  # type: ignore[assignment]
    rc = moefleet_main(argv)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.stop()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    print("| kernel | calls/step | us/step | share |\n|---|---|---|---|")
    for e in events[: args.rows]:
        print(
            f"| {e.key[:90]} | {e.count / args.steps:.1f} | {e.device_time_total / args.steps:.1f} | "
            f"{e.device_time_total / total:.1%} |"
        )
    print(f"| all kernels | | {total / args.steps:.1f} | 100% |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
