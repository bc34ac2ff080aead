"""Tokenizer: encode/decode and chat templates give the same ids as transformers' AutoTokenizer."""

import json
import shutil

import pytest
from moefleet.engine.tiny_model import make_tiny_model
from moefleet.engine.tokenizer import Tokenizer
from transformers import AutoTokenizer

MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Hello there, héllo 世界 🙂"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What is the capital of France?"},
]

# Exercises what real templates use: bos/eos globals, namespace, loop controls, tojson, raise_exception.
RICH_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{% if m['role'] == 'system' %}{% set ns.n = ns.n + 1 %}{% continue %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3")


def hf_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_encode_decode_match_transformers(model_dir):
    ours, theirs = Tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    for text in [
        "The quick brown fox.",
        "héllo 世界 🙂  spaces\n\ttabs",
        "<|im_start|>user\nhi<|im_end|>",
        "",
    ]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)


def test_special_tokens_and_eos_ids(model_dir):
    ours, theirs = Tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert ours.eos_token == theirs.eos_token
    assert ours.eos_token_id == theirs.eos_token_id
    generation = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    expected = generation if isinstance(generation, list) else [generation]
    assert set(ours.eos_token_ids) == set(expected) | {theirs.eos_token_id}


def test_chat_template_matches_transformers(model_dir):
    ours, theirs = Tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert ours.apply_chat_template(MESSAGES) == hf_ids(theirs, MESSAGES)
    assert ours.render_chat(MESSAGES, add_generation_prompt=False) == theirs.apply_chat_template(
        MESSAGES, add_generation_prompt=False, tokenize=False
    )


def test_rich_template_matches_transformers(model_dir, tmp_path):
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json", "config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.update(chat_template=RICH_TEMPLATE, bos_token="<|endoftext|>", add_bos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <b>"}}]
    assert ours.apply_chat_template(MESSAGES, tools=tools) == hf_ids(theirs, MESSAGES, tools=tools)
    assert ours.render_chat(MESSAGES).startswith("<|endoftext|>")
    assert ours.bos_token_id == theirs.bos_token_id == 0
    assert ours.encode("Hello world") == theirs.encode("Hello world")
    with pytest.raises(ValueError, match="chat template rejected the messages: bad role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_missing_chat_template_is_a_clear_error(model_dir, tmp_path):
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tmp_path).apply_chat_template(MESSAGES)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="neither tokenizer.json nor tiktoken.model"):
        Tokenizer(tmp_path)
