"""Rows this rank's experts received in one step, per local expert slot (a check step of `moefleet bench`).

`count_received_rows(model, step)` wraps every MoE layer's dispatchers (all micro-batches) for one call of
`step`, records what each `dispatch_finish` hands the experts (host `tokens_per_expert`, or the device
`counts` read after the step), then puts the dispatchers back. The result shows where the routed rows of an
expert-parallel (or `--emulate-ep`) step really went: per slot, summed over MoE layers and micro-batches.
Run it eagerly (a CUDA graph replay runs no Python) and outside the timed steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from moefleet.engine.layers.token_dispatch import ForwardingDispatcher
from torch import nn


@dataclass(frozen=True, slots=True)
class ReceivedRows:
    per_slot: list[int]  # [local slots]: rows received, summed over MoE layers and micro-batches
    moe_layers: int

    @property
    def per_layer(self) -> float:
        """Rows this rank's experts computed per MoE layer (mean over layers)."""
        return sum(self.per_slot) / self.moe_layers if self.moe_layers else 0.0


class _CountingDispatcher(ForwardingDispatcher):
    def __init__(self, inner: Any, sink: list[torch.Tensor]):
        super().__init__(inner)
        self.sink = sink

    def dispatch_finish(self, pending: Any) -> Any:
        dispatched = self.inner.dispatch_finish(pending)
        if dispatched.tokens_per_expert is not None:
            self.sink.append(torch.tensor(dispatched.tokens_per_expert, dtype=torch.int64))
        elif dispatched.counts is not None:
            # a copy now (a workspace may be rewritten by the next layer), read after the step: no sync here
            self.sink.append(dispatched.counts.to(torch.int64, copy=True))
        return dispatched


def count_received_rows(model: nn.Module, step: Callable[[], Any]) -> ReceivedRows:
    """Run `step` once with counting dispatchers on every MoE layer; see the module doc."""
    from moefleet.engine.distributed.ep import moe_layers

    sink: list[torch.Tensor] = []
    restore: list[tuple[nn.Module, Any, Any]] = []
    slots = 0
    for _, layer in moe_layers(model):
        slots = len(layer.experts.local_experts)  # type: ignore[union-attr,arg-type]
        dispatchers = getattr(layer, "dispatchers", None)
        restore.append((layer, layer.dispatcher, dispatchers))
        setattr(layer, "dispatcher", _CountingDispatcher(layer.dispatcher, sink))  # noqa: B010
        if dispatchers is not None:
            setattr(layer, "dispatchers", [_CountingDispatcher(d, sink) for d in dispatchers])  # noqa: B010
    try:
        step()
    finally:
        for layer, dispatcher, dispatchers in restore:
            setattr(layer, "dispatcher", dispatcher)  # noqa: B010
            if dispatchers is not None:
                setattr(layer, "dispatchers", dispatchers)  # noqa: B010
    total = torch.zeros(slots, dtype=torch.int64)
    for counts in sink:
        total += counts.cpu()
    return ReceivedRows([int(n) for n in total.tolist()], len(restore))
