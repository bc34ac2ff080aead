"""benchmarks/tbo_table.py (the table benchmarks/gpu_tbo.sh prints): on/off ratios, failed runs, and the
`auto` threshold rule, on hand-made bench JSON files with hand-computed expectations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tbo_table.py"


def _module():
    spec = importlib.util.spec_from_file_location("tbo_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(out: Path, stem: str, step_ms: float, tokens: int) -> None:
    summary = {"step_ms": step_ms, "tokens_per_s_per_gpu": tokens / step_ms * 1e3, "cuda_graphs": "on: x"}
    (out / f"{stem}.json").write_text(json.dumps([{"summary": summary}]))


def test_auto_threshold_is_the_smallest_point_from_which_on_always_wins():
    table = _module()
    assert table.auto_threshold([(32, 0.8), (64, 1.01), (128, 1.1), (256, 1.3)]) == 64
    assert table.auto_threshold([(32, 1.2), (64, 0.9), (128, 1.1)]) == 128  # a loss at 64 blocks 32
    assert table.auto_threshold([(256, 0.99)]) is None
    assert table.auto_threshold([(128, 1.2), (256, None)]) is None  # the largest point failed: unknown


def test_table_rows_ratios_and_failures(tmp_path, capsys):
    table = _module()
    _write(tmp_path, "symm_decode_32_off", 10.0, 32)
    _write(tmp_path, "symm_decode_32_on", 12.5, 32)  # 0.8x
    _write(tmp_path, "symm_decode_256_off", 10.0, 256)
    _write(tmp_path, "symm_decode_256_on", 8.0, 256)  # 1.25x
    _write(tmp_path, "symm_prefill_16384_off", 100.0, 16384)
    (tmp_path / "symm_prefill_16384_on.log").write_text(
        "loading\nRuntimeError: symm dispatcher: out of heap\nrc=1\n"
    )
    assert table.main(tmp_path) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[3].strip(): line for line in out.splitlines() if line.startswith("| symm")}
    assert "| 0.800 |" in rows["32"] and "| 1.250 |" in rows["256"]
    assert "FAILED: RuntimeError: symm dispatcher: out of heap" in rows["16,384"]
    assert "auto threshold (symm, decode): 256 tokens/GPU" in out
    assert "auto threshold (symm, prefill): None" in out


def test_emulated_points_are_their_own_rows_first(tmp_path, capsys):
    table = _module()
    _write(tmp_path, "symm_decode_256_off", 10.0, 256)
    _write(tmp_path, "symm_decode_256_on", 8.0, 256)  # 1.25x
    _write(tmp_path, "emu72_symm_decode_256_off", 10.0, 256)
    _write(tmp_path, "emu72_symm_decode_256_on", 12.5, 256)  # 0.8x
    _write(tmp_path, "emu32_symm_prefill_16384_off", 100.0, 16384)
    (tmp_path / "emu32_symm_prefill_16384_on.log").write_text("rc=124\ntimed out after 100s\n")
    assert table.main(tmp_path) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| symm")]
    labels = [tuple(cell.strip() for cell in line.split("|")[1:4]) for line in lines]
    assert labels == [
        ("symm@EP72", "decode", "256"),
        ("symm@EP32", "prefill", "16,384"),
        ("symm", "decode", "256"),
    ]
    assert "| 0.800 |" in lines[0] and "| 1.250 |" in lines[2]
    assert "FAILED: timed out after 100s" in lines[1]
    assert "auto threshold (symm@EP72, decode): None" in out and "auto threshold (symm, decode): 256" in out


def test_the_on_runs_timeline_shows_how_much_comm_was_hidden(tmp_path, capsys):
    table = _module()
    _write(tmp_path, "nvlink_prefill_16384_off", 100.0, 16384)
    summary = {"step_ms": 80.0, "tokens_per_s_per_gpu": 16384 / 80.0 * 1e3, "cuda_graphs": "off: prefill"}
    timeline = {"hidden_ms": 3.0, "comm_ms": 4.0, "hidden_share": 0.75}
    run = {"summary": summary, "ranks": [{"tbo_timeline": timeline}, {"tbo_timeline": {}}]}
    (tmp_path / "nvlink_prefill_16384_on.json").write_text(json.dumps([run]))
    table.main(tmp_path)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| nvlink"))
    assert row.endswith("| 3.00/4.00 (75%) |") and "| 1.250 |" in row
