"""The decode-size split-K block-FP8 GEMM (Triton, interpreted on CPU) against the dequantised product, and its
measured-table routing (`fp8_splitk_configs`, `Fp8Linear`).

The kernel runs on small shapes with ragged rows, columns and K, a split that does not divide K's blocks, a
split larger than K's blocks, split 1 (no partials), and the swapped-operand form (C^T = W x^T); the reference is the same quantised activations
times the dequantised weight in float32. Speed: benchmarks/fp8_splitk_probe.py on a GPU only.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # CPU (CI): run the kernels in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from moefleet.engine.kernels import fp8_splitk, fp8_splitk_configs  # noqa: E402
from moefleet.engine.kernels.fp8_blocks import (  # noqa: E402
    dequantize_block,
    quantize_per_token_group_reference,
    quantize_weight_block,
)
from moefleet.engine.kernels.fp8_splitk_configs import SplitKConfig  # noqa: E402

if not fp8_splitk._INTERPRET:
    pytest.skip(
        "compiled Triton here: tests/gpu/test_fp8_splitk_gpu.py covers the kernel", allow_module_level=True
    )


def _weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[: min(n, 128), : min(k, 128)] *= 20  # one tile far larger than the rest: per-tile scales matter
    return quantize_weight_block(w, (128, 128))


def _reference(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """The same per-row, per-128-group quantised activations times the dequantised weight, in float32."""
    xq, xs = quantize_per_token_group_reference(x, 128)
    xd = xq.float() * xs.repeat_interleave(128, 1)[:, : x.shape[1]]
    return xd @ dequantize_block(wq, ws, (128, 128)).T


@pytest.mark.parametrize(
    "m,n,k,config",
    [
        (5, 192, 640, SplitKConfig(16, 64, 2)),  # 5 K blocks in 2 slices (3 + 2), ragged rows and columns
        (33, 130, 384, SplitKConfig(32, 64, 3)),  # one K block per slice, rows over two tiles, N ragged
        (7, 256, 300, SplitKConfig(16, 128, 8)),  # K ragged (3 blocks, the last 44 wide), split clamped to 3
        (20, 128, 512, SplitKConfig(16, 64, 1)),  # no split: the GEMM writes the output itself
        (5, 192, 640, SplitKConfig(16, 64, 2, swap_ab=True)),  # C^T = W x^T, ragged both ways
        (20, 128, 512, SplitKConfig(16, 64, 1, swap_ab=True)),  # swapped, no split
    ],
)
def test_splitk_matches_dequantised_product(m, n, k, config):
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)) * 2).to(torch.bfloat16)
    wq, ws = _weight(n, k, seed=n)
    out = fp8_splitk.linear(x, wq, ws, config)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    ref = _reference(x, wq, ws)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_splitk_float32_output_and_zero_rows():
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    wq, ws = _weight(64, 256, seed=2)
    out = fp8_splitk.linear(x, wq, ws, SplitKConfig(16, 64, 2), out_dtype=torch.float32)
    torch.testing.assert_close(out, _reference(x, wq, ws), rtol=1e-5, atol=1e-4)
    assert fp8_splitk.linear(x[:0], wq, ws, SplitKConfig(16, 64, 2)).shape == (0, 64)


def test_mismatched_scales_are_refused():
    x = torch.randn(4, 256).to(torch.bfloat16)
    wq, ws = _weight(64, 256, seed=3)
    with pytest.raises(ValueError, match="128 x 128 blocks"):
        fp8_splitk.linear(x, wq, ws[:, :1], SplitKConfig(16, 64, 2))


def test_split_arithmetic():
    assert fp8_splitk.k_blocks_per_split(7168, 6) == 10 and fp8_splitk.effective_split(7168, 6) == 6
    assert fp8_splitk.effective_split(640, 2) == 2 and fp8_splitk.k_blocks_per_split(640, 2) == 3
    assert fp8_splitk.effective_split(300, 8) == 3  # 3 blocks: at most 3 slices
    assert fp8_splitk.effective_split(1536, 5) == 4  # 12 blocks as 3 + 3 + 3 + 3: the fifth slice is empty


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        SplitKConfig(24, 64, 2)
    with pytest.raises(ValueError, match=">= 1"):
        SplitKConfig(16, 64, 0)


def _table(tmp_path, shapes: dict) -> dict:
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"card": "test", "shapes": shapes}))
    return fp8_splitk_configs._table(str(path))


def test_lookup_takes_the_smallest_measured_rows_at_or_above(tmp_path):
    fast = {"config": {"block_m": 16, "block_n": 128, "split": 6}, "us": 5.0, "cublas_us": 20.0}
    wide = {"config": {"block_m": 64, "block_n": 128, "split": 4}, "us": 9.0, "cublas_us": 21.0}
    slow = {"config": {"block_m": 64, "block_n": 128, "split": 2}, "us": 20.0, "cublas_us": 21.0}
    table = _table(tmp_path, {"32,1536,7168": fast, "256,1536,7168": wide, "128,7168,16384": slow})
    assert fp8_splitk_configs.choose(1, 1536, 7168, table) == SplitKConfig(16, 128, 6)
    assert fp8_splitk_configs.choose(32, 1536, 7168, table) == SplitKConfig(16, 128, 6)
    assert fp8_splitk_configs.choose(33, 1536, 7168, table) == SplitKConfig(64, 128, 4)
    assert fp8_splitk_configs.choose(257, 1536, 7168, table) is None  # above every measured row count
    assert fp8_splitk_configs.choose(64, 1536, 4096, table) is None  # a shape nobody measured
    assert fp8_splitk_configs.choose(128, 7168, 16384, table) is None  # measured, but not 10% faster


def test_heuristic_fills_the_gpu():
    config = fp8_splitk_configs.heuristic(256, 1536, 7168)
    tiles = 256 // config.block_m * (1536 // config.block_n)
    assert tiles * config.split >= 132 and config.split * 4 <= 7168 // 128
    assert fp8_splitk_configs.heuristic(16, 576, 7168).block_m == 16


def test_shipped_table_is_well_formed():
    """Every entry of the committed table builds a config, names its card and times both kernels."""
    data = json.loads(fp8_splitk_configs.TABLE.read_text())
    assert data["card"] and data["date"] and data["command"]
    for key, entry in data["shapes"].items():
        m, n, k = (int(v) for v in key.split(","))
        assert m > 0 and n > 0 and k % 128 == 0
        SplitKConfig(**entry["config"])
        assert entry["us"] > 0 and entry["cublas_us"] > 0
