"""The pure parts of the drain and the request guard (fast, no processes): what to do when, how deep JSON is,
and that the operator's grace period covers the engine's drain."""

from __future__ import annotations

import json

import pytest
from moefleet.engine.server.drain import ABORT, SERVE, STOP, WAIT, Drain, drain_action
from moefleet.engine.server.request_guard import json_depth


@pytest.mark.parametrize(
    "now,started,in_flight,forced,expected",
    [
        (100.0, None, 5, False, SERVE),  # no drain
        (100.0, 99.0, 3, False, WAIT),  # draining, 1 s of 30 used
        (100.0, 99.0, 0, False, STOP),  # nothing left in flight
        (100.0, 70.0, 3, False, ABORT),  # exactly at the 30 s timeout
        (100.0, 99.9, 3, True, ABORT),  # a second signal
        (100.0, 99.9, 0, True, STOP),  # forced with nothing in flight: just stop
    ],
)
def test_drain_action(now, started, in_flight, forced, expected):
    assert drain_action(now, started, 30.0, in_flight, forced) == expected


def test_signals_drain_then_force_and_a_relayed_drain_is_not_a_signal(monkeypatch):
    monkeypatch.setattr("moefleet.engine.server.drain._hard_exit_later", lambda *args: None)
    clock = iter([10.0, 11.0, 12.0, 13.0])
    drain = Drain(timeout_s=30, clock=lambda: next(clock))
    heard: list[bool] = []
    drain.listeners.append(heard.append)
    drain.begin()  # another node asked (relayed by the watchdog)
    assert drain.draining and not drain.forced and drain.started_at == 10.0
    drain.on_signal()  # this pod's own SIGTERM: still a plain drain
    assert not drain.forced and heard == [False]
    drain.on_signal()  # the second SIGTERM forces
    assert drain.forced and heard == [False, True] and drain.started_at == 10.0
    drain.in_flight = 2
    assert drain.action() == ABORT


def test_negative_drain_timeout_is_refused():
    with pytest.raises(ValueError, match="drain timeout must be >= 0"):
        Drain(timeout_s=-1)


def _nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


@pytest.mark.parametrize(
    "body,expected",
    [
        (b'{"prompt": "hi"}', 1),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}', 5),
        (b'{"prompt": "[[[[{{{{ not structure"}', 1),  # brackets inside strings do not count
        (b'{"prompt": "a \\" [[[ b"}', 1),  # an escaped quote does not end the string
        (_nested(100), 100),
        (b"", 0),
        (b"12", 0),
    ],
)
def test_json_depth(body, expected):
    assert json_depth(body) == expected


def test_json_depth_agrees_with_json_on_generated_documents():
    def depth_of(value):  # the reference: walk the parsed document
        if isinstance(value, dict):
            return 1 + max((depth_of(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return 1 + max((depth_of(v) for v in value), default=0)
        return 0

    documents = [
        {"a": [1, {"b": "]]]"}, [[[]]]], "c": {"d": {"e": "{{"}}},
        [{"x": []}, {"y": [[{"z": '\\"'}]]}],
        {"s": 'quote " inside', "t": [["[", "]"]]},
    ]
    for document in documents:
        assert json_depth(json.dumps(document).encode()) == depth_of(document)


def test_operator_grace_period_covers_the_engine_drain():
    from moefleet.engine.server.drain import ABORT_FLUSH_S, DEFAULT_DRAIN_TIMEOUT_S
    from moefleet.operator.render import PRESTOP_SLEEP_S, TERMINATION_GRACE_S

    assert TERMINATION_GRACE_S >= PRESTOP_SLEEP_S + DEFAULT_DRAIN_TIMEOUT_S + ABORT_FLUSH_S + 5


def test_serve_refuses_a_negative_drain_timeout(capsys):
    from moefleet.engine.cli import main
    from support.tiny_models import tiny_model_dir

    model = str(tiny_model_dir("qwen3_norm_topk"))
    assert main(["serve", "--model", model, "--port", "0", "--drain-timeout", "-1"]) == 2
    assert "--drain-timeout -1 must be >= 0 seconds" in capsys.readouterr().err
    assert main(["serve", "--model", model, "--port", "0", "--max-request-bytes", "0"]) == 2
    assert "--max-request-bytes 0 must be a positive integer" in capsys.readouterr().err


def test_forced_stop_has_a_hard_deadline(monkeypatch):
    """After a second signal, a stop that hangs (e.g. a rank stuck in a collective) still ends the process."""
    import threading

    import moefleet.engine.server.drain as drain_module

    exited = threading.Event()
    codes: list[int] = []
    monkeypatch.setattr(drain_module.os, "_exit", lambda code: (codes.append(code), exited.set()))
    monkeypatch.setattr(drain_module, "FORCE_EXIT_S", 0.05)
    drain = Drain(timeout_s=30)
    drain.on_signal()
    assert not exited.wait(0.2)  # a plain drain has no hard deadline
    drain.on_signal()
    assert exited.wait(5) and codes == [drain_module.EXIT_FORCED]
