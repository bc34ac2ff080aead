"""Block configurations of the fused MoE GEMMs: a tuned table per weight shape, a default otherwise.

`fused_moe_configs.json` (checked in, written by `benchmarks/tune_fused_moe.py` on a GPU) maps
"E=<local experts>,I=<intermediate>,D=<hidden>,dtype=<bf16|fp8>,device=<name>" to a list of
[max_rows, config] pairs sorted by max_rows: the first entry whose max_rows >= the rows of a call is used
(rows = tokens x top-k hits, or dispatched rows). Unknown shapes get `default_config`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("fused_moe_configs.json")


@dataclass(frozen=True)
class MoEConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def shape_key(num_experts: int, inter: int, hidden: int, fp8: bool, device: str) -> str:
    return f"E={num_experts},I={inter},D={hidden},dtype={'fp8' if fp8 else 'bf16'},device={device}"


def default_config(rows: int, num_experts: int, fp8: bool) -> MoEConfig:
    """A sane config without tuning (close to what the tuner picked on H200): small row blocks when experts
    see few rows (decode), larger after. Sized to fit shared memory with the two weight tiles of gate/up."""
    per_expert = rows / max(num_experts, 1)
    block_k = 128 if fp8 else 64
    if per_expert <= 16:
        return MoEConfig(block_m=16, block_n=64, block_k=block_k, group_m=1, num_warps=4, num_stages=4)
    if per_expert <= 128:
        return MoEConfig(block_m=32, block_n=64, block_k=block_k, group_m=8, num_warps=4, num_stages=3)
    return MoEConfig(block_m=64, block_n=64, block_k=block_k, group_m=8, num_warps=4, num_stages=3)


@lru_cache(maxsize=1)
def _table() -> dict[str, list[tuple[int, MoEConfig]]]:
    if not TABLE_PATH.is_file():
        return {}
    raw = json.loads(TABLE_PATH.read_text())
    return {
        key: sorted(((int(m), MoEConfig(**cfg)) for m, cfg in entries), key=lambda e: e[0])
        for key, entries in raw.items()
    }


def _device_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name().replace(" ", "_")


def pick_config(num_experts: int, inter: int, hidden: int, rows: int, fp8: bool) -> MoEConfig:
    entries = _table().get(shape_key(num_experts, inter, hidden, fp8, _device_name()))
    if entries:
        for max_rows, config in entries:
            if rows <= max_rows:
                return config
        return entries[-1][1]
    return default_config(rows, num_experts, fp8)
