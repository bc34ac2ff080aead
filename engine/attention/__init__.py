"""Attention backends (backend.py: the interface) and how one is picked for a device."""

from __future__ import annotations

import logging
import sys

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


def triton_block_size_ok(block_size: int) -> bool:
    """The Triton kernels read whole pages: block_size must be a power of two >= 16."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def resolve_attention_backend(name: str, device: torch.device, block_size: int = 16) -> tuple[str, str]:
    """(backend name, why) for `--attention-backend name` on `device`. A pure decision, tested alone."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend ({name!r}) must be one of {ATTENTION_BACKENDS}")
    if name == "triton" and not triton_block_size_ok(block_size):
        raise ValueError(
            f"the triton attention backend needs block_size to be a power of two >= 16 (got {block_size}): "
            "raise --block-size or use --attention-backend torch"
        )
    if name != "auto":
        return name, "requested"
    if device.type != "cuda":
        return "torch", "auto: not a CUDA device"
    if not triton_block_size_ok(block_size):
        return "torch", f"auto: block_size {block_size} is not a power of two >= 16"
    if not triton_kernels_available():
        return "torch", "auto: the Triton attention kernels are not importable"
    return "triton", "auto: CUDA device with Triton kernels"


def create_attention_backend(name: str, device: torch.device, block_size: int = 16) -> AttentionBackend:
    chosen, why = resolve_attention_backend(name, device, block_size)
    print(f"attention backend: {chosen} ({why})", file=sys.stderr, flush=True)
    logger.info("attention backend: %s (%s)", chosen, why)
    if chosen == "triton":
        from .triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from .torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
