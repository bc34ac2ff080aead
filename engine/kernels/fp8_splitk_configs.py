"""Which decode-size block-FP8 GEMMs run split-K (`fp8_splitk`), and with which tiles: a measured table.

`fp8_splitk_configs.json` holds, per measured (M, N, K), the fastest `SplitKConfig` of a sweep and the GPU
times of it and of cuBLAS's blockwise GEMM at the same shape, with the card and date
(`python3 benchmarks/fp8_splitk_probe.py --write`). A linear of M rows uses the entry of the smallest measured
M >= its rows for its (N, K) (a tile set that covers more rows covers fewer), and runs split-K only if that
entry beat cuBLAS by `MIN_GAIN`: shapes nobody measured keep cuBLAS, as do M above the largest measured M.
Pure lookups; the JSON is read once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

GROUP = 128  # DeepSeek's block: activations 1 x 128, weights 128 x 128
TABLE = Path(__file__).with_name("fp8_splitk_configs.json")
MIN_GAIN = 1.10  # split-K must be at least 10% faster than cuBLAS at the measured shape


@dataclass(frozen=True, slots=True)
class SplitKConfig:
    block_m: int
    block_n: int
    split: int  # K slices; each a whole number of 128-wide blocks
    num_warps: int = 4
    num_stages: int = 4
    swap_ab: bool = False  # compute C^T = W x^T (the weight's rows on the MMA's wide side: few tokens)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} ({value}) must be a power of two >= 16")
        if self.split < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"split, num_warps and num_stages must be >= 1: {self}")


@cache
def _table(path: str = str(TABLE)) -> dict[tuple[int, int], list[tuple[int, dict]]]:
    """{(N, K): [(M, entry), ...] sorted by M} from the JSON's "shapes"."""
    file = Path(path)
    if not file.exists():
        return {}
    shapes = json.loads(file.read_text()).get("shapes", {})
    table: dict[tuple[int, int], list[tuple[int, dict]]] = {}
    for key, entry in shapes.items():
        m, n, k = (int(v) for v in key.split(","))
        table.setdefault((n, k), []).append((m, entry))
    for rows in table.values():
        rows.sort(key=lambda item: item[0])
    return table


def lookup(m: int, n: int, k: int, table: dict | None = None) -> dict | None:
    """The measured entry that serves M rows of (N, K), or None."""
    rows = (_table() if table is None else table).get((n, k), [])
    for measured_m, entry in rows:
        if measured_m >= m:
            return entry
    return None


def choose(m: int, n: int, k: int, table: dict | None = None) -> SplitKConfig | None:
    """The split-K config for M rows of (N, K) if measured faster than cuBLAS by MIN_GAIN, else None."""
    entry = lookup(m, n, k, table)
    if entry is None or entry["us"] * MIN_GAIN > entry["cublas_us"]:
        return None
    return SplitKConfig(**entry["config"])


def heuristic(m: int, n: int, k: int, num_sms: int = 132) -> SplitKConfig:
    """A starting point for sweeps and tests: row tiles of up to 64, 128-wide column tiles, and enough K
    slices for ~2 programs per SM (each slice at least 4 K blocks)."""
    block_m = min(64, max(16, 1 << (max(m, 1) - 1).bit_length()))
    block_n = 128 if n >= 1024 else 64
    tiles = -(-m // block_m) * -(-n // block_n)
    k_blocks = -(-k // 128)
    split = max(1, min(k_blocks // 4 or 1, -(-2 * num_sms // tiles)))
    return SplitKConfig(block_m, block_n, split)
