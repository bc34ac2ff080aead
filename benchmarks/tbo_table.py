"""One table of two-batch overlap on vs off from the `moefleet bench --json` files benchmarks/gpu_tbo.sh writes.

    python3 benchmarks/tbo_table.py OUTDIR

Files are named `{backend}_{mode}_{tokens}_{tbo}.json` (tbo = on / off), or `emu{N}_{backend}_...` for a point
run with `--emulate-ep N` (its own rows, backend shown as `{backend}@EP{N}`); a point with a missing or broken
file shows the tail of its log (`.log` next to it) instead of numbers. Ratio = tok/s/GPU with TBO on / off (> 1:
TBO wins). The `auto` rule (engine/tbo.py AUTO_MIN_TOKENS): per mode and backend, the smallest tokens/GPU from
which every larger measured point has ratio >= 1, printed under the table.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

NAME = re.compile(
    r"^(?P<prefix>emu(?P<ep>\d+)_)?(?P<backend>[a-z0-9]+)_(?P<mode>decode|prefill)_(?P<tokens>\d+)_(?P<tbo>on|off)"
    r"\.json$"
)


def point_key(match: re.Match[str]) -> tuple[str, str, str, int]:
    """(file-name prefix, backend label, mode, tokens/GPU): an emulated point is its own row, `symm@EP72`."""
    label = match["backend"] + (f"@EP{match['ep']}" if match["ep"] else "")
    return (match["prefix"] or "", label, match["mode"], int(match["tokens"]))


def load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data[0]["summary"] if isinstance(data, list) else data["runs"][0]["summary"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def stem_of(prefix: str, backend: str, mode: str, tokens: int) -> str:
    """The file stem of a point without its `_on` / `_off` (a row's backend "symm@EP72" is file backend symm)."""
    return f"{prefix}{backend.split('@')[0]}_{mode}_{tokens}"


def hidden_comm(path: Path) -> str:
    """Rank 0's --tbo-timeline: comm ms hidden under the other micro-batch's compute / comm ms (one eager step)."""
    try:
        data = json.loads(path.read_text())
        run = data[0] if isinstance(data, list) else data["runs"][0]
        t = run["ranks"][0]["tbo_timeline"]
        return f"{t['hidden_ms']:.2f}/{t['comm_ms']:.2f} ({t['hidden_share']:.0%})"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "-"


def failure(out: Path, stem: str) -> str:
    log = out / f"{stem}.log"
    if not log.exists():
        return "not run"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"Error|error|timed out|Killed|skipped", line)]
    return (errors or lines or ["empty log"])[-1][:120]


def auto_threshold(points: list[tuple[int, float | None]]) -> int | None:
    """Smallest tokens/GPU from which every larger measured point has ratio >= 1 (None: none such)."""
    best = None
    for tokens, ratio in sorted(points, reverse=True):
        if ratio is None or ratio < 1.0:
            break
        best = tokens
    return best


def main(out: Path) -> int:
    points: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for path in sorted(out.glob("*.json")):
        match = NAME.match(path.name)
        if match:
            points.setdefault(point_key(match), {})[match["tbo"]] = path
    for log in sorted(out.glob("*.log")):  # runs that died before writing JSON
        match = NAME.match(log.name.replace(".log", ".json"))
        if match:
            points.setdefault(point_key(match), {})
    print(
        "| backend | mode | tokens/GPU | off ms | on ms | off tok/s/GPU | on tok/s/GPU | on/off | graphs off | graphs on "
        "| comm hidden ms (on, eager step) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: dict[tuple[str, str], list[tuple[int, float | None]]] = {}
    # emulated (deployment-shaped) points first (decode, then prefill), then symm, then the other backends
    for prefix, backend, mode, tokens in sorted(
        points, key=lambda k: (not k[0], not k[1].startswith("symm"), k[2] if k[0] else "", k[1], k[2], k[3])
    ):
        row = {}
        for tbo in ("off", "on"):
            stem = f"{stem_of(prefix, backend, mode, tokens)}_{tbo}"
            row[tbo] = load(out / f"{stem}.json")
            row[tbo + "_why"] = failure(out, stem) if row[tbo] is None else ""
        off, on = row["off"], row["on"]
        ratio = on["tokens_per_s_per_gpu"] / off["tokens_per_s_per_gpu"] if off and on else None
        ratios.setdefault((backend, mode), []).append((tokens, ratio))

        def cell(r: dict[str, Any] | None, key: str, fmt: str, why: str) -> str:
            return format(r[key], fmt) if r else f"FAILED: {why}"

        print(
            f"| {backend} | {mode} | {tokens:,} | {cell(off, 'step_ms', '.2f', row['off_why'])} | "
            f"{cell(on, 'step_ms', '.2f', row['on_why'])} | {cell(off, 'tokens_per_s_per_gpu', ',.0f', '-')} | "
            f"{cell(on, 'tokens_per_s_per_gpu', ',.0f', '-')} | {'-' if ratio is None else f'{ratio:.3f}'} | "
            f"{(off or {}).get('cuda_graphs', '-')} | {(on or {}).get('cuda_graphs', '-')} | "
            f"{hidden_comm(out / f'{stem_of(prefix, backend, mode, tokens)}_on.json')} |"
        )
    print()
    for (backend, mode), measured in sorted(ratios.items()):
        threshold = auto_threshold(measured)
        print(
            f"auto threshold ({backend}, {mode}): "
            + ("None (on never wins from any point up)" if threshold is None else f"{threshold} tokens/GPU")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tbo_out")))
