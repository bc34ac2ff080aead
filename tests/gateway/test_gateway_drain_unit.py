"""The pure parts of the gateway's drain (engine/gateway/drain.py): the timeout it uses, the bytes that end a
stream it cuts, and its config field (the processes are tested in tests/faults/test_gateway_drain.py)."""

from __future__ import annotations

import json

import pytest
from moefleet.engine.gateway.drain import abort_tail, drain_timeout_of

from moefleet.gateway_schema import GatewayConfig


@pytest.mark.parametrize(
    "flag,config,expected", [(None, None, 30.0), (None, 90.0, 90.0), (5.0, 90.0, 5.0), (0.0, None, 0.0)]
)
def test_drain_timeout_flag_then_config_then_default(flag, config, expected):
    assert drain_timeout_of(flag, config) == expected


def _events(tail: bytes) -> list:
    out = []
    for block in tail.decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_cut_completion_stream_ends_like_the_engine_ends_an_aborted_one():
    last = (
        b'data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m",'
        b'"choices":[{"index":0,"text":" a","logprobs":null,"finish_reason":null}]}\n\n'
        b'data: {"id":"cmpl-1","object":"text_completion","created":7,"model":"m",'
        b'"choices":[{"index":1,"text":" b","logprobs":null,"finish_reason":null}]}\n\n'
    )
    chunk, done = _events(abort_tail(last))
    assert done == "[DONE]"
    assert chunk == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 7,
        "model": "m",
        "choices": [{"index": 1, "text": "", "logprobs": None, "finish_reason": "abort"}],
    }


def test_a_cut_chat_stream_gets_an_empty_delta():
    last = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    chunk, done = _events(abort_tail(last))
    assert done == "[DONE]" and chunk["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "abort"}
    ]
    assert chunk["id"] == "c" and chunk["object"] == "chat.completion.chunk"


@pytest.mark.parametrize(
    "last", [None, b"", b'data: {"id":"x","choi', b'data: {"error": {"message": "m"}}\n\n']
)
def test_without_a_whole_chunk_to_copy_the_stream_ends_with_an_error_event(last):
    error, done = _events(abort_tail(last))
    assert done == "[DONE]"
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["code"] == "gateway_draining" and "retry" in error["error"]["message"]


def test_the_config_file_carries_the_drain_timeout_both_ways():
    data = {"roles": {"mixed": {"groups": [{"url": "http://a:1"}]}}, "drainTimeoutSeconds": 12.5}
    config = GatewayConfig.from_dict(data)
    assert config.drain_timeout_s == 12.5
    assert GatewayConfig.from_dict(config.to_dict()).drain_timeout_s == 12.5
    assert "drainTimeoutSeconds" not in GatewayConfig.from_dict({"roles": data["roles"]}).to_dict()


def test_a_body_cut_inside_an_event_is_closed_before_the_abort_chunk():
    last = (
        b'data: {"id":"x","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"a"}]}\n\n'
        b'data: {"id":"x","obj'
    )
    tail = abort_tail(last)
    assert tail.startswith(b"\n\ndata: {")  # the broken event ends on its own, not glued to the abort chunk
    chunk, done = _events(tail[2:])
    assert done == "[DONE]" and chunk["id"] == "x" and chunk["choices"][0]["finish_reason"] == "abort"
    assert abort_tail(b"").startswith(b"data: ") and abort_tail(last[:-20]).startswith(b"data: ")
