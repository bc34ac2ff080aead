"""A group's orderly stop, told apart from a crash, through the group's rendezvous store.

Keys (all under the TCPStore hosted by global rank 0):
- DRAIN_KEY: any node asks the front end to drain the whole group (value "drain", or "force" to abort
  in-flight requests now). A SIGTERM on node 3 drains the group instead of breaking it.
- SHUTDOWN_KEY: the front end is stopping the group on purpose. Watchdogs that see it stop treating silent
  peers or a vanished store as a failure, so ranks exit 0 instead of 17.
- LEFT_KEY: a counter every rank but the front end bumps once its serving loop ended; the front end (which
  hosts the store) waits for all of them before it exits, so nobody loses the store mid-shutdown.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

DRAIN_KEY = "moefleet/drain"
SHUTDOWN_KEY = "moefleet/shutdown"
LEFT_KEY = "moefleet/left"
FORCE = "force"


def request_drain(store: Any, force: bool = False) -> None:
    """Ask the front end to drain the group (best effort: a store that is gone means the group is gone)."""
    try:
        store.set(DRAIN_KEY, FORCE if force else "drain")
    except Exception as exc:
        logger.warning("could not ask the front end to drain the group: %s", exc)


def drain_requested(store: Any) -> str | None:
    """The pending drain request: "drain", "force" or None."""
    if not store.check([DRAIN_KEY]):
        return None
    return str(store.get(DRAIN_KEY).decode())


def announce_shutdown(store: Any) -> None:
    """Front end: the group is stopping on purpose (set before the Shutdown message goes out)."""
    try:
        store.set(SHUTDOWN_KEY, "1")
    except Exception as exc:
        logger.warning("could not announce the group shutdown: %s", exc)


def mark_left(store: Any, key: str = LEFT_KEY) -> None:
    """A rank other than the front end: my serving loop ended normally (`key`: which counter to bump)."""
    try:
        store.add(key, 1)
    except Exception as exc:  # the front end already left: nothing to tell
        logger.debug("could not report leaving the group: %s", exc)


def wait_for_peers_to_leave(
    store: Any, peers: int, timeout_s: float, interval_s: float = 0.05, key: str = LEFT_KEY
) -> bool:
    """Front end: wait until `peers` ranks called `mark_left` (bounded); whether they all did."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if store.add(key, 0) >= peers:
                return True
        except Exception:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
