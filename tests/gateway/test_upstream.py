"""The gateway's upstream client (engine/gateway/upstream.py) against real sockets: what it raises for an
engine that cannot be reached, one that breaks mid-body, and what it returns for a whole chunked answer."""

from __future__ import annotations

import asyncio
import socket

import pytest
from moefleet.engine.gateway.upstream import Upstream, UpstreamBusy, UpstreamError, UpstreamUnreachable

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve(body: bytes, close_after: bool) -> tuple[asyncio.AbstractServer, str, list[bytes]]:
    """A raw HTTP/1.1 server answering every request with HEAD + `body` (then closing if `close_after`)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length")
                )
            )
            seen.append(head + await reader.readexactly(length))
            writer.write(HEAD + body)
            await writer.drain()
            if close_after:
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", seen


def test_a_whole_chunked_answer_is_read_chunk_by_chunk_and_the_request_goes_out_unchanged():
    async def main() -> None:
        events = [b'data: {"x":1}\n\n', b"data: [DONE]\n\n"]
        server, url, seen = await _serve(
            b"".join(_chunk(e) for e in events) + b"0\r\n\r\n", close_after=False
        )
        upstream = Upstream(connect_timeout=5.0)
        try:
            answer = await upstream.post(
                url + "/v1/completions", b'{"prompt":"a"}', {"authorization": "Bearer k"}
            )
            assert answer.status_code == 200 and answer.content_type == "text/event-stream"
            assert await answer.read() == b"".join(events)
            await answer.close(finished=True)
            # A second request on the pooled connection works too.
            again = await upstream.post(url + "/v1/completions", b"{}", {})
            assert await again.read() == b"".join(events)
            await again.close(finished=True)
        finally:
            await upstream.aclose()
            server.close()
        assert seen[0].endswith(b'\r\n\r\n{"prompt":"a"}')
        assert b"authorization: bearer k" in seen[0].lower()
        assert b"accept-encoding" not in seen[0].lower()  # nothing compressed comes back to relay

    asyncio.run(main())


def test_an_engine_that_breaks_mid_body_raises_upstream_error():
    async def main() -> None:
        server, url, _ = await _serve(_chunk(b"data: {}\n\n"), close_after=True)  # no terminating chunk
        upstream = Upstream(connect_timeout=5.0)
        try:
            answer = await upstream.post(url + "/v1/completions", b"{}", {})
            assert await answer.chunk() == b"data: {}\n\n"
            with pytest.raises(UpstreamError):
                while await answer.chunk():
                    pass
            await answer.close()
        finally:
            await upstream.aclose()
            server.close()

    asyncio.run(main())


def test_an_engine_that_is_not_listening_is_unreachable_not_busy():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there

    async def main() -> None:
        upstream = Upstream(connect_timeout=5.0)
        try:
            with pytest.raises(UpstreamUnreachable) as caught:
                await upstream.post(f"http://127.0.0.1:{port}/v1/completions", b"{}", {})
            assert not isinstance(caught.value, UpstreamBusy)
        finally:
            await upstream.aclose()

    asyncio.run(main())
