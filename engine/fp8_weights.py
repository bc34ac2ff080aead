"""Keep block-FP8 weights in FP8 (`--quantization`): which modules, and the weight stream that feeds them.

`--quantization auto` keeps what the checkpoint has: for a block-FP8 checkpoint (DeepSeek-V3/R1, Kimi-K2:
`quantization_config.quant_method == "fp8"`, `weight_scale_inv` per 128x128 tile) every linear whose weight
comes with a scale becomes an `Fp8Linear` and every routed-experts layer stores FP8 + scales; `none`
dequantises everything at load (the bf16 engine of before); `fp8` also quantises a bf16 checkpoint's linears
and experts at load (128x128 blocks). kv_b_proj stays in the model dtype: the absorbed MLA path reads its
weight directly. Embeddings, lm_head, norms and router gates are never FP8 (as in DeepSeek's release).

The stream pairs each FP8 weight with its scale (they may sit in different shards) and, per pair: a kept
linear gets both tensors by name; a kept experts layer gets the weight through its per-expert loader and the
scale through `Experts.load_scale`; anything else is dequantised (models/fp8.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from moefleet.engine.kernels.fp8_blocks import quantize_weight_block
from moefleet.engine.layers.experts import Experts
from moefleet.engine.layers.linear import Fp8Linear, Linear
from moefleet.engine.models.fp8 import FP8_DTYPES, SCALE_SUFFIX, dequantize_block_fp8
from torch import nn

QUANTIZATIONS = ("auto", "none", "fp8")
DEFAULT_BLOCK = (128, 128)
KEEP_HIGH_PRECISION = ("kv_b_proj",)  # absorbed MLA multiplies by this weight directly
EXPERT_WEIGHT = re.compile(
    r"^(?P<module>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<shard>gate|up|down)_proj\.weight$"
)


@dataclass
class Fp8Plan:
    block: tuple[int, int]
    linears: set[str] = field(default_factory=set)  # module names turned into Fp8Linear
    experts: set[str] = field(default_factory=set)  # Experts module names stored in FP8


def checkpoint_block(config: dict) -> tuple[int, int] | None:
    """weight_block_size of a block-FP8 checkpoint's config.json, else None."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    return (int(block[0]), int(block[1])) if block else None


def resolve_quantization(config: dict, quantization: str) -> str:
    """'fp8' or 'none': what the model will hold."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "auto":
        return "fp8" if checkpoint_block(config) is not None else "none"
    return quantization


def plan_fp8(model: nn.Module, checkpoint_names: Iterable[str], config: dict) -> Fp8Plan:
    """Modules to hold in FP8: for an FP8 checkpoint those whose weights have scales; else all eligible."""
    names = set(checkpoint_names)
    block = checkpoint_block(config)
    quantize_all = block is None
    plan = Fp8Plan(block or DEFAULT_BLOCK)
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not name.endswith(KEEP_HIGH_PRECISION):
            if quantize_all or f"{name}.weight{SCALE_SUFFIX}" in names:
                plan.linears.add(name)
        elif isinstance(module, Experts):
            prefix = f"{name}."
            if quantize_all or any(n.startswith(prefix) and n.endswith(SCALE_SUFFIX) for n in names):
                plan.experts.add(name)
    return plan


def apply_plan(model: nn.Module, plan: Fp8Plan) -> None:
    """Swap planned Linears for Fp8Linears (same device) and switch planned Experts to FP8 storage."""
    for name in sorted(plan.linears):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old: Linear = getattr(parent, child)
        new = Fp8Linear(
            old.in_features, old.out_features, plan.block, bias=old.bias is not None, dtype=old.weight.dtype
        ).to(old.weight.device)
        setattr(parent, child, new)
    for name in plan.experts:
        experts = model.get_submodule(name)
        assert isinstance(experts, Experts)
        experts.to_fp8(plan.block)


def fp8_stream(
    weights: Iterable[tuple[str, torch.Tensor]],
    model: nn.Module,
    plan: Fp8Plan,
    checkpoint_block_size: tuple[int, int] | None,
    device: torch.device | str,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint stream as the planned model loads it (see the module docstring)."""
    waiting_weights: dict[str, torch.Tensor] = {}
    waiting_scales: dict[str, torch.Tensor] = {}

    def emit(
        name: str, weight: torch.Tensor, scale: torch.Tensor | None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        module_name = name.rpartition(".")[0]
        expert = EXPERT_WEIGHT.match(name)
        kept_expert = expert is not None and expert["module"] in plan.experts
        kept = kept_expert or (module_name in plan.linears and name.endswith(".weight"))
        if module_name in plan.experts:  # transformers>=5 stacked expert tensors
            raise ValueError(
                f"{name!r}: stacked expert tensors cannot be loaded into FP8 experts; use --quantization none"
            )
        if scale is not None and not kept:  # FP8 in the checkpoint, high precision here
            assert checkpoint_block_size is not None
            yield name, dequantize_block_fp8(weight.to(device), scale.to(device), checkpoint_block_size)
            return
        if scale is None and kept:  # high precision in the checkpoint, FP8 here
            weight, scale = quantize_weight_block(weight.to(device), plan.block)
        if scale is None:
            yield name, weight
            return
        yield name, weight
        if kept_expert:
            assert expert is not None
            experts = model.get_submodule(expert["module"])
            assert isinstance(experts, Experts)
            experts.load_scale(int(expert["expert"]), expert["shard"], scale.to(device))
        else:
            yield name + SCALE_SUFFIX, scale

    for name, tensor in weights:
        if name.endswith(SCALE_SUFFIX):
            weight_name = name[: -len(SCALE_SUFFIX)]
            if weight_name in waiting_weights:
                yield from emit(weight_name, waiting_weights.pop(weight_name), tensor)
            else:
                waiting_scales[weight_name] = tensor
        elif tensor.dtype in FP8_DTYPES:
            if name in waiting_scales:
                yield from emit(name, tensor, waiting_scales.pop(name))
            else:
                waiting_weights[name] = tensor
        else:
            yield from emit(name, tensor, None)
    if waiting_weights or waiting_scales:
        unpaired = sorted(waiting_weights) + [n + SCALE_SUFFIX for n in sorted(waiting_scales)]
        raise ValueError(
            f"FP8 checkpoint: {len(unpaired)} weights/scales have no partner, e.g. {unpaired[:4]}"
        )


def quantize_model(model: nn.Module, block: tuple[int, int] = DEFAULT_BLOCK) -> Fp8Plan:
    """Quantise an already-filled model in place to block FP8 (every eligible linear and experts layer;
    used by `moefleet bench --quantization fp8` on its random weights). Expert stacks go one expert at a
    time so the float32 temporaries stay small."""
    plan = plan_fp8(model, [], {})
    plan.block = block
    old = {name: model.get_submodule(name) for name in plan.linears | plan.experts}
    saved: dict[str, tuple[Any, Any]] = {
        name: (m.w13.data, m.w2.data) if isinstance(m, Experts) else (m.weight.data, m.bias)
        for name, m in old.items()
    }
    apply_plan(model, plan)
    with torch.no_grad():
        for name in plan.linears:
            weight, bias = saved[name]
            new: Any = model.get_submodule(name)
            q, s = quantize_weight_block(weight, block)
            new.weight.copy_(q)
            new.weight_scale_inv.copy_(s)
            if bias is not None:
                new.bias.copy_(bias)
        for name in plan.experts:
            w13, w2 = saved[name]
            experts = model.get_submodule(name)
            assert isinstance(experts, Experts)
            assert experts.w13_scale_inv is not None and experts.w2_scale_inv is not None
            for e in range(w13.shape[0]):
                q, s = quantize_weight_block(w13[e], block)
                experts.w13[e].copy_(q)
                experts.w13_scale_inv[e].copy_(s)
                q, s = quantize_weight_block(w2[e], block)
                experts.w2[e].copy_(q)
                experts.w2_scale_inv[e].copy_(s)
        del saved
    return plan
