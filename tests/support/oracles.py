"""The oracle must not vanish: where an independent oracle (transformers) is required, a missing one fails.

Parity tests compare the engine with transformers; they `pytest.importorskip("transformers")` so a developer
without it can still run the rest. In CI (`CI` set to a true value, as CI services do) or under
`MOEFLEET_REQUIRE_ORACLES=1` (set by `make test`, hence `.ci/run`), a missing oracle is an error instead:
the run stops at start naming the package, and any skip because an oracle could not be imported is
reported as a failure. Other optional imports (GPU libraries, yaml) still skip.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

ORACLES = ("transformers",)
_FALSE = ("", "0", "false", "no", "off")


def oracles_required() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() not in _FALSE for name in ("CI", "MOEFLEET_REQUIRE_ORACLES")
    )


def missing_oracles() -> list[str]:
    missing = []
    for name in ORACLES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _is_oracle_skip(report: Any) -> bool:
    text = str(report.longrepr)
    return any(f"could not import '{name}'" in text for name in ORACLES)


def pytest_sessionstart(session: pytest.Session) -> None:
    if oracles_required() and (missing := missing_oracles()):
        raise pytest.UsageError(
            f"the test oracle {', '.join(missing)} cannot be imported, and CI / MOEFLEET_REQUIRE_ORACLES "
            "requires it (its parity tests would silently skip). Install it: pip install -e '.[test]'"
        )


def _fail_oracle_skip(report: Any) -> None:
    if report.skipped and oracles_required() and _is_oracle_skip(report):
        report.outcome = "failed"
        report.longrepr = f"oracle missing (CI / MOEFLEET_REQUIRE_ORACLES set): {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_oracle_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_oracle_skip(outcome.get_result())
