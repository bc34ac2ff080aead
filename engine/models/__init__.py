"""Model registry: HF `architectures[0]` -> model class (each has `config_class.from_dict`)."""

from __future__ import annotations

from moefleet.engine.models.base import CausalLM
from moefleet.engine.models.deepseek_v3 import DeepseekV3ForCausalLM
from moefleet.engine.models.glm4_moe import Glm4MoeForCausalLM
from moefleet.engine.models.gpt_oss import GptOssForCausalLM
from moefleet.engine.models.llama4 import Llama4ForCausalLM
from moefleet.engine.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "Glm4MoeForCausalLM": Glm4MoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "Llama4ForCausalLM": Llama4ForCausalLM,
    # The text model of a Llama-4 (vision) checkpoint; the vision tower is skipped.
    "Llama4ForConditionalGeneration": Llama4ForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    """The class for an HF architecture name, or a ValueError listing what is supported."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r} (supported: {', '.join(sorted(MODEL_REGISTRY))})"
        ) from None


__all__ = [
    "MODEL_REGISTRY",
    "CausalLM",
    "DeepseekV3ForCausalLM",
    "Glm4MoeForCausalLM",
    "GptOssForCausalLM",
    "Llama4ForCausalLM",
    "Qwen3MoeForCausalLM",
    "model_class",
]
