"""Attention backends (backend.py: the interface) and how one is picked for a device."""

from __future__ import annotations

import logging

import torch

from .backend import AttentionBackend

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "torch", "triton")


def triton_kernels_available() -> bool:
    """The Triton backend's kernels (engine/kernels/) are importable, and so is Triton itself."""
    try:
        import triton  # noqa: F401
        from moefleet.engine.kernels import mla_decode, paged_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(name: str, device: torch.device) -> tuple[str, str]:
    """(backend name, why) for `--attention-backend name` on `device`. A pure decision, tested alone."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend ({name!r}) must be one of {ATTENTION_BACKENDS}")
    if name != "auto":
        return name, "requested"
    if device.type != "cuda":
        return "torch", "auto: not a CUDA device"
    if not triton_kernels_available():
        return "torch", "auto: the Triton attention kernels are not importable"
    return "triton", "auto: CUDA device with Triton kernels"


def create_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    chosen, why = resolve_attention_backend(name, device)
    print(f"attention backend: {chosen} ({why})", flush=True)
    logger.info("attention backend: %s (%s)", chosen, why)
    if chosen == "triton":
        from .triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from .torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
