"""The HBM floor of a decode step: the fewest bytes one rank must read, over measured bandwidth.

A decode step is memory bound: every weight it touches and every cached KV entry it attends to is read at
least once. Routed experts are read only if some token in the group picks them: with G tokens across the
group each choosing K of E experts (uniform routing, as random weights give), an expert stays idle with
probability (1 - K/E)^G.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_active_fraction(group_tokens: int, top_k: int, num_experts: int) -> float:
    """Expected fraction of experts that receive at least one of `group_tokens` tokens (uniform routing)."""
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
    return 1.0 - (1.0 - top_k / num_experts) ** max(group_tokens, 0)


@dataclass(frozen=True, slots=True)
class DecodeBytes:
    dense_weights: int  # attention, dense MLPs, shared experts, routers, norms, LM head (read every step)
    routed_experts: int  # expected bytes of this rank's routed experts that some token activates
    kv_cache: int  # cached K/V read by attention

    @property
    def total(self) -> int:
        return self.dense_weights + self.routed_experts + self.kv_cache


def decode_step_bytes(
    *,
    dense_weight_bytes: int,
    local_routed_expert_bytes: int,
    batch_per_rank: int,
    world_size: int,
    top_k: int,
    num_experts: int,
    kv_bytes_per_token: int,
    kv_len: int,
) -> DecodeBytes:
    """Bytes one rank reads in a decode step of `batch_per_rank` sequences of `kv_len` cached tokens each.

    `kv_bytes_per_token` covers all attention layers of the model; `dense_weight_bytes` excludes the input
    embedding table (a step reads only its `batch` rows, which is negligible).
    """
    active = expected_active_fraction(batch_per_rank * world_size, top_k, num_experts)
    return DecodeBytes(
        dense_weights=dense_weight_bytes,
        routed_experts=int(local_routed_expert_bytes * active),
        kv_cache=batch_per_rank * kv_len * kv_bytes_per_token,
    )
