"""Kimi-K2-style tiktoken tokenizers (`tiktoken.model`, no tokenizer.json) on a tiny checkpoint made by
`make-tiny-model --arch kimi_k2`: the files are read as data (tokenization_kimi.py is never run).

Oracles: a tiktoken Encoding the test builds itself from the files (its own parser, Kimi's pattern written
out here from tokenization_kimi.py, special ids from added_tokens_decoder), exact round trips, and
transformers' DeepSeek-V3 model for greedy output.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from moefleet.engine.tokenizer import Tokenizer
from support.tiny_models import one_torch_thread

tiktoken = pytest.importorskip("tiktoken")

TEXTS = [
    "Hello, how are you today?",
    "中文English混合 and 北京市 Pascal",
    "  leading spaces\n\n\ttabs and\r\nnewlines   ",
    "numbers 1234567 and ünïcödé 🐉 emoji",
    "",
]
# tokenization_kimi.py's pat_str, written out independently of engine/tiktoken_vocab.py
PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    from moefleet.engine.tiny_model import make_tiny_model

    return make_tiny_model("kimi_k2", tmp_path_factory.mktemp("kimi") / "tiny-kimi")


@pytest.fixture(scope="module")
def oracle(kimi_dir):
    ranks = {}
    for line in (kimi_dir / "tiktoken.model").read_text().splitlines():
        token, rank = line.split(" ")
        ranks[base64.b64decode(token)] = int(rank)
    config = json.loads((kimi_dir / "tokenizer_config.json").read_text())
    names = {int(i): e["content"] for i, e in config["added_tokens_decoder"].items()}
    special = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(len(ranks), len(ranks) + 258)}
    return tiktoken.Encoding(
        "oracle", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=special
    ), special


def test_checkpoint_has_no_tokenizer_json_and_loads(kimi_dir):
    assert not (kimi_dir / "tokenizer.json").exists() and (kimi_dir / "tiktoken.model").is_file()
    tok = Tokenizer(kimi_dir)
    config = json.loads((kimi_dir / "config.json").read_text())
    assert tok.vocab_size == config["vocab_size"]
    assert tok.bos_token == "[BOS]" and tok.bos_token_id == config["bos_token_id"]
    # tokenizer EOS first, then generation_config's (<|im_end|>, what the chat model emits)
    assert tok.eos_token_ids == [tok.token_to_id("[EOS]"), config["eos_token_id"]]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_equal_the_oracle(kimi_dir, oracle, text):
    tok = Tokenizer(kimi_dir)
    encoding, _ = oracle
    ids = tok.encode(text)
    assert ids == encoding.encode(text, allowed_special="all")
    assert tok.decode(ids) == text
    assert (not text) or ids[0] != tok.bos_token_id  # no BOS for completions (as Kimi's tokenizer class)


def test_han_runs_are_their_own_pieces(kimi_dir):
    # Kimi's first branch: a run of Han characters never shares a pre-token (so never a token) with letters.
    tok = Tokenizer(kimi_dir)
    ids = tok.encode("中文English混合")
    raw = [tok._tokenizer.encoding.decode_single_token_bytes(i) for i in ids]
    assert b"".join(raw).decode("utf-8") == "中文English混合"
    assert all(all(b >= 0x80 for b in r) or all(b < 0x80 for b in r) for r in raw), raw


def test_special_tokens(kimi_dir, oracle):
    tok = Tokenizer(kimi_dir)
    _, special = oracle
    text = "<|im_user|>user<|im_middle|>Hi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == special["<|im_user|>"] and ids[-1] == special["<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "userHi"
    assert tok.token_to_id(f"<|reserved_token_{tok.vocab_size - 1}|>") == tok.vocab_size - 1
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert chat[0] == special["<|im_system|>"]
    assert chat[-3:] == [special["<|im_assistant|>"], *tok.encode("assistant"), special["<|im_middle|>"]][-3:]


def test_greedy_generation_equals_transformers(kimi_dir):
    pytest.importorskip("transformers")
    from moefleet.engine import LLM, SamplingParams
    from support.reference import transformers_greedy

    tok = Tokenizer(kimi_dir)
    prompts = [tok.encode("Once upon a time there was"), tok.encode("中文 and numbers 12345")]
    with one_torch_thread():
        expected = transformers_greedy(kimi_dir, prompts, 8)
        llm = LLM(str(kimi_dir), max_num_seqs=4, max_num_batched_tokens=64)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        results = llm.generate(["Once upon a time there was", "中文 and numbers 12345"], params)
    assert [r.prompt_token_ids for r in results] == prompts
    assert [r.token_ids for r in results] == expected
    assert results[0].text == tok.decode(expected[0])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_serve_tiny_kimi_chat_with_openai_client(kimi_dir):
    import openai
    from server.conftest import wait_for_banner_url

    moefleet = str(Path(sys.executable).with_name("moefleet"))
    process = subprocess.Popen(
        [
            moefleet,
            "serve",
            "--model",
            str(kimi_dir),
            "--port",
            "0",
            "--log-level",
            "warning",
            "--print-examples",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        base_url = wait_for_banner_url(process)
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="none")
        reply = client.chat.completions.create(
            model="tiny-kimi", messages=[{"role": "user", "content": "Hello!"}], max_tokens=5, temperature=0
        )
        assert reply.choices[0].message.role == "assistant"
        tok = Tokenizer(kimi_dir)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Hello!"}])
        assert reply.usage.prompt_tokens == len(prompt)
        assert 1 <= reply.usage.completion_tokens <= 5
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
    assert process.returncode == 0


def test_incremental_detokenizer_waits_for_whole_characters(kimi_dir):
    from moefleet.engine.detokenizer import IncrementalDetokenizer
    from moefleet.engine.sampling_params import SamplingParams

    tok = Tokenizer(kimi_dir)
    text = "你好世界 🐉 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several byte tokens here
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"), SamplingParams(max_tokens=len(ids)), [])
    deltas = [detok.update(i)[0] for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_bos_only_where_special_tokens_pattern_asks(kimi_dir, tmp_path):
    import shutil

    tok = Tokenizer(kimi_dir)
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)  # Kimi: no pattern, no BOS
    other = tmp_path / "bos"
    shutil.copytree(kimi_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["special_tokens_pattern"] = "bos"  # what transformers' PreTrainedTokenizer honours
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with_bos = Tokenizer(other)
    assert with_bos.encode("Hello") == [with_bos.bos_token_id, *tok.encode("Hello")]
    assert with_bos.encode("Hello", add_special_tokens=False) == tok.encode("Hello")
    config["special_tokens_pattern"] = "cls_sep"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="special_tokens_pattern 'cls_sep' is not supported"):
        Tokenizer(other)
