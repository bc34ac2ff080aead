"""`make_tiny_model`: small random HF-format checkpoints that both moefleet and transformers load.

Writes config.json, safetensors weights in HF naming (per-expert tensors, sharded with an index when
large or when `shards > 1`), and a byte-level BPE tokenizer trained locally with `tokenizers` on a built-in
English text (tokenizer.json, tokenizer_config.json with a ChatML chat template, special_tokens_map.json,
generation_config.json). No transformers needed. Weights are scaled so greedy decoding is not degenerate
and routing spreads over the experts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# kimi_k2: the DeepSeek-V3 architecture (one routing group, one dense layer) with a tiktoken tokenizer.
ARCHES = ("qwen3_moe", "deepseek_v3", "kimi_k2", "glm4_moe", "gpt_oss", "llama4")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SHARD_THRESHOLD_BYTES = 4 * 1024 * 1024

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn a few words and the shape of a
sentence. Once upon a time there was a little town by the sea, where the people woke up early to fish and
to bake bread. The children went to school, and the old men sat in the sun and talked about the weather.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Hello, how are you today? I am fine, thank you. Please tell me a story about a dragon and a knight.
The knight rode through the forest for many days. He was tired and hungry, but he did not give up.
At last he found the cave of the dragon, and the dragon said: why have you come here, little knight?
Machines that serve language models must be fast, fair and reliable. Every request waits in a queue,
the scheduler picks a batch, the model computes the next token, and the answer streams back to the user.
Experts in a mixture of experts model are small networks; a router sends each token to a few of them.
Some experts are busy and some are idle, so the system moves experts between machines to balance the load.
The weather today is sunny with a light wind from the west. Tomorrow it will rain in the morning and
clear up in the afternoon. Water boils at one hundred degrees. The moon goes around the earth, and the
earth goes around the sun. Numbers: one, two, three, four, five, six, seven, eight, nine, ten.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week.
Red, green, blue, yellow, black and white are colors. Cats, dogs, birds and horses are animals.
def main(): print("hello world") return 0  # code looks like this, with brackets [1, 2, 3] and {"a": 1}.
"""


def default_config(arch: str, vocab_size: int) -> dict[str, Any]:
    if arch in EMERGING_ARCHES:
        return emerging_default_config(arch, vocab_size)
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "qwen3_moe":
        return {
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            **common,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": False,
            "sliding_window": None,
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
        }
    if arch == "deepseek_v3":
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **common,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "moe_intermediate_size": 32,
            "n_routed_experts": 16,
            "n_shared_experts": 1,
            "num_experts_per_tok": 4,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "norm_topk_prob": True,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "num_nextn_predict_layers": 1,
        }
    raise ValueError(f"unknown arch {arch!r} (supported: {', '.join(ARCHES)})")


def train_tokenizer(out_dir: Path, vocab_size: int = 640) -> int:
    """Train a byte-level BPE on CORPUS, write tokenizer files; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
            "special": True,
        }
        for t, i in ids.items()
    }
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": 1024,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        },
    )
    return int(tokenizer.get_vocab_size())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


class _Init:
    """Seeded random tensors with the scales that keep a tiny random model's outputs varied."""

    def __init__(self, seed: int, expert_gain: float = 2.0):
        self.generator = torch.Generator().manual_seed(seed)
        self.expert_gain = expert_gain  # gpt-oss gate_up gain: larger makes the SwiGLU clamp bite

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std

    def linear(self, out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        return self.normal(out_features, in_features, std=gain / in_features**0.5)

    def norm(self, size: int) -> torch.Tensor:
        return 1.0 + self.normal(size, std=0.1)


# Output projections (o_proj, down_proj) are scaled up so the layers, not the token's own embedding,
# dominate the residual stream; otherwise tied-embedding models just repeat their last input token.
OUTPUT_GAIN = 2.5
# A tied LM head scores tokens against the embeddings themselves: a small embedding keeps the input token
# from out-scoring everything else (which makes the model repeat itself).
EMBED_STD = 1.0
EMBED_STD_TIED = 0.05


def _embed_std(cfg: dict) -> float:
    return EMBED_STD_TIED if cfg.get("tie_word_embeddings") else EMBED_STD


def _mlp(init: _Init, prefix: str, hidden: int, inter: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.gate_proj.weight": init.linear(inter, hidden),
        f"{prefix}.up_proj.weight": init.linear(inter, hidden),
        f"{prefix}.down_proj.weight": init.linear(hidden, inter, gain=OUTPUT_GAIN),
    }


def _experts(init: _Init, prefix: str, num: int, hidden: int, inter: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for e in range(num):
        out.update(_mlp(init, f"{prefix}.experts.{e}", hidden, inter))
    return out


def _attention(init: _Init, prefix: str, cfg: dict, bias: bool, o_bias: bool) -> dict[str, torch.Tensor]:
    d, heads, kv_heads, head_dim = (
        cfg["hidden_size"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    w: dict[str, torch.Tensor] = {}
    for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
        w[f"{prefix}.{name}_proj.weight"] = init.linear(rows * head_dim, d)
        if bias:
            w[f"{prefix}.{name}_proj.bias"] = init.normal(rows * head_dim, std=0.1)
    w[f"{prefix}.o_proj.weight"] = init.linear(d, heads * head_dim, gain=OUTPUT_GAIN)
    if o_bias:
        w[f"{prefix}.o_proj.bias"] = init.normal(d, std=0.1)
    return w


def _embedding(init: _Init, cfg: dict) -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": init.normal(cfg["vocab_size"], cfg["hidden_size"], std=_embed_std(cfg))
    }


def _layer_norms(init: _Init, prefix: str, hidden: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.input_layernorm.weight": init.norm(hidden),
        f"{prefix}.post_attention_layernorm.weight": init.norm(hidden),
    }


def _final_norm_and_head(init: _Init, cfg: dict) -> dict[str, torch.Tensor]:
    """The final norm, and the LM head unless it is tied to the embedding."""
    w = {"model.norm.weight": init.norm(cfg["hidden_size"])}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = init.linear(cfg["vocab_size"], cfg["hidden_size"], gain=3.0)
    return w


def qwen3_moe_weights(cfg: dict, init: _Init) -> dict[str, torch.Tensor]:
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or d // heads
    w = _embedding(init, cfg)
    bias = cfg.get("attention_bias", False)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w.update(_layer_norms(init, p, d))
        w.update(_attention(init, f"{p}.self_attn", {**cfg, "head_dim": head_dim}, bias=bias, o_bias=bias))
        w[f"{p}.self_attn.q_norm.weight"] = init.norm(head_dim)
        w[f"{p}.self_attn.k_norm.weight"] = init.norm(head_dim)
        sparse = (
            i not in (cfg.get("mlp_only_layers") or [])
            and cfg["num_experts"] > 0
            and (i + 1) % cfg.get("decoder_sparse_step", 1) == 0
        )
        if sparse:
            w[f"{p}.mlp.gate.weight"] = init.linear(cfg["num_experts"], d, gain=3.0)
            w.update(_experts(init, f"{p}.mlp", cfg["num_experts"], d, cfg["moe_intermediate_size"]))
        else:
            w.update(_mlp(init, f"{p}.mlp", d, cfg["intermediate_size"]))
    w.update(_final_norm_and_head(init, cfg))
    return w


def deepseek_v3_weights(cfg: dict, init: _Init) -> dict[str, torch.Tensor]:
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    kv_rank, q_rank = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    w = _embedding(init, cfg)
    num_layers = cfg["num_hidden_layers"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        w.update(_layer_norms(init, p, d))
        a = f"{p}.self_attn"
        if q_rank is None:
            w[f"{a}.q_proj.weight"] = init.linear(heads * (nope + rope), d)
        else:
            w[f"{a}.q_a_proj.weight"] = init.linear(q_rank, d)
            w[f"{a}.q_a_layernorm.weight"] = init.norm(q_rank)
            w[f"{a}.q_b_proj.weight"] = init.linear(heads * (nope + rope), q_rank)
        w[f"{a}.kv_a_proj_with_mqa.weight"] = init.linear(kv_rank + rope, d)
        w[f"{a}.kv_a_layernorm.weight"] = init.norm(kv_rank)
        w[f"{a}.kv_b_proj.weight"] = init.linear(heads * (nope + v_dim), kv_rank)
        w[f"{a}.o_proj.weight"] = init.linear(d, heads * v_dim, gain=OUTPUT_GAIN)
        freq = cfg.get("moe_layer_freq", 1) or 1
        if i >= cfg.get("first_k_dense_replace", 0) and i % freq == 0:
            num_experts, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            w[f"{p}.mlp.gate.weight"] = init.linear(num_experts, d, gain=3.0)
            w[f"{p}.mlp.gate.e_score_correction_bias"] = init.normal(num_experts, std=0.05)
            w.update(_experts(init, f"{p}.mlp", num_experts, d, inter))
            if cfg.get("n_shared_experts"):
                w.update(_mlp(init, f"{p}.mlp.shared_experts", d, inter * cfg["n_shared_experts"]))
        else:
            w.update(_mlp(init, f"{p}.mlp", d, cfg["intermediate_size"]))
    # Multi-token-prediction layers follow the main layers in DeepSeek checkpoints; engines skip them.
    for j in range(cfg.get("num_nextn_predict_layers") or 0):
        p = f"model.layers.{num_layers + j}"
        w[f"{p}.enorm.weight"] = init.norm(d)
        w[f"{p}.hnorm.weight"] = init.norm(d)
        w[f"{p}.eh_proj.weight"] = init.linear(d, 2 * d)
        w[f"{p}.shared_head.norm.weight"] = init.norm(d)
    w.update(_final_norm_and_head(init, cfg))
    return w


def save_weights(weights: dict[str, torch.Tensor], out_dir: Path, shards: int | None = None) -> list[str]:
    """Save as model.safetensors, or as `shards` files + model.safetensors.index.json; returns file names."""
    total = sum(t.numel() * t.element_size() for t in weights.values())
    if shards is None:
        shards = 1 if total <= SHARD_THRESHOLD_BYTES else max(2, -(-total // SHARD_THRESHOLD_BYTES))
    metadata = {"format": "pt"}
    if shards <= 1:
        save_file(
            {k: v.contiguous() for k, v in weights.items()}, str(out_dir / "model.safetensors"), metadata
        )
        return ["model.safetensors"]
    names = list(weights)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    files = []
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: weights[n].contiguous() for n in names[s * per_shard : (s + 1) * per_shard]}
        save_file(chunk, str(out_dir / file), metadata)
        weight_map.update(dict.fromkeys(chunk, file))
        files.append(file)
    _write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    return files


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    seed: int = 0,
    shards: int | None = None,
    expert_gain: float = 2.0,
    **overrides: Any,
) -> Path:
    """Write a tiny random `arch` checkpoint (one of ARCHES) to `out_dir`; returns the path.

    `overrides` replace config.json fields (e.g. num_hidden_layers=4, rope_scaling={...}); `mxfp4=True`
    (gpt_oss only) writes the experts as MXFP4 blocks + scales, as the released checkpoints.
    `expert_gain` (gpt_oss only) scales the gate_up weights: 2 keeps the clamped SwiGLU (limit 7) almost
    inactive (~0.03% clamped), 5 clamps about a tenth of the gate/up values.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r} (supported: {', '.join(ARCHES)})")
    mxfp4 = bool(overrides.pop("mxfp4", False))
    if mxfp4 and arch != "gpt_oss":
        raise ValueError("mxfp4=True is only for arch 'gpt_oss' (its experts ship as MXFP4)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if arch == "kimi_k2":
        return _make_tiny_kimi(out, seed, shards, overrides)
    vocab_size = train_tokenizer(out)
    config = default_config(arch, vocab_size)
    config.update(overrides)
    if config["vocab_size"] < vocab_size:
        raise ValueError(
            f"vocab_size ({config['vocab_size']}) is smaller than the tokenizer's ({vocab_size})"
        )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    config.update({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos})
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": bos}
    )
    init = _Init(seed, expert_gain)
    if arch in EMERGING_ARCHES:
        weights = EMERGING_WEIGHTS[arch](config, init)
        if mxfp4:
            weights = mxfp4_expert_weights(weights)
            config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": []}
            _write_json(out / "config.json", config)
    else:
        weights = (
            qwen3_moe_weights(config, init) if arch == "qwen3_moe" else deepseek_v3_weights(config, init)
        )
    save_weights(weights, out, shards)
    return out


def _make_tiny_kimi(out: Path, seed: int, shards: int | None, overrides: dict[str, Any]) -> Path:
    """Kimi-K2 layout: DeepSeek-V3 config with n_group 1, tiktoken.model + Kimi special tokens."""
    from moefleet.engine.tiny_tiktoken import write_tiktoken_tokenizer

    ids = write_tiktoken_tokenizer(out, CORPUS)
    config = default_config("deepseek_v3", ids["vocab_size"])
    config.update({"n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 2.827})
    config.update({k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    config.update(overrides)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["bos_token_id"],
            "eos_token_id": ids["eos_token_id"],
            "pad_token_id": ids["pad_token_id"],
        },
    )
    save_weights(deepseek_v3_weights(config, _Init(seed)), out, shards)
    return out


# ---------------------------------------------------------------------------------------------------------
# GLM-4.5 (glm4_moe), gpt-oss (gpt_oss) and Llama-4 text (llama4): the emerging MoE families.

EMERGING_ARCHES = ("glm4_moe", "gpt_oss", "llama4")


def emerging_default_config(arch: str, vocab_size: int) -> dict[str, Any]:
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }
    if arch == "glm4_moe":
        return {
            "architectures": ["Glm4MoeForCausalLM"],
            "model_type": "glm4_moe",
            **common,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 3,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "attention_bias": True,
            "use_qk_norm": True,
            "n_routed_experts": 16,
            "n_shared_experts": 1,
            "num_experts_per_tok": 4,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "first_k_dense_replace": 1,
            "num_nextn_predict_layers": 1,
        }
    if arch == "gpt_oss":
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            **common,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "rms_norm_eps": 1e-5,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "attention_bias": True,
            "swiglu_limit": 7.0,
            "rope_theta": 150000.0,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 256,
            },
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
        }
    if arch == "llama4":
        return {
            "architectures": ["Llama4ForCausalLM"],
            "model_type": "llama4_text",
            **common,
            "intermediate_size": 32,
            "intermediate_size_mlp": 128,
            "num_hidden_layers": 4,
            "rms_norm_eps": 1e-5,
            "num_local_experts": 8,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2,
            "no_rope_layers": [1, 1, 1, 0],
            "attention_chunk_size": 8,
            "use_qk_norm": True,
            "attn_temperature_tuning": True,
            "floor_scale": 4,
            "attn_scale": 0.1,
            "attention_bias": False,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "router_aux_loss_coef": 0.001,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
        }
    raise ValueError(f"unknown arch {arch!r} (supported: {', '.join(EMERGING_ARCHES)})")


def glm4_moe_weights(cfg: dict, init: _Init) -> dict[str, torch.Tensor]:
    d, head_dim = cfg["hidden_size"], cfg["head_dim"]
    w = _embedding(init, cfg)
    num_layers = cfg["num_hidden_layers"]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        w.update(_layer_norms(init, p, d))
        w.update(_attention(init, f"{p}.self_attn", cfg, bias=cfg.get("attention_bias", False), o_bias=False))
        if cfg.get("use_qk_norm"):
            w[f"{p}.self_attn.q_norm.weight"] = init.norm(head_dim)
            w[f"{p}.self_attn.k_norm.weight"] = init.norm(head_dim)
        if i >= cfg.get("first_k_dense_replace", 1):
            num_experts, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
            w[f"{p}.mlp.gate.weight"] = init.linear(num_experts, d, gain=3.0)
            w[f"{p}.mlp.gate.e_score_correction_bias"] = init.normal(num_experts, std=0.05)
            w.update(_experts(init, f"{p}.mlp", num_experts, d, inter))
            w.update(_mlp(init, f"{p}.mlp.shared_experts", d, inter * cfg.get("n_shared_experts", 1)))
        else:
            w.update(_mlp(init, f"{p}.mlp", d, cfg["intermediate_size"]))
    for j in range(cfg.get("num_nextn_predict_layers") or 0):  # MTP layers: engines skip them
        p = f"model.layers.{num_layers + j}"
        w[f"{p}.enorm.weight"] = init.norm(d)
        w[f"{p}.hnorm.weight"] = init.norm(d)
        w[f"{p}.eh_proj.weight"] = init.linear(d, 2 * d)
    w.update(_final_norm_and_head(init, cfg))
    return w


def gpt_oss_weights(cfg: dict, init: _Init) -> dict[str, torch.Tensor]:
    """HF gpt-oss layout (unquantized): experts stacked and transposed, gate/up interleaved in columns."""
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    num_experts, inter = cfg["num_local_experts"], cfg["intermediate_size"]
    w = _embedding(init, cfg)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w.update(_layer_norms(init, p, d))
        bias = cfg.get("attention_bias", True)
        w.update(_attention(init, f"{p}.self_attn", cfg, bias=bias, o_bias=bias))
        w[f"{p}.self_attn.sinks"] = init.normal(heads, std=1.0)
        w[f"{p}.mlp.router.weight"] = init.linear(num_experts, d, gain=3.0)
        w[f"{p}.mlp.router.bias"] = init.normal(num_experts, std=0.5)
        gate_up = torch.stack(
            [init.linear(2 * inter, d, gain=init.expert_gain) for _ in range(num_experts)]
        )  # [E, 2I, D]
        down = torch.stack([init.linear(d, inter, gain=OUTPUT_GAIN) for _ in range(num_experts)])  # [E, D, I]
        w[f"{p}.mlp.experts.gate_up_proj"] = gate_up.transpose(1, 2).contiguous()  # [E, D, 2I]
        w[f"{p}.mlp.experts.gate_up_proj_bias"] = init.normal(num_experts, 2 * inter, std=0.1)
        w[f"{p}.mlp.experts.down_proj"] = down.transpose(1, 2).contiguous()  # [E, I, D]
        w[f"{p}.mlp.experts.down_proj_bias"] = init.normal(num_experts, d, std=0.1)
    w.update(_final_norm_and_head(init, cfg))
    return w


def mxfp4_expert_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss expert matrices as shipped: `*_blocks` (packed e2m1 pairs) + `*_scales` (e8m0), rows = outputs.

    Replaces `experts.gate_up_proj` [E, D, 2I] / `down_proj` [E, I, D] by their MXFP4 encodings of the
    [E, out, in] matrices (what the released checkpoints carry); the values change to the nearest MXFP4 ones.
    """
    from moefleet.engine.models.mxfp4 import quantize_mxfp4

    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales = quantize_mxfp4(tensor.transpose(1, 2).contiguous())
            out[f"{name}_blocks"], out[f"{name}_scales"] = blocks, scales
        else:
            out[name] = tensor
    return out


def llama4_weights(cfg: dict, init: _Init) -> dict[str, torch.Tensor]:
    """HF Llama4ForCausalLM layout: `feed_forward.*`, experts stacked as [E, D, 2I] / [E, I, D]."""
    d, num_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    num_experts, inter = cfg["num_local_experts"], cfg["intermediate_size"]
    step = cfg.get("interleave_moe_layer_step", 1)
    moe_layers = cfg.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, num_layers, step))
    w = _embedding(init, cfg)
    for i in range(num_layers):
        p = f"model.layers.{i}"
        w.update(_layer_norms(init, p, d))
        bias = cfg.get("attention_bias", False)
        w.update(_attention(init, f"{p}.self_attn", cfg, bias=bias, o_bias=bias))
        f = f"{p}.feed_forward"
        if i in moe_layers:
            w[f"{f}.router.weight"] = init.linear(num_experts, d, gain=3.0)
            gate_up = torch.stack([init.linear(2 * inter, d) for _ in range(num_experts)])  # [E, 2I, D]
            down = torch.stack([init.linear(d, inter, gain=OUTPUT_GAIN) for _ in range(num_experts)])
            w[f"{f}.experts.gate_up_proj"] = gate_up.transpose(1, 2).contiguous()  # [E, D, 2I]
            w[f"{f}.experts.down_proj"] = down.transpose(1, 2).contiguous()  # [E, I, D]
            w.update(_mlp(init, f"{f}.shared_expert", d, inter))
        else:
            w.update(_mlp(init, f, d, cfg["intermediate_size_mlp"]))
    w.update(_final_norm_and_head(init, cfg))
    return w


EMERGING_WEIGHTS = {"glm4_moe": glm4_moe_weights, "gpt_oss": gpt_oss_weights, "llama4": llama4_weights}
