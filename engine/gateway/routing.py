"""Routing decisions of the gateway, as pure functions over a snapshot of the backends (no I/O, no clock).

A backend is one engine group (its rank-0 HTTP front end). Its load combines what the gateway knows at once
(requests it has in flight there) with what the engine last reported (running and waiting requests, KV-cache
usage, polled from its /metrics), so a burst of requests between two polls still spreads out.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

# Prefix-cache routing keeps a prompt prefix on the same group unless that group is this much busier (in
# requests) than the least-loaded one; then load wins over cache affinity.
PREFIX_LOAD_SLACK = 4
PREFIX_KEY_CHARS = 256


@dataclass(frozen=True)
class BackendView:
    """What routing needs to know of one backend at one moment."""

    name: str
    role: str
    eligible: bool  # healthy, and listed as Ready where a role Service says so
    in_flight: int = 0  # requests this gateway has open there now
    running: int = 0  # from the engine's last report
    waiting: int = 0
    kv_usage: float = 0.0  # 0..1

    @property
    def load(self) -> float:
        # Requests this gateway opened since the last poll are not in `running` yet: take the larger of the two.
        return max(self.in_flight, self.running) + self.waiting + self.kv_usage


class NoBackendError(Exception):
    """No eligible backend of the role: the request is answered 503 with this message."""


def pick_backend(
    backends: Sequence[BackendView],
    role: str,
    policy: str,
    *,
    exclude: frozenset[str] = frozenset(),
    turn: int = 0,
    prefix_key: str = "",
    rng: random.Random | None = None,
) -> BackendView:
    """The backend of `role` a new request goes to.

    `exclude` names backends that already failed this request (retries go elsewhere); `turn` is a counter the
    caller increments per request (round-robin); `prefix_key` is the start of the prompt (prefix-cache policy).
    """
    candidates = [b for b in backends if b.role == role and b.eligible and b.name not in exclude]
    if not candidates:
        known = [b.name for b in backends if b.role == role]
        if not known:
            raise NoBackendError(f"no {role} group is configured in the gateway")
        raise NoBackendError(
            f"no healthy {role} group to send the request to (known: {', '.join(sorted(known))}); "
            "retry in a few seconds"
        )
    if policy == "round-robin":
        ordered = sorted(candidates, key=lambda b: b.name)
        return ordered[turn % len(ordered)]
    if policy == "random":
        return (rng or random).choice(candidates)
    least = min(candidates, key=lambda b: (b.load, b.name))
    if policy == "prefix-cache" and prefix_key:
        preferred = max(candidates, key=lambda b: _rendezvous(prefix_key, b.name))
        if preferred.load <= least.load + PREFIX_LOAD_SLACK:
            return preferred
    return least


# KV fraction one request is assumed to take when no rank reports any running request yet.
DEFAULT_REQUEST_KV_FRACTION = 1 / 64


@dataclass(frozen=True)
class RankView:
    """One DP rank of a group, as its group's /metrics last reported it (per-rank `dp_rank` series)."""

    kv_usage: float = 0.0  # 0..1
    running: int = 0
    waiting: int = 0
    opened: int = 0  # requests this gateway placed on the rank since that report


def pick_dp_rank(ranks: Sequence[RankView]) -> int:
    """The DP rank of a decode group a disaggregated request goes to: the most KV-cache headroom, counting the
    requests placed there since the last report at the KV fraction a running request takes (estimated from
    the reports), then the fewest requests, then the lowest rank. Pure."""
    if not ranks:
        return 0
    per_request = [r.kv_usage / r.running for r in ranks if r.running > 0]
    fraction = sum(per_request) / len(per_request) if per_request else DEFAULT_REQUEST_KV_FRACTION

    def key(index: int) -> tuple[float, int, int]:
        r = ranks[index]
        return (r.kv_usage + fraction * r.opened, r.running + r.waiting + r.opened, index)

    return min(range(len(ranks)), key=key)


def prefix_key_of(body: dict) -> str:
    """The prompt's leading characters (completions `prompt` or chat `messages`), the prefix-cache policy's key."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    if prompt is None and isinstance(body.get("messages"), list):
        prompt = "".join(
            str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict)
        )  # role markers do not matter for affinity
    return str(prompt or "")[:PREFIX_KEY_CHARS]


def _rendezvous(key: str, name: str) -> int:
    """Highest-random-weight hashing: each key prefers one backend; removing a backend moves only its keys."""
    digest = hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class PDAttempt:
    """One try of a disaggregated request: the decode group, and the prefill group (None: no prefill group is
    left to try, so the decode group serves the request whole)."""

    decode: str
    prefill: str | None


def next_pd_attempt(
    backends: Sequence[BackendView],
    policy: str,
    *,
    failed_decode: frozenset[str] = frozenset(),
    failed_prefill: frozenset[str] = frozenset(),
    turn: int = 0,
    prefix_key: str = "",
    rng: random.Random | None = None,
) -> PDAttempt:
    """The next (decode, prefill) pair to try for a disaggregated request, never one that already failed it.

    A decode group that refused the request (full, draining) or could not be reached is in `failed_decode`; a
    prefill group that failed (unreachable, 5xx, transfer error) is in `failed_prefill`. Each failure excludes
    only the side that failed, so every attempt grows one of the two sets and the number of attempts is bounded
    by the number of groups. Raises NoBackendError when no decode group is left (the request fails, 503)."""
    decode = pick_backend(
        backends, "decode", policy, exclude=failed_decode, turn=turn, prefix_key=prefix_key, rng=rng
    )
    try:
        prefill: str | None = pick_backend(
            backends, "prefill", policy, exclude=failed_prefill, turn=turn, prefix_key=prefix_key, rng=rng
        ).name
    except NoBackendError:
        prefill = None
    return PDAttempt(decode.name, prefill)


def pd_attempt_limit(backends: Sequence[BackendView]) -> int:
    """At most this many attempts per disaggregated request: each eligible group of either role once, plus
    one (a last decode group serving whole after every prefill group failed)."""
    return 1 + sum(1 for b in backends if b.eligible and b.role in ("decode", "prefill"))
