"""What every causal LM here shares: logits, generic weight loading, KV-cache discovery.

Weight loading is generic (nano-vllm style): each parameter carries a `weight_loader`; the only name
rewriting is for routed experts, whose per-expert checkpoint tensors
(`...mlp.experts.{e}.{gate,up,down}_proj.weight`) are packed into the stacked `w13`/`w2` of this rank's
local experts (others are skipped). transformers>=5 stacked names (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`) load too. Block-FP8 checkpoints are dequantized on the way in (models/fp8.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from moefleet.engine.forward_batch import ForwardBatch
from moefleet.engine.layers.embedding import LMHead, VocabEmbedding
from moefleet.engine.layers.experts import Experts
from moefleet.engine.layers.moe import MoE, MoEStep
from moefleet.engine.layers.norm import RMSNorm
from moefleet.engine.layers.token_dispatch import LocalDispatcher, TokenDispatcher
from moefleet.engine.models.fp8 import SCALE_SUFFIX, dequantize_stream
from torch import nn

EXPERT_TENSOR = re.compile(
    r"^(?P<module>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<shard>gate|up|down)_proj\.weight$"
)
STACKED_EXPERT_TENSOR = re.compile(r"^(?P<module>.+\.mlp\.experts)\.(?P<name>gate_up_proj|down_proj)$")
LAYER_TENSOR = re.compile(r"^model\.layers\.(?P<layer>\d+)\.")


class DecoderConfig(Protocol):
    """The config fields the shared decoder stack reads (every models/configs.py config has them)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    fp8_weight_block_size: tuple[int, int] | None


@dataclass(eq=False)
class LayerState:
    """One (micro-)batch flowing through the decoder stages: `hidden` is updated in place by each stage.

    `micro_batch` picks the MoE layers' dispatcher: None -> `layer.dispatcher`, i -> `layer.dispatchers[i]`
    (two-batch overlap: handles never cross micro-batches)."""

    positions: torch.Tensor  # [T]
    hidden: torch.Tensor  # [T, D]
    batch: ForwardBatch
    micro_batch: int | None = None
    moe: MoEStep | None = None  # in flight between the stages of the current MoE layer
    # Two-batch overlap on a comm stream (tbo_streams.py): wraps the micro-batch's dispatcher
    wrap_dispatcher: Callable[[TokenDispatcher], TokenDispatcher] | None = None

    def dispatcher(self, mlp: nn.Module) -> TokenDispatcher:
        found = self._dispatcher(mlp)
        return found if self.wrap_dispatcher is None else self.wrap_dispatcher(found)

    def _dispatcher(self, mlp: nn.Module) -> TokenDispatcher:
        if self.micro_batch is None:
            return mlp.dispatcher  # type: ignore[return-value]
        dispatchers = getattr(mlp, "dispatchers", None)
        if dispatchers is None:
            if isinstance(mlp.dispatcher, LocalDispatcher):  # stateless: one rank may share it
                return mlp.dispatcher
            raise RuntimeError("two-batch overlap needs one dispatcher per micro-batch on every MoE layer")
        if self.micro_batch >= len(dispatchers):
            raise RuntimeError(
                f"two-batch overlap runs micro-batch {self.micro_batch} but the MoE layers have "
                f"{len(dispatchers)} dispatcher(s): install them with apply_expert_parallel(num_micro_batches=2)"
            )
        return dispatchers[self.micro_batch]  # type: ignore[no-any-return]


Stage = Callable[[LayerState], None]


class DecoderLayer(nn.Module):
    """Pre-norm residual block (HF names): hidden += self_attn(norm(hidden)); hidden += mlp(norm(hidden)).

    `self_attn(positions, hidden, batch)`: attention modules take the step's ForwardBatch.
    The work is exposed as ordered `stages()` split at the MoE communications (attention + router | dispatch |
    experts + shared experts | combine; one stage for a dense MLP); `forward` runs them in order and two-batch
    overlap (engine/tbo.py) interleaves two micro-batches' stages - one code path for both."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, rms_norm_eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        state = LayerState(positions, hidden, batch)
        for stage in self.stages():
            stage(state)
        return state.hidden

    def stages(self) -> list[Stage]:
        if isinstance(self.mlp, MoE):
            return [self._attention_and_route, self._dispatch, self._experts, self._combine]
        return [self._attention_and_mlp]

    def stage_kinds(self) -> list[str]:
        """ "compute" or "comm" per stage of `stages()` (two-batch overlap puts "comm" on the comm stream)."""
        if isinstance(self.mlp, MoE):
            return ["compute", "comm", "compute", "comm"]
        return ["compute"]

    def _attention(self, s: LayerState) -> None:
        s.hidden = s.hidden + self.self_attn(s.positions, self.input_layernorm(s.hidden), s.batch)

    def _attention_and_mlp(self, s: LayerState) -> None:
        self._attention(s)
        s.hidden = s.hidden + self.mlp(self.post_attention_layernorm(s.hidden))

    def _attention_and_route(self, s: LayerState) -> None:
        self._attention(s)
        s.moe = self.mlp.stage_route(self.post_attention_layernorm(s.hidden))  # type: ignore[operator]

    def _dispatch(self, s: LayerState) -> None:
        assert s.moe is not None
        # The mode comes from this (micro-)batch's own ForwardBatch: two batches alive at once keep their own.
        self.mlp.stage_dispatch(s.moe, s.dispatcher(self.mlp), is_prefill=s.batch.is_prefill)  # type: ignore[operator]

    def _experts(self, s: LayerState) -> None:
        assert s.moe is not None
        self.mlp.stage_experts(s.moe, s.dispatcher(self.mlp))  # type: ignore[operator]

    def _combine(self, s: LayerState) -> None:
        assert s.moe is not None
        s.hidden = s.hidden + self.mlp.stage_combine(s.moe, s.dispatcher(self.mlp))  # type: ignore[operator]
        s.moe = None


class DecoderModel(nn.Module):
    """HF `model.*`: embed_tokens -> layers (each `layer(positions, hidden, batch)`) -> final norm."""

    def __init__(self, config: DecoderConfig, layers: Iterable[nn.Module]):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden, batch)
        return self.norm(hidden)


class CausalLM(nn.Module):
    """Base for `model(input_ids [T], positions [T], batch) -> hidden [T, D]` models: a `DecoderModel` over the
    given decoder layers and an `lm_head` (optionally tied to the embedding)."""

    def __init__(self, config: DecoderConfig, layers: Iterable[nn.Module]):
        super().__init__()
        self.config = config
        self.num_hidden_layers = config.num_hidden_layers
        self.tie_word_embeddings = config.tie_word_embeddings
        # Set for block-FP8 checkpoints (dequantized at load).
        self.fp8_block_size = config.fp8_weight_block_size
        self.model = DecoderModel(config, layers)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_to=tied)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids [T], positions [T] -> hidden [T, D]; the step's metadata is `batch` (forward_batch.py)."""
        return self.model(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] -> float32 logits [B, V]."""
        return self.lm_head(hidden)

    def attention_layers(self) -> list[nn.Module]:
        """Modules owning a KV cache (`kv_cache_shape`, `kv_cache`), in layer order."""
        return [m for m in self.modules() if hasattr(m, "kv_cache_shape")]

    def skip_weight(self, name: str) -> bool:
        """True for checkpoint tensors this model does not use (so the loader need not even read them)."""
        if name.endswith(SCALE_SUFFIX):  # an FP8 scale goes wherever its weight goes
            return self.skip_weight(name[: -len(SCALE_SUFFIX)])
        if name.endswith("rotary_emb.inv_freq") or (self.tie_word_embeddings and name == "lm_head.weight"):
            return True
        layer = LAYER_TENSOR.match(name)
        if layer and int(layer["layer"]) >= self.num_hidden_layers:
            return True  # e.g. DeepSeek multi-token-prediction layers
        expert = EXPERT_TENSOR.match(name)
        if expert:
            module = self.get_submodule(expert["module"])
            return isinstance(module, Experts) and int(expert["expert"]) not in module.local_experts
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Load HF-named tensors. With `strict`, every parameter (and every local expert) must be filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        if self.fp8_block_size is not None:
            device = next(iter(params.values())).device
            weights = dequantize_stream(weights, self.fp8_block_size, device)
        for name, tensor in weights:
            if self.skip_weight(name):
                continue
            expert = EXPERT_TENSOR.match(name)
            stacked = STACKED_EXPERT_TENSOR.match(name)
            if expert:
                experts = self._experts(expert["module"], name)
                param = experts.w2 if expert["shard"] == "down" else experts.w13
                param.weight_loader(param, tensor, int(expert["expert"]), expert["shard"])  # type: ignore[attr-defined]
            elif stacked:
                self._experts(stacked["module"], name).load_stacked(stacked["name"], tensor)
            elif name in params:
                params[name].weight_loader(params[name], tensor)  # type: ignore[attr-defined]
                loaded.add(name)
            else:
                raise ValueError(
                    f"checkpoint tensor {name!r} matches no parameter of {type(self).__name__} "
                    "(is the checkpoint quantized or of another architecture?)"
                )
        if strict:
            self._check_complete(params, loaded)
        return loaded

    def _experts(self, module_name: str, tensor_name: str) -> Experts:
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            module = None
        if not isinstance(module, Experts):
            raise ValueError(
                f"checkpoint tensor {tensor_name!r}: {module_name} is not a routed-experts layer here"
            )
        return module

    def _check_complete(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        missing = [n for n in params if n not in loaded and not n.endswith(("experts.w13", "experts.w2"))]
        for name, module in self.named_modules():
            if isinstance(module, Experts):
                missing += [f"{name}: {m}" for m in module.missing()]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")
