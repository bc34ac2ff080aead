"""make_tiny_model: HF-format files transformers can read, a matching tokenizer, spread routing, sharding."""

from __future__ import annotations

import json

import pytest
import torch
from moefleet.engine.loader import load_model, safetensors_files
from moefleet.engine.tiny_model import SPECIAL_TOKENS, make_tiny_model
from support.tiny_models import PagedDriver, one_torch_thread

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def tiny(request, tmp_path_factory):
    return request.param, make_tiny_model(request.param, tmp_path_factory.mktemp(request.param), seed=0)


def test_config_and_tokenizer_agree_and_transformers_reads_them(tiny):
    arch, path = tiny
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch and config["torch_dtype"] == "float32"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == config["vocab_size"] and 300 <= config["vocab_size"] <= 1000
    assert tok.eos_token == "<|im_end|>" and config["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert all(tok.convert_tokens_to_ids(t) < config["vocab_size"] for t in SPECIAL_TOKENS)
    text = "Hello, how are you today?"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    hf_config = transformers.AutoConfig.from_pretrained(path)
    assert hf_config.vocab_size == config["vocab_size"]
    generation = json.loads((path / "generation_config.json").read_text())
    assert config["eos_token_id"] in generation["eos_token_id"]


def test_routing_spreads_over_experts_and_greedy_output_varies(tiny):
    _, path = tiny
    model = load_model(path)
    seen: dict[str, set[int]] = {}

    def record(name):
        def hook(_module, _inputs, output):
            seen.setdefault(name, set()).update(output[1].flatten().tolist())

        return hook

    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.register_forward_hook(record(name))
    out = PagedDriver(model).generate({0: list(range(3, 40))}, 12)[0]
    assert seen, "no MoE layer ran"
    for name, experts in seen.items():
        num_experts = model.get_submodule(name).config.num_experts
        assert len(experts) >= num_experts // 2, f"{name} used only experts {sorted(experts)}"
    assert len(set(out)) > 3, f"greedy output is degenerate: {out}"


def test_sharding_and_determinism(tmp_path):
    a = make_tiny_model("qwen3_moe", tmp_path / "a", seed=1, shards=3)
    assert len(safetensors_files(a)) == 3 and (a / "model.safetensors.index.json").is_file()
    b = make_tiny_model("qwen3_moe", tmp_path / "b", seed=1)
    c = make_tiny_model("qwen3_moe", tmp_path / "c", seed=2)
    assert safetensors_files(b) == [b / "model.safetensors"]
    prompt = [(0, [4, 50, 60])]
    la, lb, lc = (PagedDriver(load_model(p)).step(prompt) for p in (a, b, c))
    assert torch.equal(la, lb) and not torch.equal(lb, lc)


def test_overrides_and_errors(tmp_path):
    path = make_tiny_model("deepseek_v3", tmp_path / "d", num_hidden_layers=2, q_lora_rank=None)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["q_lora_rank"] is None
    assert load_model(path).config.q_lora_rank is None
    with pytest.raises(ValueError, match="unknown arch 'llama'.*qwen3_moe, deepseek_v3"):
        make_tiny_model("llama", tmp_path / "x")
