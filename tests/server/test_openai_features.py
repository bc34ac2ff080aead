"""The official openai SDK against the real engine on a tiny model (float32, CPU): logprobs (completions and
chat, streamed and not, echo with prompt logprobs) equal transformers' log_softmax to 1e-5; n > 1 with a seed
equals single requests with per-choice seeds; structured outputs (json_schema at 16 concurrent requests,
`beta.chat.completions.parse`, json_object, guided regex/choice); forced tool calls; /v1/models, /tokenize,
/detokenize. Tool-call and reasoning streaming as OpenAI sends it runs over a scripted fake engine."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import httpx
import openai
import pytest
import torch
from moefleet.engine.config import EngineConfig
from moefleet.engine.llm_engine import LLMEngine
from moefleet.engine.server.async_engine import LocalEngineClient
from pydantic import BaseModel, Field
from server.conftest import serve_app, serve_fake_engine
from support.tiny_models import one_torch_thread, tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

NAME = "qwen3_norm_topk"
PROMPT = list(range(40, 60))
USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def server():
    # A small prefill budget: prompts are prefilled in chunks (prompt logprobs span chunks).
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model_dir(NAME)),
            dtype="float32",
            max_model_len=256,
            max_num_batched_tokens=32,
            max_num_seqs=32,
        )
    )
    with serve_app(LocalEngineClient(engine), served_model_name=NAME) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_logprobs():
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir(NAME), dtype=torch.float32).eval()

    def run(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([token_ids])).logits[0].float().log_softmax(dim=-1)

    return run


def _tokenize(server, **body) -> list[int]:
    return httpx.post(server.base_url + "/tokenize", json=body, timeout=30).json()["tokens"]


# ---- logprobs ------------------------------------------------------------------------------------------


def test_completion_logprobs_match_transformers(client, hf_logprobs):
    out = client.completions.create(
        model=NAME,
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"return_token_ids": True},
    )
    choice = out.choices[0]
    tokens = choice.model_extra["token_ids"]
    ref = hf_logprobs(PROMPT + tokens)
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(tokens) == 5
    for j, token in enumerate(tokens):
        row = ref[len(PROMPT) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(float(row[token]), abs=1e-5)
        assert max(lp.top_logprobs[j].values()) == pytest.approx(float(row.max()), abs=1e-5)
        assert len(lp.top_logprobs[j]) >= 3 - 1  # distinct token texts (one may merge with the chosen)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == choice.text


def test_echo_returns_prompt_logprobs_like_transformers(client, hf_logprobs):
    prompt_text = "The knight rode through the forest for many days."
    out = client.completions.create(
        model=NAME, prompt=prompt_text, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    choice = out.choices[0]
    assert choice.text.startswith(prompt_text)
    ids = client.completions.create(
        model=NAME, prompt=prompt_text, max_tokens=1, temperature=0, extra_body={"return_token_ids": True}
    )
    prompt_ids = ids.model_extra["prompt_token_ids"]
    all_ids = prompt_ids + ids.choices[0].model_extra["token_ids"]
    ref = hf_logprobs(all_ids)
    lp = choice.logprobs
    assert (
        len(lp.token_logprobs) == len(all_ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    )
    for p in range(1, len(all_ids)):
        assert lp.token_logprobs[p] == pytest.approx(float(ref[p - 1, all_ids[p]]), abs=1e-5)


def test_streamed_completion_logprobs_equal_unstreamed(client):
    kwargs = dict(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    streamed, text = [], ""
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                streamed += choice.logprobs.token_logprobs
    assert text == whole.text
    assert streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_match_transformers(server, client, hf_logprobs, stream):
    prompt_ids = _tokenize(server, messages=USER)
    kwargs = dict(model=NAME, messages=USER, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    if stream:
        entries = []
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                if choice.logprobs is not None:
                    entries += choice.logprobs.content
    else:
        entries = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(entries) == 5
    # Recover the ids through the greedy choice: the top-1 alternative is the sampled token (temperature 0).
    ids = list(prompt_ids)
    for entry in entries:
        row = hf_logprobs(ids)[-1]
        token = int(row.argmax())
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=1e-5)
        assert entry.top_logprobs[0].token == entry.token and bytes(entry.bytes) == entry.token.encode()
        ids.append(token)


# ---- n > 1 ----------------------------------------------------------------------------------------------


def test_n_choices_with_a_seed_equal_single_requests_with_per_choice_seeds(client):
    kwargs = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=1.0, extra_body={"ignore_eos": True})
    together = client.completions.create(n=3, seed=11, **kwargs)
    assert [c.index for c in together.choices] == [0, 1, 2]
    singles = [client.completions.create(seed=11 + i, **kwargs).choices[0].text for i in range(3)]
    assert [c.text for c in together.choices] == singles
    assert len(set(singles)) > 1  # the choices differ
    assert together.usage.prompt_tokens == len(PROMPT) and together.usage.completion_tokens == 24
    again = client.completions.create(n=3, seed=11, **kwargs)
    assert [c.text for c in again.choices] == singles  # reproducible


def test_n_choices_stream_with_their_index(client):
    kwargs = dict(
        model=NAME, messages=USER, max_tokens=6, temperature=1.0, seed=3, extra_body={"ignore_eos": True}
    )
    whole = client.chat.completions.create(n=2, **kwargs)
    texts, finish = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(n=2, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finish == {0: "length", 1: "length"}


def test_batched_prompts_and_best_of(client):
    out = client.completions.create(model=NAME, prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=3, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both choices of a prompt agree
    single = client.completions.create(model=NAME, prompt=[8, 9], max_tokens=3, temperature=0)
    assert out.choices[2].text == single.choices[0].text
    best = client.completions.create(
        model=NAME, prompt=PROMPT, n=1, best_of=3, max_tokens=4, seed=2, logprobs=0, temperature=1.0
    )
    candidates = client.completions.create(model=NAME, prompt=PROMPT, n=3, max_tokens=4, seed=2, logprobs=0)
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in candidates.choices}
    assert best.choices[0].text == max(scores, key=scores.get)


# ---- structured outputs ---------------------------------------------------------------------------------


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    pet: Literal["cat", "dog", "none"]
    student: bool


def test_json_schema_validates_every_time_at_16_concurrent_requests(server):
    aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=200)

    async def one(i: int):
        return await aclient.beta.chat.completions.parse(
            model=NAME, messages=USER, response_format=Person, max_tokens=120, seed=i, temperature=1.0
        )

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await aclient.close()

    results = asyncio.run(all_of_them())
    for result in results:
        choice = result.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Person)  # the SDK validated it with pydantic
        Person.model_validate_json(choice.message.content)
    assert len({r.choices[0].message.content for r in results}) > 1  # sampled, not one fixed answer


def test_json_object_and_guided_regex_and_choice(client):
    out = client.chat.completions.create(
        model=NAME, messages=USER, max_tokens=200, temperature=0, response_format={"type": "json_object"}
    )
    content = out.choices[0].message.content
    assert content.lstrip().startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    regex = client.completions.create(
        model=NAME, prompt="x", max_tokens=20, seed=1, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"}
    )
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.choices[0].text)
    for seed in range(3):
        choice = client.completions.create(
            model=NAME,
            prompt="x",
            max_tokens=20,
            seed=seed,
            extra_body={"guided_choice": ["yes", "no", "maybe"]},
        )
        assert choice.choices[0].text in {"yes", "no", "maybe"}


def test_bad_schema_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=NAME, prompt="x", extra_body={"guided_regex": "(unclosed"})
    assert bad.value.body["param"] == "guided_regex"


# ---- tools ----------------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["CET", "UTC"]}}, "required": ["tz"]},
    },
}


def test_named_tool_choice_forces_a_valid_call(client):
    out = client.chat.completions.create(
        model=NAME,
        messages=USER,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        seed=0,
    )
    calls = out.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id
    args = json.loads(calls[0].function.arguments)
    assert set(args) == {"city", "days"} and 1 <= args["days"] <= 7


def test_required_tool_choice_streams_tool_call_deltas(client):
    kwargs = dict(
        model=NAME, messages=USER, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120, seed=4
    )
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "tool_calls"
    names = [c.function.name for c in whole.choices[0].message.tool_calls]
    assert names and set(names) <= {"get_weather", "get_time"}
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function.name:
                    call["name"] = delta.function.name
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == names
    for call, whole_call in zip(calls.values(), whole.choices[0].message.tool_calls, strict=True):
        assert json.loads(call["arguments"]) == json.loads(whole_call.function.arguments)


QWEN3_TEMPLATE = "{{ '<tool_call>' }} {{ '<think>' }} {{ '</think>' }}"  # markers only: picks the parsers
SCRIPTED = (
    "<think>The user wants weather.</think>\n\nChecking.<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_calls_and_reasoning_are_parsed_from_the_template_format(stream):
    with serve_fake_engine() as fake:
        fake.engine.script = SCRIPTED
        fake.engine.tokenizer.chat_template = QWEN3_TEMPLATE
        client = openai.OpenAI(base_url=fake.base_url + "/v1", api_key="none", max_retries=0)
        kwargs = dict(model="tiny", messages=USER, tools=[WEATHER], max_tokens=200)
        if not stream:
            message = client.chat.completions.create(**kwargs).choices[0]
            assert message.finish_reason == "tool_calls"
            assert message.message.model_extra["reasoning_content"] == "The user wants weather."
            assert message.message.content == "Checking."
            call = message.message.tool_calls[0]
            assert call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
            return
        reasoning, content, calls, finish, heads = "", "", {}, None, 0
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                delta = choice.delta
                reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                content += delta.content or ""
                for tc in delta.tool_calls or []:
                    call = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
                    if tc.id:
                        heads += 1
                        call["id"], call["name"] = tc.id, tc.function.name
                        assert tc.function.arguments == "" and tc.type == "function"
                    call["arguments"] += tc.function.arguments or ""
                finish = choice.finish_reason or finish
        assert reasoning == "The user wants weather." and content == "Checking."
        assert heads == 1 and calls[0]["name"] == "get_weather"
        assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "days": 2}
        assert finish == "tool_calls"


def test_tool_choice_none_leaves_the_text_alone():
    with serve_fake_engine() as fake:
        fake.engine.script = SCRIPTED
        fake.engine.tokenizer.chat_template = "{{ '<tool_call>' }}"
        client = openai.OpenAI(base_url=fake.base_url + "/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(
            model="tiny", messages=USER, tools=[WEATHER], tool_choice="none", max_tokens=200
        )
        assert out.choices[0].message.content == SCRIPTED and not out.choices[0].message.tool_calls


# ---- models, tokenize ------------------------------------------------------------------------------------


def test_models_tokenize_detokenize(server, client):
    card = client.models.list().data[0]
    assert card.id == NAME and card.model_extra["max_model_len"] == 256
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir(NAME))
    ids = _tokenize(server, prompt="Hello, how are you today?")
    assert ids == tokenizer("Hello, how are you today?")["input_ids"]
    chat_ids = _tokenize(server, messages=USER)
    assert chat_ids == tokenizer.apply_chat_template(
        USER, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    text = httpx.post(server.base_url + "/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert text == "Hello, how are you today?"
    bad = httpx.post(server.base_url + "/detokenize", json={"tokens": [10**6]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_with_echo_scores_the_prompt_only(client, stream):
    kwargs = dict(model=NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    reference = client.completions.create(**{**kwargs, "max_tokens": 1}).choices[0].logprobs
    if stream:
        text, token_logprobs = "", []
        for chunk in client.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                text += choice.text
                token_logprobs += choice.logprobs.token_logprobs if choice.logprobs else []
    else:
        out = client.completions.create(**kwargs)
        text, token_logprobs = out.choices[0].text, out.choices[0].logprobs.token_logprobs
        assert out.usage.completion_tokens == 0
    assert len(token_logprobs) == len(PROMPT)
    assert token_logprobs == pytest.approx(reference.token_logprobs[: len(PROMPT)], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"


def test_batched_string_prompts_echo_each_prompt_with_its_logprobs(client):
    prompts = ["Hello, how are you today?", "The quick brown fox"]
    out = client.completions.create(
        model=NAME, prompt=prompts, max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, choice in zip(prompts, out.choices, strict=True):
        assert choice.text.startswith(prompt)
        single = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1
        )
        assert choice.text == single.choices[0].text
        assert choice.logprobs.token_logprobs == pytest.approx(
            single.choices[0].logprobs.token_logprobs, abs=1e-5
        )
    assert out.usage.completion_tokens == 4
