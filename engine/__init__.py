"""moefleet.engine: the serving engine (models, KV cache, scheduler, distributed MoE, HTTP server).

from moefleet.engine import LLM, SamplingParams
LLM("path/to/checkpoint").generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import EngineConfig
    from .llm_engine import LLM, LLMEngine
    from .sampling_params import RequestOutput, SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput"]

# Imported on first use: submodules (layers, models, context) import this package, and most users of one
# piece (the operator's tests, the scheduler) must not pay for loading torch models.
_EXPORTS = {
    "LLM": "llm_engine",
    "LLMEngine": "llm_engine",
    "EngineConfig": "config",
    "SamplingParams": "sampling_params",
    "RequestOutput": "sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
