"""`moefleet bench --project-layers L`: the full-model step from two measured depths, and the reference
deployment's per-GPU figures to compare it with (pure).

A step of d decoder layers (the same number of leading dense layers in both runs) costs
t(d) = intercept + slope * d: `slope` is one more MoE layer, `intercept` the embedding, LM head, sampling,
batch preparation and the dense layers' difference from MoE ones. The full model is t(L); communication is
not in a one-GPU emulated step, so `comm_s_per_layer` x MoE layers is added when given (an emulation on W > 1
GPUs already includes dispatch/combine between the W GPUs, at remote share (W - 1) / W).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DepthFit:
    slope_s: float  # seconds per additional decoder layer
    intercept_s: float

    def step_s(self, layers: int) -> float:
        return self.intercept_s + self.slope_s * layers


def fit_depths(points: list[tuple[int, float]]) -> DepthFit:
    """Line through (layers, step seconds) at two or more depths (least squares; exact for two)."""
    depths = sorted({d for d, _ in points})
    if len(depths) < 2:
        raise ValueError(f"need step times at two different depths to project, got depths {depths}")
    n = len(points)
    mean_d = sum(d for d, _ in points) / n
    mean_t = sum(t for _, t in points) / n
    slope = sum((d - mean_d) * (t - mean_t) for d, t in points) / sum((d - mean_d) ** 2 for d, _ in points)
    return DepthFit(slope, mean_t - slope * mean_d)


@dataclass(frozen=True, slots=True)
class Projection:
    layers: int
    fit: DepthFit
    comm_s: float  # communication added (emulated steps have none)
    tokens_per_step: int

    @property
    def step_s(self) -> float:
        return self.fit.step_s(self.layers) + self.comm_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s


def project(
    fit: DepthFit, layers: int, tokens_per_step: int, moe_layers: int = 0, comm_s_per_layer: float = 0.0
) -> Projection:
    if layers < 1:
        raise ValueError(f"--project-layers ({layers}) must be >= 1")
    if comm_s_per_layer < 0:
        raise ValueError(f"--comm-us-per-layer ({comm_s_per_layer * 1e6:g}) must be >= 0")
    return Projection(layers, fit, moe_layers * comm_s_per_layer, tokens_per_step)


@dataclass(frozen=True, slots=True)
class Reference:
    tokens_per_s_per_gpu: float
    what: str


# SGLang's large-scale EP deployment of DeepSeek-R1 on 96 H100 (/work/shared/ANCHORS.md): prefill EP32 at
# 4K prompts 50.3k input tok/s per 8-GPU node; decode EP72 (256 sequences per GPU, KV ~2,000) 2,790 per GPU.
REFERENCE: dict[str, Reference] = {
    "prefill": Reference(50_300 / 8, "SGLang DeepSeek-R1 prefill EP32, 4K prompts, H100"),
    "decode": Reference(2_790, "SGLang DeepSeek-R1 decode EP72, 256 seq/GPU, KV ~2000, H100"),
}

# HBM bandwidth (bytes/s) by GPU: decode is memory bound, so compare decode per GPU at equal bandwidth.
HBM_BANDWIDTH: dict[str, float] = {"H100": 3.35e12, "H200": 4.8e12, "B200": 8.0e12}


def gpu_family(device_name: str) -> str | None:
    for family in HBM_BANDWIDTH:
        if family in device_name.upper():
            return family
    return None


def bandwidth_note(device_name: str, reference_gpu: str = "H100") -> str:
    """One line naming both GPUs' HBM bandwidth and their ratio (or why no ratio)."""
    family = gpu_family(device_name)
    ref = HBM_BANDWIDTH[reference_gpu]
    if family is None:
        return f"measured on {device_name}; the reference ran on {reference_gpu} ({ref / 1e12:.2f} TB/s HBM)"
    mine = HBM_BANDWIDTH[family]
    return (
        f"measured on {family} ({mine / 1e12:.2f} TB/s HBM) vs reference {reference_gpu} ({ref / 1e12:.2f} TB/s): "
        f"a memory-bound decode step has {mine / ref:.2f}x the bandwidth here; dense bf16 peak is the same "
        "for H100 and H200 (prefill compares directly)"
    )
