"""Fixtures shared by the KV transfer tests."""

from __future__ import annotations

import pytest
from moefleet.engine.disaggregation.receiver import KVServer


@pytest.fixture
def receiver_of():
    """`receiver_of(pool)` starts a KVServer on loopback over `pool`; all are closed after the test."""
    made: list[KVServer] = []

    def make(pool):
        made.append(KVServer(pool, "127.0.0.1"))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()
