"""Our HTTP servers start their own loop (to drain on SIGTERM); it must be the one uvicorn would pick."""

from __future__ import annotations

import asyncio

import pytest
import uvicorn
from moefleet.engine.server import event_loop


async def _probe() -> tuple[str, str]:
    return type(asyncio.get_running_loop()).__module__, event_loop.loop_name()


def test_auto_runs_on_uvloop_when_installed():
    pytest.importorskip("uvloop")  # a dependency of moefleet on Linux (pyproject.toml)
    module, name = event_loop.run(_probe(), uvicorn.Config(app=None, loop="auto"))
    assert module.startswith("uvloop") and name == "uvloop"


def test_asyncio_is_honoured():
    module, name = event_loop.run(_probe(), uvicorn.Config(app=None, loop="asyncio"))
    assert module.startswith("asyncio") and name == "asyncio"
