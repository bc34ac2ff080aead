"""Structured outputs in the engine: grammars compiled by xgrammar and applied as a batched token bitmask
force every output to match (regex, choice, JSON schema), also under chunked prefill and preemption, while
unconstrained requests in the same batch are untouched (greedy equals the unconstrained run)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from moefleet.engine import LLM, SamplingParams
from moefleet.engine.sampling_params import StructuredOutput
from moefleet.engine.structured_output import GrammarCompiler, GrammarError, json_schema_grammar
from support.tiny_models import one_torch_thread, tiny_model_dir

xgrammar = pytest.importorskip("xgrammar")

pytestmark = pytest.mark.timeout(300)

NAME = "qwen3_norm_topk"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "n": {"type": "integer", "minimum": 0, "maximum": 50},
        "tag": {"enum": ["x", "y"]},
    },
    "required": ["name", "n", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def compiler():
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tiny_model_dir(NAME) / "tokenizer.json"))
    return GrammarCompiler(backend, backend.get_vocab_size(), [backend.token_to_id("<|endoftext|>")]), backend


def allowed_after(compiler_and_backend, spec: StructuredOutput, prefix: str) -> list[int]:
    compiler, backend = compiler_and_backend
    matcher = xgrammar.GrammarMatcher(compiler.compile(spec))
    assert matcher.accept_string(prefix)
    vocab = compiler.vocab_size
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    matcher.fill_next_token_bitmask(bitmask)
    logits = torch.zeros(1, vocab)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask)
    return [i for i in range(vocab) if logits[0, i] > float("-inf")]


def test_length_bounded_strings_admit_no_control_characters(compiler):
    """xgrammar 0.2.9 lets raw control characters into minLength/maxLength strings; the grammar is patched."""
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    backend = compiler[1]
    allowed = allowed_after(compiler, spec, '{"name": "')
    assert allowed and not [i for i in allowed if any(ord(c) < 32 for c in backend.decode([i]))]
    assert "\\x1f" in json_schema_grammar(json.dumps(SCHEMA))


def test_bad_grammars_raise_grammar_error(compiler):
    with pytest.raises(GrammarError, match="regex"):
        compiler[0].compile(StructuredOutput("regex", "(unclosed"))
    with pytest.raises(GrammarError, match="json_schema"):
        compiler[0].compile(StructuredOutput("json_schema", "{not json"))
    with pytest.raises(GrammarError, match="guided_choice"):
        compiler[0].compile(StructuredOutput("choice", "[]"))


def test_engine_outputs_follow_their_grammar_under_preemption():
    llm = LLM(
        str(tiny_model_dir(NAME)),
        dtype="float32",
        max_model_len=128,
        block_size=4,
        num_kv_blocks=24,
        max_num_batched_tokens=16,
        max_num_seqs=8,
    )
    regex = r"[a-z]{3}-[0-9]{2}"
    specs = [
        StructuredOutput("regex", regex),
        StructuredOutput("choice", json.dumps(["alpha", "beta", "gamma"])),
        StructuredOutput("json_schema", json.dumps(SCHEMA)),
        None,
    ] * 2
    prompts = [list(range(10 + 7 * i, 30 + 7 * i)) for i in range(len(specs))]
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured=spec)
        for i, spec in enumerate(specs)
    ]
    plain = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    params[3] = params[7] = plain
    results = llm.generate(prompts, params)
    for spec, result in zip(specs, results, strict=True):
        if spec is None:
            continue
        assert result.finish_reason == "stop", result.text  # the grammar ended and EOS followed
        if spec.kind == "regex":
            assert re.fullmatch(regex, result.text)
        elif spec.kind == "choice":
            assert result.text in {"alpha", "beta", "gamma"}
        else:
            value = json.loads(result.text)
            assert set(value) == {"name", "n", "tag"} and 0 <= value["n"] <= 50 and len(value["name"]) <= 5
    # Unconstrained rows of the same batches are untouched: equal to running them alone.
    alone = LLM(str(tiny_model_dir(NAME)), dtype="float32", max_model_len=128).generate(
        [prompts[3], prompts[7]], plain
    )
    assert [r.token_ids for r in alone] == [results[3].token_ids, results[7].token_ids]
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert not llm.engine.model_runner.grammar._matchers  # released with their sequences
