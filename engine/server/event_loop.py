"""The event loop our HTTP servers run on: the one uvicorn would pick for their config (uvloop when installed).

The gateway and `moefleet serve` drive `uvicorn.Server.serve()` from their own coroutine (to drain on SIGTERM:
engine/server/drain.py, engine/gateway/drain.py), so they start the loop themselves; a bare `asyncio.run`
would run them on the stdlib selector loop whatever is installed (about a third of the gateway's CPU per
request went to the stdlib loop's Python code, py-spy; docs/benchmarks.md). `run` uses uvicorn's own choice
(`loop="auto"`: uvloop if importable, else asyncio), so the server runs where `uvicorn.run` would run it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def loop_factory(config: Any) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvicorn's loop factory for `config` (None: asyncio's default loop)."""
    get = getattr(config, "get_loop_factory", None)  # uvicorn >= 0.36
    return get() if get is not None else None


def run(coro: Coroutine[Any, Any, Any], config: Any) -> Any:
    """Run `coro` to completion on a new event loop of the kind uvicorn picks for `config`."""
    with asyncio.Runner(loop_factory=loop_factory(config)) as runner:
        return runner.run(coro)


def loop_name() -> str:
    """The running loop's kind, for start-up lines: "uvloop" or "asyncio"."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]
