"""Start this node's ranks (one process per GPU) and keep them all-or-nothing.

A pod runs one supervisor: `supervise(command, nproc_per_node)` starts `command` nproc_per_node times with
MOEFLEET_LOCAL_RANK=0..n-1 (everything else of the launch contract is inherited from the pod's environment).
If any rank exits non-zero, the supervisor stops the others (SIGTERM, then SIGKILL after a grace period)
and exits with that rank's code, so the pod fails as a unit and the operator restarts the group whole.
SIGTERM/SIGINT to the supervisor are forwarded to every rank.

`moefleet serve` can use it by re-running itself: the supervisor sees no MOEFLEET_LOCAL_RANK and calls
`supervise([sys.executable, "-m", "moefleet.engine.cli", *sys.argv[1:]], nproc_per_node)`; each child sees
MOEFLEET_LOCAL_RANK and acts as that rank.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

logger = logging.getLogger(__name__)

LOCAL_RANK_ENV = "MOEFLEET_LOCAL_RANK"


def rank_env(base: dict[str, str], local_rank: int) -> dict[str, str]:
    """Pure: the environment of one local rank."""
    return {**base, LOCAL_RANK_ENV: str(local_rank)}


def first_failure(codes: Sequence[int | None]) -> tuple[int, int] | None:
    """Pure: (local rank, exit code) of the first rank that exited non-zero, or None."""
    for local_rank, code in enumerate(codes):
        if code not in (None, 0):
            return local_rank, code
    return None


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def supervise(
    command: Sequence[str],
    nproc_per_node: int,
    env: dict[str, str] | None = None,
    poll_s: float = 0.2,
    grace_s: float = 10.0,
) -> int:
    """Run `command` once per local rank; return 0 when all exit cleanly, else the first failure's code."""
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node ({nproc_per_node}) must be >= 1")
    base = dict(os.environ) if env is None else env
    procs = [subprocess.Popen(list(command), env=rank_env(base, r)) for r in range(nproc_per_node)]
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            failed = first_failure(codes)
            if failed is not None:
                local_rank, code = failed
                print(
                    f"moefleet: local rank {local_rank} exited with code {code}; stopping the other ranks of "
                    "this node so the group restarts whole",
                    file=sys.stderr,
                    flush=True,
                )
                _stop(procs, grace_s)
                return code
            if all(code == 0 for code in codes):
                return 0
            if received and all(code is not None for code in codes):
                return 128 + received[0]
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop(procs, grace_s)
