"""The per-node supervisor with real child processes (plain Python, no torch, so it is quick)."""

from __future__ import annotations

import sys
import time

import pytest
from moefleet.engine.distributed.local_launcher import first_failure, rank_env, supervise

pytestmark = pytest.mark.timeout(60)

# Rank 1 fails after a moment; the others would sleep for a minute if nobody stopped them.
FAILING = (
    "import os, sys, time; r = int(os.environ['MOEFLEET_LOCAL_RANK']); "
    "time.sleep(0.5) if r == 1 else time.sleep(60); sys.exit(17 if r == 1 else 0)"
)
CLEAN = "import os, sys; sys.exit(0 if os.environ['MOEFLEET_LOCAL_RANK'] in ('0', '1', '2') else 3)"


def test_pure_helpers():
    assert rank_env({"A": "1"}, 3) == {"A": "1", "MOEFLEET_LOCAL_RANK": "3"}
    assert first_failure([None, 0, None]) is None
    assert first_failure([0, None, 17, 1]) == (2, 17)


def test_one_failing_rank_stops_the_node(capfd):
    started = time.monotonic()
    code = supervise([sys.executable, "-c", FAILING], 3, poll_s=0.05, grace_s=5)
    assert code == 17
    assert time.monotonic() - started < 15  # not the 60 s the healthy ranks would sleep
    assert "local rank 1 exited with code 17" in capfd.readouterr().err


def test_all_ranks_clean_exit_zero():
    assert supervise([sys.executable, "-c", CLEAN], 3, poll_s=0.05) == 0
    assert supervise([sys.executable, "-c", CLEAN], 4, poll_s=0.05) == 3  # rank 3 exits 3
