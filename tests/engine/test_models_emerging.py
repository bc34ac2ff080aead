"""GLM-4.5, gpt-oss and Llama-4 text beyond the shared parity suites (which run every named tiny config):
MXFP4 decoding against the OCP MX definition and hand-computed values, an MXFP4 gpt-oss checkpoint against
transformers on its decoded float twin, a Llama-4 vision checkpoint served as text, make_tiny_model output
transformers reads, and config errors that name the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from moefleet.engine.loader import load_model
from moefleet.engine.models.glm4_moe_config import Glm4MoeConfig
from moefleet.engine.models.gpt_oss_config import GptOssConfig
from moefleet.engine.models.llama4_config import Llama4TextConfig
from moefleet.engine.models.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from moefleet.engine.tiny_model import default_config, make_tiny_model
from safetensors.torch import load_file, save_file
from support.tiny_models import PagedDriver, one_torch_thread, tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def e2m1_reference(code: int) -> float:
    """FP4 E2M1 from the OCP MX spec: 1 sign, 2 exponent bits (bias 1), 1 mantissa bit, no inf/NaN."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    if exponent == 0:  # subnormal: 2^(1 - bias) * (0 + m/2)
        return sign * mantissa * 0.5
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa * 0.5)


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Element by element: 32 elements per block share 2^(scale - 127); byte j holds elements 2j (low
    nibble) and 2j + 1 (high nibble)."""
    flat_blocks, flat_scales = blocks.reshape(-1, 16).tolist(), scales.reshape(-1).tolist()
    out = []
    for row, scale in zip(flat_blocks, flat_scales, strict=True):
        for byte in row:
            for code in (byte & 0xF, byte >> 4):
                out.append(e2m1_reference(code) * 2.0 ** (scale - 127))
    return torch.tensor(out, dtype=torch.float32).reshape(*scales.shape[:-1], -1)


def test_mxfp4_hand_computed_values():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x21  # low nibble 1 -> +0.5, high nibble 2 -> +1.0
    blocks[0, 1] = 0xF8  # low 8 -> -0.0, high 15 -> -6.0
    blocks[0, 2] = 0x7B  # low 11 -> -1.5, high 7 -> +6.0
    blocks[0, 3] = 0x54  # low 4 -> +2.0, high 5 -> +3.0
    got = dequantize_mxfp4(blocks, torch.tensor([128], dtype=torch.uint8))  # x 2^1
    assert got.shape == (32,)
    assert got[:8].tolist() == [1.0, 2.0, -0.0, -12.0, -3.0, 12.0, 4.0, 6.0]
    assert got[8:].abs().sum() == 0
    got = dequantize_mxfp4(blocks, torch.tensor([124], dtype=torch.uint8))  # x 2^-3
    assert got[:8].tolist() == [0.0625, 0.125, -0.0, -0.75, -0.1875, 0.75, 0.25, 0.375]


def test_mxfp4_matches_the_format_definition_on_random_bytes():
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), generator=generator, dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 5, 4), generator=generator, dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (3, 5, 128)
    torch.testing.assert_close(got, mxfp4_reference(blocks, scales), rtol=0, atol=0)


def test_mxfp4_quantize_round_trips_and_rejects_bad_shapes():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    blocks, scales = quantize_mxfp4(x)
    decoded = mxfp4_reference(blocks, scales)
    # Round to nearest, saturating at 6: |amax| / 2^e < 8 clamps to 6, so the error stays below 2 x 2^e.
    step = 2.0 ** (scales.float() - 127)
    assert bool(((decoded - x).abs().reshape(6, 2, 32) < 2 * step[..., None]).all())
    assert (decoded - x).abs().mean() < 0.1
    assert bool((quantize_mxfp4(decoded)[0] == blocks).all())  # representable values are kept exactly
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(2, 20))
    with pytest.raises(ValueError, match="do not match scales"):
        dequantize_mxfp4(blocks, scales[:, :1])


def _float_twin(mxfp4_dir, out_dir):
    """The MXFP4 checkpoint with its experts decoded by the reference above, in transformers' float layout."""
    shutil.copytree(mxfp4_dir, out_dir)
    (out_dir / "model.safetensors").unlink()
    tensors = load_file(mxfp4_dir / "model.safetensors")
    out = {}
    for name, tensor in tensors.items():
        if name.endswith("_blocks"):
            base = name[: -len("_blocks")]
            matrix = mxfp4_reference(tensor, tensors[base + "_scales"])  # [E, out, in]
            out[base] = matrix.transpose(1, 2).contiguous()  # transformers: [E, in, out]
        elif not name.endswith("_scales"):
            out[name] = tensor
    save_file(out, str(out_dir / "model.safetensors"), {"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    del config["quantization_config"]
    (out_dir / "config.json").write_text(json.dumps(config))


def test_mxfp4_gpt_oss_checkpoint_equals_transformers_on_its_decoded_twin(tmp_path):
    quantized = make_tiny_model("gpt_oss", tmp_path / "mxfp4", mxfp4=True)
    names = load_file(quantized / "model.safetensors").keys()
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in names
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    _float_twin(quantized, tmp_path / "float")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32).eval()
    model = load_model(quantized, "cpu", torch.float32)
    prompt = list(range(5, 30))
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(
        PagedDriver(model).step([(0, prompt)], all_logits=True), expected, atol=2e-5, rtol=1e-5
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        greedy = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0
        )
    assert (
        PagedDriver(model).generate({0: prompt}, 10, prefill_chunks=2)[0] == greedy[0, len(prompt) :].tolist()
    )


def test_mxfp4_checkpoint_missing_scales_is_an_error(tmp_path):
    path = make_tiny_model("gpt_oss", tmp_path / "m", mxfp4=True)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.down_proj_scales"]
    save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match="missing model.layers.1.mlp.experts.down_proj_scales"):
        load_model(path)


def test_llama4_vision_checkpoint_serves_its_text_model(tmp_path):
    text_dir = tiny_model_dir("llama4_chunked")
    path = tmp_path / "vision"
    shutil.copytree(text_dir, path)
    (path / "model.safetensors").unlink()
    text_config = json.loads((text_dir / "config.json").read_text())
    config = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": {k: v for k, v in text_config.items() if k != "architectures"},
        "vision_config": {"hidden_size": 8},
    }
    (path / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, tensor in load_file(text_dir / "model.safetensors").items():
        tensors["language_model." + name] = tensor
    tensors["vision_model.patch_embedding.linear.weight"] = torch.randn(8, 12)
    tensors["multi_modal_projector.linear_1.weight"] = torch.randn(64, 8)
    save_file(tensors, str(path / "model.safetensors"), {"format": "pt"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch.float32).eval()
    prompt = list(range(7, 30))
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    got = PagedDriver(load_model(path, "cpu", torch.float32)).step([(0, prompt)], all_logits=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["glm4_moe", "gpt_oss", "llama4"])
def test_tiny_model_is_read_by_transformers_and_routes_widely(arch, tmp_path):
    path = make_tiny_model(arch, tmp_path / arch)
    config = json.loads((path / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert len(tok) == config["vocab_size"]
    _, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    model = load_model(path)
    seen: dict[str, set[int]] = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None) if arch == "llama4" else getattr(module, "gate", None)
        if hasattr(module, "experts") and router is not None:
            router.register_forward_hook(
                lambda _m, _i, out, n=name: seen.setdefault(n, set()).update(out[1].flatten().tolist())
            )
    out = PagedDriver(model).generate({0: list(range(3, 40))}, 12)[0]
    assert seen, "no MoE layer ran"
    num_experts = model.config.num_routed_experts
    assert all(len(experts) >= num_experts // 2 for experts in seen.values()), seen
    assert len(set(out)) > 3, f"greedy output is degenerate: {out}"


def _config(arch: str, **changes) -> dict:
    return {**default_config(arch, 640), **changes}


@pytest.mark.parametrize(
    ("config_class", "arch", "changes", "message"),
    [
        (Glm4MoeConfig, "glm4_moe", {"partial_rotary_factor": 0}, "partial_rotary_factor"),
        (Glm4MoeConfig, "glm4_moe", {"num_key_value_heads": 3}, "not divisible by num_key_value_heads"),
        (GptOssConfig, "gpt_oss", {"layer_types": ["sliding_attention"]}, "layer_types must list one of"),
        (GptOssConfig, "gpt_oss", {"sliding_window": None}, "sliding_window must be >= 1"),
        (
            GptOssConfig,
            "gpt_oss",
            {"quantization_config": {"quant_method": "fp8"}},
            "quant_method 'fp8'.*supported are unquantized checkpoints and the released MXFP4",
        ),
        (GptOssConfig, "gpt_oss", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        (Llama4TextConfig, "llama4", {"no_rope_layers": [1, 0]}, "no_rope_layers must give 1"),
        (Llama4TextConfig, "llama4", {"attention_chunk_size": 0}, "attention_chunk_size"),
        (
            Llama4TextConfig,
            "llama4",
            {"intermediate_size_mlp": None},
            "missing the required field 'intermediate_size_mlp'",
        ),
    ],
)
def test_config_errors_name_the_field(config_class, arch, changes, message):
    with pytest.raises(ValueError, match=message):
        config_class.from_dict(_config(arch, **changes))


def test_llama4_top_k_above_one_is_refused():
    with pytest.raises(ValueError, match="num_experts_per_tok 2 is not supported for Llama-4"):
        load_model_config = Llama4TextConfig.from_dict(_config("llama4", num_experts_per_tok=2))
        from moefleet.engine.models.llama4 import Llama4ForCausalLM

        Llama4ForCausalLM(load_model_config)


def test_config_defaults_follow_transformers():
    gpt = GptOssConfig.from_dict(
        {k: v for k, v in _config("gpt_oss").items() if k not in ("rope_scaling", "layer_types")}
    )
    assert (
        gpt.rope_scaling.rope_type == "yarn"
        and gpt.rope_scaling.factor == 32.0
        and not gpt.rope_scaling.truncate
    )
    assert gpt.rope_theta == 150000.0 and gpt.layer_types == ["sliding_attention", "full_attention"]
    llama = Llama4TextConfig.from_dict(
        {
            k: v
            for k, v in _config("llama4", num_hidden_layers=8).items()
            if k not in ("no_rope_layers", "attention_chunk_size")
        }
    )
    assert llama.no_rope_layers == [1, 1, 1, 0, 1, 1, 1, 0] and llama.moe_layers == [1, 3, 5, 7]
    assert llama.attention_chunk_size == 8192 and llama.layer_types[3] == "full_attention"
    # A null attention_chunk_size means no chunked layer (transformers >= 5.24's default; 5.17 derived
    # chunked layers from no_rope_layers regardless and then failed on the null size).
    unchunked = Llama4TextConfig.from_dict(
        {**_config("llama4", num_hidden_layers=4, no_rope_layers=[1, 0, 1, 0]), "attention_chunk_size": None}
    )
    assert unchunked.layer_types == ["full_attention"] * 4
    assert [unchunked.layer_chunk(i) for i in range(4)] == [None] * 4
    glm = Glm4MoeConfig.from_dict(
        {k: v for k, v in _config("glm4_moe").items() if k != "partial_rotary_factor"}
    )
    assert glm.rotary_dim == glm.head_dim // 2


# gpt-oss ships an o200k-style tokenizer.json (a regex Split, then byte-level without its own regex) and a
# harmony chat template in chat_template.jinja; this is a small tokenizer of that shape.
O200K_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
HARMONY_SPECIALS = ["<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>"]
HARMONY_TEMPLATE = """{%- set effort = reasoning_effort | default("medium") -%}
<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}

Reasoning: {{ effort }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{%- for message in messages -%}
{%- if message.role in ["system", "developer"] -%}
<|start|>developer<|message|># Instructions

{{ message.content }}<|end|>
{%- elif message.role == "assistant" -%}
<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
{%- else -%}
<|start|>{{ message.role }}<|message|>{{ message.content }}<|end|>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"""


def _harmony_tokenizer(out_dir):
    from moefleet.engine.tiny_model import CORPUS
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=HARMONY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    out_dir.mkdir()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 131072,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(t)): {"content": t, "special": True, "normalized": False}
            for t in HARMONY_SPECIALS
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (out_dir / "chat_template.jinja").write_text(HARMONY_TEMPLATE)
    return out_dir


def test_gpt_oss_style_tokenizer_and_harmony_template_match_transformers(tmp_path):
    from moefleet.engine.tokenizer import Tokenizer

    path = _harmony_tokenizer(tmp_path / "harmony")
    ours, hf = Tokenizer(str(path)), transformers.AutoTokenizer.from_pretrained(path)
    text = "Don't stop: 12345 knights rode 3 days.\n\nWhat's the capital of France?"
    assert ours.encode(text) == hf(text)["input_ids"] and ours.decode(ours.encode(text)) == text
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
    ]
    for kwargs in ({}, {"reasoning_effort": "high"}):
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        got = ours.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        assert got == expected
        assert ours.decode(got, skip_special_tokens=False).endswith("<|end|><|start|>assistant")
        assert got.count(ours.token_to_id("<|start|>")) == 6  # system, 4 messages, generation prompt
    assert "Reasoning: high" in ours.render_chat(messages, reasoning_effort="high")
    assert ours.eos_token == "<|return|>"


@pytest.mark.parametrize("mxfp4", [False, True], ids=["float", "mxfp4"])
def test_gpt_oss_expert_parallel_rank_holds_its_experts_and_biases(tmp_path, mxfp4):
    """Rank 1 of EP4 over 8 experts holds experts 2 and 3 (weights, biases) exactly as the one-rank model."""
    from moefleet.engine import topology

    path = make_tiny_model("gpt_oss", tmp_path / "g", mxfp4=mxfp4)
    full = load_model(path)
    topology.set_current(topology.Topology.for_rank(1, 4))
    try:
        shard = load_model(path)
    finally:
        topology.set_current(topology.Topology())
    for layer in range(2):
        ours = shard.get_submodule(f"model.layers.{layer}.mlp.experts")
        ref = full.get_submodule(f"model.layers.{layer}.mlp.experts")
        assert ours.local_experts == [2, 3] and ours.w13.shape[0] == 2
        for name in ("w13", "w2", "w13_bias", "w2_bias"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name)[2:4], rtol=0, atol=0)
    # The one-rank model's expert 3 is transformers' expert 3: gate = even columns, up = odd columns.
    tensors = load_file(path / "model.safetensors")
    if not mxfp4:
        gate_up = tensors["model.layers.1.mlp.experts.gate_up_proj"][3]  # [D, 2I]
        inter = gate_up.shape[1] // 2
        experts = full.get_submodule("model.layers.1.mlp.experts")
        torch.testing.assert_close(experts.w13[3, :inter], gate_up[:, 0::2].T, rtol=0, atol=0)
        torch.testing.assert_close(experts.w13[3, inter:], gate_up[:, 1::2].T, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["glm4_flat", "gpt_oss_full_first", "llama4_all_moe"])
def test_transformers_saved_checkpoint_loads(name, tmp_path):
    """What transformers' save_pretrained writes (GLM: stacked experts in v5) loads to transformers' logits."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(name), dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "saved")
    prompt = list(range(11, 33))
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    got = PagedDriver(load_model(tmp_path / "saved", "cpu", torch.float32)).step(
        [(0, prompt)], all_logits=True
    )
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_biased_clamped_experts_paths_match_the_formula():
    """Padded and loop paths both equal the gpt-oss expert written out per row."""
    from moefleet.engine.layers.experts_variants import BiasedClampedExperts

    g = torch.Generator().manual_seed(3)
    experts = BiasedClampedExperts(range(4, 7), hidden_size=8, intermediate_size=5, alpha=1.702, limit=1.5)
    for param in experts.parameters():
        param.copy_(torch.randn(param.shape, generator=g))
    counts = [3, 0, 2]
    hidden = torch.randn(sum(counts), 8, generator=g)
    expected = []
    for row, local in zip(hidden, [0, 0, 0, 2, 2], strict=True):
        gate_up = experts.w13[local] @ row + experts.w13_bias[local]
        gate, up = gate_up[:5].clamp(max=1.5), gate_up[5:].clamp(-1.5, 1.5)
        act = (up + 1) * gate * torch.sigmoid(1.702 * gate)
        expected.append(experts.w2[local] @ act + experts.w2_bias[local])
    for path in (experts.forward_padded, experts.forward_loop, experts.forward):
        torch.testing.assert_close(path(hidden, counts), torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert experts(hidden[:0], [0, 0, 0]).shape == (0, 8)


def test_gpt_oss_swiglu_limit_and_alpha_come_from_the_config(tmp_path):
    """config.json swiglu_limit / swiglu_alpha reach the experts and match transformers where it reads them
    (5.24 does; 5.17 hard-codes 7.0 and 1.702, which every released checkpoint states)."""
    from moefleet.engine.layers.experts_variants import BiasedClampedExperts

    path = make_tiny_model("gpt_oss", tmp_path / "g", swiglu_limit=0.5, swiglu_alpha=1.5)
    model = load_model(path, "cpu", torch.float32)
    experts = [m for m in model.modules() if isinstance(m, BiasedClampedExperts)]
    assert len(experts) == 2 and all((e.limit, e.alpha) == (0.5, 1.5) for e in experts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_experts = hf.model.layers[0].mlp.experts
    if (hf_experts.limit, hf_experts.alpha) != (0.5, 1.5):
        pytest.skip(f"transformers {transformers.__version__} ignores config swiglu_limit / swiglu_alpha")
    prompt = list(range(5, 30))
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    got = PagedDriver(model).step([(0, prompt)], all_logits=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt_oss_sliding", "llama4_all_moe"])
def test_models_with_host_synchronising_layers_are_never_graph_captured(name):
    """gpt-oss attention runs in the backend (graph-safe), but its biased experts read row counts on the host;
    Llama-4's chunked attention path builds index maps on the host: the model runner must run both eagerly."""
    model = load_model(tiny_model_dir(name))
    assert not all(getattr(m, "supports_cuda_graphs", True) for m in model.modules())
    if name.startswith("gpt_oss"):
        from moefleet.engine.layers.attention import PagedAttention

        layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
        assert [m.sliding_window for m in layers] == [5, None]  # layer_types: sliding, full


@pytest.mark.parametrize("name", ["gpt_oss_sliding", "gpt_oss_full_first"])
def test_gpt_oss_through_the_triton_attention_backend_equals_transformers(name):
    """gpt-oss's window and sinks in the Triton paged kernels (TRITON_INTERPRET on CPU): prefill logits,
    then chunked prefill + decode greedy tokens, equal transformers in float32."""
    pytest.importorskip("moefleet.engine.kernels.paged_attention")
    from moefleet.engine.attention.triton_backend import TritonAttentionBackend

    path = tiny_model_dir(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = list(range(5, 25))  # longer than both sliding windows (5 and 7)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = hf(ids).logits[0]
        greedy = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    model = load_model(path, "cpu", torch.float32)
    driver = PagedDriver(model, num_blocks=32, block_size=16, attn_backend=TritonAttentionBackend())
    torch.testing.assert_close(driver.step([(0, prompt)], all_logits=True), expected, atol=5e-5, rtol=1e-5)
    driver = PagedDriver(model, num_blocks=32, block_size=16, attn_backend=TritonAttentionBackend())
    assert driver.generate({0: prompt}, 8, prefill_chunks=2)[0] == greedy
