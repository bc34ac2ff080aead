"""RelayResponse (engine/gateway/relay_response.py) against hand-driven ASGI receive/send callables.

The end-to-end checks (a client leaving mid-stream through the real gateway makes the engine abort and free
KV) are tests/gateway/test_gateway_http.py and tests/disaggregation/test_pd_serving.py; here the edge cases that
are hard to time over sockets: a disconnect mid-stream ends the response quietly and runs the body's cleanup, a
cancel that is not the disconnect's still propagates, and a disconnect seen as the response ends does not cancel
the task afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from moefleet.engine.gateway.relay_response import RelayResponse


class Client:
    """An ASGI receive/send pair: records what is sent; receive answers http.disconnect once `leave` is set
    (or once the response is complete, as uvicorn does)."""

    def __init__(self, yields: int = 0) -> None:
        self.yields = yields  # loop turns the final send takes (as a send that waits for the socket)
        self.sent: list[dict[str, Any]] = []
        self.leave = asyncio.Event()
        self.body_read = False

    async def receive(self) -> dict[str, Any]:
        if not self.body_read:
            self.body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.leave.set()  # uvicorn: receive() answers http.disconnect once the response is complete
            for _ in range(self.yields):
                await asyncio.sleep(0)

    def chunks(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body" and m["body"]]


def endless(closed: list[str]):
    async def body():
        try:
            i = 0
            while True:
                await asyncio.sleep(0.005)
                yield f"data: {i}\n\n".encode()
                i += 1
        finally:
            closed.append("closed")

    return body()


def test_a_client_that_leaves_mid_stream_ends_the_response_and_closes_the_body():
    async def scenario() -> None:
        client, closed = Client(), []
        response = RelayResponse(endless(closed), media_type="text/event-stream")
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, client.leave.set)
        started = loop.time()
        await asyncio.wait_for(response({"type": "http"}, client.receive, client.send), timeout=5)
        assert loop.time() - started < 2.0
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the disconnect's cancel was taken back
        assert closed == ["closed"]
        assert len(client.chunks()) >= 2
        start = client.sent[0]
        assert start["type"] == "http.response.start" and start["status"] == 200
        assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
        await asyncio.sleep(0.02)  # still running: no cancel left behind
        assert not any(m.get("more_body") is False for m in client.sent)  # cut, not ended normally

    asyncio.run(scenario())


def test_a_cancel_that_is_not_the_disconnect_propagates_and_closes_the_body():
    async def scenario() -> None:
        client, closed = Client(), []
        response = RelayResponse(endless(closed), media_type="text/event-stream")
        task = asyncio.ensure_future(response({"type": "http"}, client.receive, client.send))
        await asyncio.sleep(0.05)
        task.cancel()  # as the drain's cut or a shutdown does
        with pytest.raises(asyncio.CancelledError):
            await task
        assert closed == ["closed"]

    asyncio.run(scenario())


def test_a_disconnect_seen_as_the_response_ends_cancels_nothing_afterwards():
    async def scenario() -> None:
        async def three():
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        for yields in range(20):  # the watch's callback lands in different loop turns around the end
            client = Client(yields % 5)
            response = RelayResponse(three(), media_type="text/event-stream")
            await response({"type": "http"}, client.receive, client.send)
            assert client.chunks() == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
            assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
            for _ in range(5):
                await asyncio.sleep(0)  # a stray cancel would raise CancelledError here

    asyncio.run(scenario())
