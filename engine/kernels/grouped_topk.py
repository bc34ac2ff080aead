"""Fused DeepSeek-V3 expert selection: sigmoid, correction bias, group top-2 sums, top groups, top-k, weights.

engine/layers/router.py `grouped_topk` runs this as ~10 torch kernels per MoE layer (two `topk`s, a scatter, a
masked fill, a gather, the renormalisation); at 256 decode tokens that is ~50 us of launches and small kernels
per layer on an H200. Here one program handles one token's row of E logits in registers:

    scores = sigmoid(logits); choice = scores + bias
    group score = sum of the 2 largest `choice` in each of G groups; keep the `topk_group` best groups
    ids = the top_k largest `choice` among kept groups (descending, like torch.topk); weights = scores[ids]
    (renormalised to sum 1 when asked) x routed_scaling_factor

Top-k is K rounds of argmax (K = 8 of E = 256); ties pick the lowest index. Shapes: logits [T, E] float32
(E a power of two, groups equal), bias [E] float32 or None -> weights [T, K] float32, ids [T, K] int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _argmax_first(x, idx, BIG: tl.constexpr):
    """(max, the lowest index holding it) of a 1-D tile."""
    best = tl.max(x, 0)
    return best, tl.min(tl.where(x == best, idx, BIG), 0)


@triton.jit
def _grouped_topk_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    stride_lt,
    stride_wt,
    stride_it,
    scaling,
    E: tl.constexpr,
    G: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E)
    logits = tl.load(logits_ptr + t * stride_lt + offs).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + offs)
    neg_inf = float("-inf")
    if G > 1:
        PER: tl.constexpr = E // G
        grouped = tl.reshape(choice, (G, PER))
        col = tl.arange(0, PER)[None, :]
        first = tl.max(grouped, 1)
        first_at = tl.min(tl.where(grouped == first[:, None], col, PER), 1)
        second = tl.max(tl.where(col == first_at[:, None], neg_inf, grouped), 1)
        group_score = first + second  # [G]
        g_idx = tl.arange(0, G)
        keep = tl.zeros([G], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            _, g_best = _argmax_first(group_score, g_idx, G)
            keep = keep | (g_idx == g_best)
            group_score = tl.where(g_idx == g_best, neg_inf, group_score)
        keep_e = tl.reshape(tl.broadcast_to(keep[:, None], (G, PER)), (E,))
        choice = tl.where(keep_e, choice, neg_inf)
    k_idx = tl.arange(0, K)
    ids = tl.zeros([K], tl.int64)
    weights = tl.zeros([K], tl.float32)
    for k in tl.static_range(K):
        _, at = _argmax_first(choice, offs, E)
        ids = tl.where(k_idx == k, at.to(tl.int64), ids)
        weights = tl.where(k_idx == k, tl.sum(tl.where(offs == at, scores, 0.0), 0), weights)
        choice = tl.where(offs == at, neg_inf, choice)
    if RENORM:
        weights = weights / (tl.sum(weights, 0) + 1e-20)
    tl.store(weights_ptr + t * stride_wt + k_idx, weights * scaling)
    tl.store(ids_ptr + t * stride_it + k_idx, ids)


def supports(num_experts: int, n_group: int, top_k: int) -> bool:
    """Shapes the kernel handles: E and K powers of two, E divisible into G equal power-of-two groups."""

    def pow2(n: int) -> bool:
        return n >= 1 and n & (n - 1) == 0

    return (
        pow2(num_experts)
        and pow2(top_k)
        and pow2(n_group)
        and num_experts % n_group == 0
        and top_k <= num_experts
    )


def fused_grouped_topk(
    logits: Tensor,
    bias: Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling_factor: float,
) -> tuple[Tensor, Tensor]:
    """logits [T, E] (pre-sigmoid) -> (weights [T, K] float32, ids [T, K] int64); see the module docstring."""
    num_tokens, num_experts = logits.shape
    if not supports(num_experts, n_group, top_k):
        raise ValueError(
            f"fused_grouped_topk needs power-of-two experts ({num_experts}), top_k ({top_k}) and n_group "
            f"({n_group}): use engine/layers/router.py grouped_topk"
        )
    logits = logits.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    _grouped_topk_kernel[(num_tokens,)](
        logits, bias if bias is not None else logits, weights, ids,
        logits.stride(0), weights.stride(0), ids.stride(0), float(scaling_factor),
        E=num_experts, G=n_group, TOPK_GROUP=topk_group, K=top_k,
        HAS_BIAS=bias is not None, RENORM=renormalize,
        num_warps=4 if num_experts >= 256 else 1,
    )  # fmt: skip
    return weights, ids
