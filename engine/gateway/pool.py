"""The gateway's backends and their state, kept fresh by one polling task (the only I/O of routing).

Every `poll_interval` seconds each backend's health path and /metrics are read (never per request). A backend
leaves the pool after `unhealthy_after` failed polls in a row, or at once when a request to it fails to
connect, and comes back after one good poll. Where a role Service name resolves (inside the cluster), only
groups whose rank-0 address it lists are eligible: the operator lists a group there only while the whole group
is Ready, so the gateway never routes to a group that is forming or restarting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from moefleet.engine.gateway.routing import BackendView, RankView
from prometheus_client.parser import text_string_to_metric_families

from moefleet.gateway_schema import GatewayConfig

log = logging.getLogger("moefleet.gateway")

# Engine metrics the load comes from; samples are summed over label sets (per-rank series of a DP group).
RUNNING = "moefleet_num_requests_running"
WAITING = "moefleet_num_requests_waiting"
KV_USAGE = "moefleet_kv_cache_usage_ratio"
WAITING_FOR_KV = "moefleet_num_requests_waiting_for_kv"
SENDING_KV = "moefleet_num_requests_sending_kv"


@dataclass
class Backend:
    name: str
    role: str
    url: str
    healthy: bool = False
    listed: bool = True  # by the role Service (True where the Service does not resolve)
    draining: bool = False  # the operator is about to remove the group: no new requests
    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    failures: int = 0  # failed polls in a row
    last_error: str = ""
    last_poll: float = field(default=0.0)
    # Since when it is unhealthy, and whether only because its polls timed out (busy or frozen: streams in
    # flight there are given time) rather than a refused connection or an error answer (down: cut at once).
    unhealthy_since: float = 0.0
    timed_out_only: bool = False
    ranks: list[RankView] = field(default_factory=list)  # per DP rank, as last polled (PD decode routing)
    rank_opened: dict[int, int] = field(default_factory=dict)  # placed on a rank since that poll

    def rank_views(self, dp_size: int) -> list[RankView]:
        """The group's `dp_size` ranks with what this gateway placed on each since the last poll."""
        polled = self.ranks if len(self.ranks) == dp_size else [RankView() for _ in range(dp_size)]
        return [
            RankView(r.kv_usage, r.running, r.waiting, self.rank_opened.get(i, 0))
            for i, r in enumerate(polled)
        ]

    def view(self) -> BackendView:
        return BackendView(
            name=self.name,
            role=self.role,
            eligible=self.healthy and self.listed and not self.draining,
            in_flight=self.in_flight,
            running=self.running,
            waiting=self.waiting,
            kv_usage=self.kv_usage,
        )

    @property
    def state(self) -> str:
        if not self.healthy:
            return "unhealthy"
        if self.draining:
            return "draining"
        return "ready" if self.listed else "not_listed"


RANK_SERIES = {
    "moefleet_dp_rank_kv_cache_usage_ratio": "kv_usage",
    "moefleet_dp_rank_num_requests_running": "running",
    "moefleet_dp_rank_num_requests_waiting": "waiting",
    "moefleet_dp_rank_num_requests_waiting_for_kv": "waiting",
    "moefleet_dp_rank_num_requests_sending_kv": "waiting",
}


def parse_rank_loads(metrics_text: str) -> list[RankView]:
    """Per DP rank (`dp_rank` label, rank order) KV usage and requests from an engine's /metrics text."""
    found: dict[int, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            field_name = RANK_SERIES.get(sample.name)
            rank = sample.labels.get("dp_rank", "")
            if field_name is None or not rank.isdigit():
                continue
            values = found.setdefault(int(rank), {"kv_usage": 0.0, "running": 0.0, "waiting": 0.0})
            values[field_name] += sample.value
    if sorted(found) != list(range(len(found))):
        return []
    return [
        RankView(found[r]["kv_usage"], int(found[r]["running"]), int(found[r]["waiting"]))
        for r in sorted(found)
    ]


def parse_load(metrics_text: str) -> tuple[int, int, float]:
    """(running, waiting, kv usage) from an engine's /metrics text; a DP group's per-rank series are summed
    (requests) or averaged (KV usage)."""
    running = waiting = 0.0
    kv_values: list[float] = []
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == RUNNING:
                running += sample.value
            elif sample.name in (WAITING, WAITING_FOR_KV, SENDING_KV):  # PD roles: parked requests are load
                waiting += sample.value
            elif sample.name == KV_USAGE:
                kv_values.append(sample.value)
    kv = sum(kv_values) / len(kv_values) if kv_values else 0.0
    return int(running), int(waiting), kv


class BackendPool:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        poll_interval: float = 1.0,
        unhealthy_after: int = 2,
        timeout: float = 2.0,
    ):
        self.poll_interval = poll_interval
        self.unhealthy_after = unhealthy_after
        self.timeout = timeout
        self.backends: dict[str, Backend] = {}
        self.config = config
        self.configure(config)
        self._task: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self._polled = asyncio.Event()

    def configure(self, config: GatewayConfig) -> None:
        """Apply a (re)loaded config: keep the state of backends that stay, add new ones, drop removed ones."""
        wanted: dict[str, tuple[str, str]] = {}
        draining: set[str] = set()
        for role, endpoints in config.roles.items():
            for group in endpoints.groups:
                wanted[group.name] = (role, group.url)
                if group.draining:
                    draining.add(group.name)
        for name in list(self.backends):
            backend = self.backends[name]
            if wanted.get(name) != (backend.role, backend.url):
                del self.backends[name]
        for name, (role, url) in wanted.items():
            self.backends.setdefault(name, Backend(name=name, role=role, url=url))
            self.backends[name].draining = name in draining
        self.config = config

    def views(self) -> list[BackendView]:
        return [b.view() for b in self.backends.values()]

    def ready_roles(self) -> dict[str, int]:
        """Eligible backends per serving role."""
        counts = {role: 0 for role in self.config.serving_roles}
        for backend in self.backends.values():
            if backend.role in counts and backend.view().eligible:
                counts[backend.role] += 1
        return counts

    def mark_failed(self, name: str, error: str) -> None:
        """A request could not reach the backend: out of the pool until a poll finds it healthy again."""
        backend = self.backends.get(name)
        if backend is not None:
            if backend.healthy:
                backend.unhealthy_since = time.monotonic()
            backend.healthy, backend.timed_out_only = False, False
            backend.last_error = error
            log.warning("backend %s (%s) failed: %s", name, backend.url, error)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout)
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()

    async def wait_polled(self) -> None:
        """Until the next poll round has finished (tests, reloads)."""
        self._polled.clear()
        await self._polled.wait()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_once()
            except Exception:  # never let one bad round stop polling
                log.exception("polling backends failed")

    async def poll_once(self) -> None:
        backends = list(self.backends.values())
        listed = await self._listed_addresses(self.config)
        await asyncio.gather(*(self._poll(b, listed.get(b.role)) for b in backends))
        self._polled.set()

    async def _poll(self, backend: Backend, listed: set[str] | None) -> None:
        assert self._client is not None
        try:
            health = await self._client.get(backend.url + self.config.health_path)
            if health.status_code != 200:
                raise RuntimeError(f"{self.config.health_path} answered {health.status_code}")
            metrics = await self._client.get(backend.url + "/metrics")
            if metrics.status_code == 200:
                backend.running, backend.waiting, backend.kv_usage = parse_load(metrics.text)
                backend.ranks, backend.rank_opened = parse_rank_loads(metrics.text), {}
        except Exception as exc:  # connection refused, timeout, bad status: all mean "not usable now"
            backend.failures += 1
            backend.last_error = f"{type(exc).__name__}: {exc}"
            # A slow accept or answer (ConnectTimeout included) is a busy or frozen engine; refused is down.
            timed_out = isinstance(exc, httpx.TimeoutException)
            if backend.failures >= self.unhealthy_after or not backend.healthy:
                if backend.healthy:
                    log.warning(
                        "backend %s (%s) is unhealthy: %s", backend.name, backend.url, backend.last_error
                    )
                    backend.unhealthy_since, backend.timed_out_only = time.monotonic(), timed_out
                elif not timed_out:
                    backend.timed_out_only = False
                backend.healthy = False
        else:
            if not backend.healthy:
                log.info("backend %s (%s) is healthy", backend.name, backend.url)
            backend.healthy, backend.failures, backend.last_error = True, 0, ""
        backend.last_poll = time.monotonic()
        if listed is not None:
            backend.listed = bool(await _host_addresses(backend.url) & listed)

    async def _listed_addresses(self, config: GatewayConfig) -> dict[str, set[str]]:
        """Per role, the addresses its Service lists (Ready rank-0 pods); roles whose Service does not resolve
        (no Service configured, or outside the cluster) are absent: health checks alone decide there."""
        result: dict[str, set[str]] = {}
        loop = asyncio.get_running_loop()
        for role, endpoints in config.roles.items():
            if not endpoints.service:
                continue
            try:
                infos = await loop.getaddrinfo(endpoints.service, endpoints.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                    # The Service exists but lists no Ready pod yet (headless: no records), or we are not in
                    # the cluster. Only the former matters: inside a cluster the search path resolves it.
                    if _in_cluster():
                        result[role] = set()
                continue
            result[role] = {str(info[4][0]) for info in infos}
        return result


async def _host_addresses(url: str) -> set[str]:
    host = urlsplit(url).hostname or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {str(info[4][0]) for info in infos}


def _in_cluster() -> bool:
    return "KUBERNETES_SERVICE_HOST" in os.environ


def should_cut_silent_stream(backend: Backend, now: float, patience_s: float) -> bool:
    """Whether a stream that is waiting for its next chunk from `backend` should be ended with an error (pure):
    at once when the backend is down (refused connections, error answers, a failed request); after
    `patience_s` of failed polls when they only timed out (an overloaded engine answers slowly, but its
    streams still finish; a frozen one is cut then)."""
    if backend.healthy:
        return False
    return not backend.timed_out_only or now - backend.unhealthy_since >= patience_s


def role_counts(backends: Iterable[Backend]) -> dict[tuple[str, str], int]:
    """(role, state) -> number of backends, for the moefleet_gateway_backends gauge."""
    counts: dict[tuple[str, str], int] = {}
    for backend in backends:
        key = (backend.role, backend.state)
        counts[key] = counts.get(key, 0) + 1
    return counts
