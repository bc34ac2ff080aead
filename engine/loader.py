"""Build a model from an HF-format directory: config.json + single or sharded safetensors.

Tensors are read lazily shard by shard (`safe_open`), and tensors the model skips (other ranks' experts,
multi-token-prediction layers) are never read. Parameters are allocated directly on `device` in `dtype`
(the DeepSeek router gate stays float32, as in the reference).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from moefleet.engine.fp8_weights import (
    apply_plan,
    checkpoint_block,
    fp8_stream,
    plan_fp8,
    resolve_quantization,
)
from moefleet.engine.models import CausalLM, model_class
from safetensors import safe_open

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(model_dir: str | Path) -> dict:
    """config.json as a dict, with errors that say what to do."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{str(config_path)!r} is missing: is {str(path)!r} an HF-format model directory?"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object")
    return config


def architecture_of(config: dict) -> str:
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list):
        raise ValueError("config.json has no 'architectures' list (e.g. [\"Qwen3MoeForCausalLM\"])")
    return str(archs[0])


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """Shards listed in model.safetensors.index.json, else model.safetensors, else every *.safetensors."""
    path = Path(model_dir)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(path)!r}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"shards named in model.safetensors.index.json are missing: {missing}")
    return files


def iter_weights(files: list[Path], model: CausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor the model will use, one shard open at a time."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if not model.skip_weight(name):
                    yield name, f.get_tensor(name)


def dtype_from_name(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})")
    return SUPPORTED_DTYPES[dtype]


def build_model(
    config: dict, device: str | torch.device = "cpu", dtype: str | torch.dtype = torch.float32
) -> CausalLM:
    """An uninitialised model for `config` (allocated on `device`, in `dtype`)."""
    cls = model_class(architecture_of(config))
    model_config = cls.config_class.from_dict(config)  # type: ignore[attr-defined]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype_from_name(dtype))
    try:
        with torch.device(device):
            model = cls(model_config)  # type: ignore[call-arg]
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def checkpoint_names(files: list[Path]) -> list[str]:
    """Every tensor name in the shards (header reads only)."""
    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.extend(f.keys())
    return names


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    quantization: str = "auto",
) -> CausalLM:
    """Read config.json, build the model on `device`/`dtype` and load its (local) weights.

    `quantization` (fp8_weights.py): "auto" keeps a block-FP8 checkpoint in FP8, "none" dequantises it,
    "fp8" also quantises a bf16 checkpoint's linears and experts at load."""
    config = read_config(model_dir)
    model = build_model(config, device, dtype)
    files = safetensors_files(model_dir)
    weights = iter_weights(files, model)
    if resolve_quantization(config, quantization) == "fp8":
        plan = plan_fp8(model, checkpoint_names(files), config)
        apply_plan(model, plan)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the replaced bf16 tensors' blocks go back before the KV cache is sized
        model.fp8_block_size = None  # the FP8 stream below dequantises what is not kept
        weights = fp8_stream(weights, model, plan, checkpoint_block(config), device)
    with torch.no_grad():
        model.load_weights(weights)
    return model
