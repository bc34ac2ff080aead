"""`support.oracles`: with CI / MOEFLEET_REQUIRE_ORACLES set, a missing transformers fails the run instead of
skipping the parity tests. Checked on a throw-away test directory in a subprocess, with transformers hidden by
a package of the same name that fails to import (as an uninstalled one would)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parents[1]

PARITY_TEST = """
import pytest

transformers = pytest.importorskip("transformers")


def test_parity():
    assert transformers is not None
"""

OTHER_SKIP = """
import pytest

pytest.importorskip("a_gpu_library_that_is_not_here")


def test_gpu():
    pass
"""


def run_pytest(
    tmp_path: Path, env_extra: dict[str, str], hide_transformers: bool
) -> subprocess.CompletedProcess:
    (tmp_path / "test_parity.py").write_text(PARITY_TEST)
    (tmp_path / "test_gpu.py").write_text(OTHER_SKIP)
    path = [str(TESTS)]
    if hide_transformers:
        hidden = tmp_path / "hide"
        (hidden / "transformers").mkdir(parents=True)
        (hidden / "transformers" / "__init__.py").write_text(
            "raise ModuleNotFoundError(\"No module named 'transformers'\", name='transformers')\n"
        )
        path.insert(0, str(hidden))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "MOEFLEET_REQUIRE_ORACLES")}
    env |= {"PYTHONPATH": os.pathsep.join(path), **env_extra}
    command = [sys.executable, "-m", "pytest", "-p", "support.oracles", "-q", "-rs", "-p", "no:cacheprovider"]
    command += ["--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("variable", ["CI", "MOEFLEET_REQUIRE_ORACLES"])
def test_missing_oracle_fails_when_required(tmp_path, variable):
    result = run_pytest(tmp_path, {variable: "1"}, hide_transformers=True)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "the test oracle transformers cannot be imported" in output


def test_missing_oracle_skips_for_a_developer(tmp_path):
    result = run_pytest(tmp_path, {}, hide_transformers=True)
    output = result.stdout + result.stderr
    assert result.returncode == 5, output  # pytest's "no tests ran": both modules skipped, nothing failed
    assert "2 skipped" in output


def test_present_oracle_runs_and_other_optional_imports_still_skip(tmp_path):
    result = run_pytest(tmp_path, {"CI": "true"}, hide_transformers=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1 passed, 1 skipped" in output


def test_oracle_skip_is_a_failure_when_required(tmp_path):
    """Even past the start check (e.g. the import breaks only inside a test module), the skip is a failure."""
    from support import oracles

    class Report:
        skipped, outcome = True, "skipped"
        longrepr = ("x.py", 3, "Skipped: could not import 'transformers': No module named 'transformers'")

    report = Report()
    os.environ["MOEFLEET_REQUIRE_ORACLES"] = "1"
    try:
        oracles._fail_oracle_skip(report)
    finally:
        del os.environ["MOEFLEET_REQUIRE_ORACLES"]
    assert report.outcome == "failed"
