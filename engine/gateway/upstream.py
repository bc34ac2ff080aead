"""The gateway's HTTP client to the engines on the request path (aiohttp), behind three calls and two errors.

Why not httpx here (httpx stays for health polls, bootstrap and /v1/models): httpcore's connection pool walks
every pooled connection on each request (`_assign_requests_to_connections`, an expiry check with a socket
poll per idle connection), so its cost per request grows with the number of connections a burst opened, and
under load it was the largest single item of the gateway's CPU time (py-spy, docs/benchmarks.md). aiohttp's
connector takes an idle connection from a per-host queue and parses responses in C.

    upstream = Upstream(connect_timeout=10.0, read_timeout=None)
    answer = await upstream.post(url, raw, headers)   # after the status line and headers
    first = await answer.chunk()                       # b"" at the end of the body
    await answer.close(finished=True)                  # back to the pool; finished=False drops the connection
"""

from __future__ import annotations

import aiohttp


class UpstreamError(Exception):
    """The engine could not be reached, or its connection broke (a transport failure, not an HTTP status)."""


class UpstreamUnreachable(UpstreamError):
    """The engine could not be connected to: it received nothing of the request."""


class UpstreamBusy(UpstreamUnreachable):
    """Connecting to the engine timed out: it (or this process's own loop) is busy, not proof it is down."""


class Busy(str):
    """Why a backend did not take a request in time (connect timeout): retried elsewhere, not marked down."""


class Full(Busy):
    """A backend refused a valid request for want of room (503 `kv_cache_full`: a decode group's KV cache is
    full): retried elsewhere, not marked down."""


class UpstreamAnswer:
    """One engine answer being read: status, content type, body chunks as they arrive."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status_code = response.status
        self.content_type = response.headers.get("content-type")

    async def chunk(self) -> bytes:
        """The next bytes of the body as they arrived (b"" at its end); UpstreamError if the connection broke."""
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def close(self, finished: bool = False) -> None:
        """Release the connection: back to the pool when the body was read to its end, else closed (so the
        engine sees the request go away and frees what it held)."""
        if finished and self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class Upstream:
    def __init__(self, connect_timeout: float, read_timeout: float | None = None):
        # read_timeout: the longest wait for the next bytes (httpx's read timeout), never a bound on the whole
        # answer: generations may be long.
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        # Created on first use, inside the running loop (aiohttp binds a session to its loop).
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30.0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def post(self, url: str, raw: bytes, headers: dict[str, str]) -> UpstreamAnswer:
        """POST `raw` to `url`; returns once the status line and headers arrived."""
        session = self._open_session()
        try:
            response = await session.post(url, data=raw, headers=headers, allow_redirects=False)
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamBusy(f"{type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(f"{type(exc).__name__}: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        return UpstreamAnswer(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
