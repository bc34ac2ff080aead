"""load_model: config errors, sharded safetensors, skipped tensors, expert-parallel local loading, bfloat16."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from moefleet.engine import topology
from moefleet.engine.loader import iter_weights, load_model, safetensors_files
from moefleet.engine.topology import Topology
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.tiny_models import PagedDriver, one_torch_thread, tiny_model_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def all_tensors(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(path):
        out.update(load_file(str(f)))
    return out


def copy_checkpoint(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(tiny_model_dir(name), dst)
    return dst


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json' is missing"):
        load_model(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(
        ValueError,
        match="'LlamaForCausalLM'.*supported: DeepseekV3ForCausalLM, Glm4MoeForCausalLM, GptOssForCausalLM, "
        "Llama4ForCausalLM, Llama4ForConditionalGeneration, Qwen3MoeForCausalLM",
    ):
        load_model(tmp_path)


def test_missing_required_field_is_named(tmp_path):
    path = copy_checkpoint("deepseek_grouped", tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["kv_lora_rank"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'kv_lora_rank'"):
        load_model(path)


def test_sharded_checkpoint_loads_every_tensor():
    path = tiny_model_dir("qwen3_sparse_step")
    assert (path / "model.safetensors.index.json").is_file() and len(safetensors_files(path)) == 2
    model = load_model(path)
    tensors = all_tensors(path)
    params = dict(model.named_parameters())
    torch.testing.assert_close(
        params["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight"]
    )
    # Tied head: no lm_head tensor in the checkpoint, the head shares the embedding.
    assert "lm_head.weight" not in tensors and model.lm_head.weight is model.model.embed_tokens.weight
    # Layer 1 is sparse; layer 3 is mlp-only; 0 and 2 are dense by decoder_sparse_step.
    experts = model.get_submodule("model.layers.1.mlp.experts")
    e3 = tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    torch.testing.assert_close(experts.w13[3, experts.intermediate_size :], e3)
    for layer in (0, 2, 3):
        assert f"model.layers.{layer}.mlp.gate_proj.weight" in tensors


def test_mtp_layers_and_rotary_buffers_are_skipped():
    path = tiny_model_dir("deepseek_grouped")
    names = set(all_tensors(path))
    assert any(n.startswith("model.layers.3.") for n in names)  # the MTP layer is in the checkpoint
    model = load_model(path)
    assert model.skip_weight("model.layers.3.eh_proj.weight")
    assert model.skip_weight("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert not model.skip_weight("model.layers.2.mlp.experts.0.up_proj.weight")


def test_unknown_and_missing_tensors_are_errors(tmp_path):
    path = copy_checkpoint("qwen3_norm_topk", tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    save_file({**tensors, "model.layers.0.mlp.weird.weight": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.weird.weight' matches no parameter"):
        load_model(path)
    del tensors["model.layers.1.mlp.experts.5.down_proj.weight"]
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing 2 tensors: model.norm.weight.*expert 5 down_proj"):
        load_model(path)


def test_expert_parallel_rank_reads_only_its_experts():
    path = tiny_model_dir("deepseek_grouped")  # 16 routed experts
    topology.set_current(Topology.for_rank(1, 4))
    try:
        model = load_model(path)
        read = [name for name, _ in iter_weights(safetensors_files(path), model)]
    finally:
        topology.set_current(Topology())
    experts_read = {int(n.split(".experts.")[1].split(".")[0]) for n in read if ".experts." in n}
    assert experts_read == {4, 5, 6, 7}
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert experts.w2.shape[0] == 4
    with safe_open(str(safetensors_files(path)[0]), "pt") as f:
        down6 = f.get_tensor("model.layers.1.mlp.experts.6.down_proj.weight")
    torch.testing.assert_close(experts.w2[2], down6)


def test_transformers_saved_checkpoint_loads(tmp_path):
    """Whatever layout transformers' save_pretrained writes (stacked experts in v5) loads to the same logits."""
    transformers = pytest.importorskip("transformers")
    src = tiny_model_dir("qwen3_norm_topk")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hf.save_pretrained(tmp_path / "resaved")
    shutil.copy(src / "tokenizer.json", tmp_path / "resaved")
    prompt = [5, 60, 70, 80, 9]
    expected = PagedDriver(load_model(src)).step([(0, prompt)], all_logits=True)
    got = PagedDriver(load_model(tmp_path / "resaved")).step([(0, prompt)], all_logits=True)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["qwen3_norm_topk", "deepseek_yarn"])
def test_bfloat16_loads_and_generates_like_float32(name):
    path = tiny_model_dir(name)
    model16 = load_model(path, "cpu", "bfloat16")
    assert model16.model.embed_tokens.weight.dtype == torch.bfloat16
    gates = [m.weight.dtype for n, m in model16.named_modules() if n.endswith("mlp.gate")]
    assert gates and all(
        g == (torch.float32 if name.startswith("deepseek") else torch.bfloat16) for g in gates
    )
    prompt = list(range(10, 40))
    driver16 = PagedDriver(model16, dtype=torch.bfloat16)
    logits16 = driver16.step([(0, prompt)], all_logits=True)
    logits32 = PagedDriver(load_model(path)).step([(0, prompt)], all_logits=True)
    assert logits16.dtype == torch.float32 and torch.isfinite(logits16).all()
    agree = (logits16.argmax(-1) == logits32.argmax(-1)).float().mean()
    assert agree >= 0.8, f"bf16 top-1 agrees with fp32 on only {agree:.0%} of positions"
    out = driver16.generate({1: prompt[:7]}, 6)[1]
    assert len(out) == 6


def test_stacked_expert_tensors_load(tmp_path):
    """`mlp.experts.gate_up_proj` [E, 2I, D] / `mlp.experts.down_proj` [E, D, I] (transformers>=5 in-memory names)."""
    path = copy_checkpoint("qwen3_norm_topk", tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up, down = [], []
        for e in range(8):
            gate = tensors.pop(f"{p}.{e}.gate_proj.weight")
            up = tensors.pop(f"{p}.{e}.up_proj.weight")
            gate_up.append(torch.cat([gate, up]))
            down.append(tensors.pop(f"{p}.{e}.down_proj.weight"))
        tensors[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{p}.down_proj"] = torch.stack(down)
    save_file(tensors, str(path / "model.safetensors"))
    prompt = [5, 60, 70, 80, 9]
    expected = PagedDriver(load_model(tiny_model_dir("qwen3_norm_topk"))).step([(0, prompt)], all_logits=True)
    torch.testing.assert_close(PagedDriver(load_model(path)).step([(0, prompt)], all_logits=True), expected)
