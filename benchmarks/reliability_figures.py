"""Run the fault-injection, load and fuzzing suite (tests/faults) and print its figures as a markdown table.

Every test there asserts its bound and also records what it measured (time to error, time to exit, requests
lost, KV blocks leaked, 5xx under fuzzing) through `faults.conftest.record`; this script collects them.

    .venv/bin/python benchmarks/reliability_figures.py [extra pytest args, e.g. -k drain]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(extra: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "MOEFLEET_RELIABILITY_FIGURES": str(figures)}
        command = [sys.executable, "-m", "pytest", "tests/faults", "-q", "-p", "no:cacheprovider", *extra]
        code = subprocess.run(command, cwd=REPO, env=env).returncode
        rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    print("\n| test | figures |\n|---|---|")
    for row in rows:
        name = row.pop("test")
        print(f"| {name} | " + ", ".join(f"{key} {value}" for key, value in row.items()) + " |")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
