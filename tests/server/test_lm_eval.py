"""lm-eval (a client nobody here wrote) against `moefleet serve`'s app on a tiny model through its
`local-completions` model: a generate-until task and a loglikelihood (multiple-choice) task, built locally
(jsonl + task yaml, no network), finish without errors and produce their metrics."""

from __future__ import annotations

import json
import os

import pytest
from moefleet.engine.config import EngineConfig
from moefleet.engine.llm_engine import LLMEngine
from moefleet.engine.server.async_engine import LocalEngineClient
from server.conftest import serve_app
from support.tiny_models import one_torch_thread, tiny_model_dir

lm_eval = pytest.importorskip("lm_eval")

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

NAME = "qwen3_norm_topk"
QUESTIONS = [
    ("What is the capital of France?", "Paris", ["Paris", "Rome", "Berlin"]),
    ("What is two plus two?", "four", ["four", "five", "three"]),
    ("Hello, how are you today?", "fine", ["fine", "sad", "late"]),
    ("Who rode through the forest?", "knight", ["knight", "dragon", "fish"]),
]

GEN_TASK = """task: moefleet_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

LL_TASK = """task: moefleet_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


def test_lm_eval_local_completions_generate_until_and_loglikelihood(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    data = tmp_path / "questions.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": a, "choices": c}) + "\n" for q, a, c in QUESTIONS)
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=data))
    (tasks / "choice.yaml").write_text(LL_TASK.format(data=data))

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_dir = tiny_model_dir(NAME)
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", max_model_len=256))
    with serve_app(LocalEngineClient(engine), served_model_name=NAME) as server:
        results = simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": server.base_url + "/v1/completions",
                "model": NAME,
                "tokenizer_backend": "huggingface",
                "tokenizer": str(model_dir),
                "tokenized_requests": True,
                "num_concurrent": 2,
                "max_retries": 1,
                "max_length": 256,
            },
            tasks=["moefleet_tiny_gen", "moefleet_tiny_choice"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
        )
    assert results is not None
    gen = results["results"]["moefleet_tiny_gen"]
    choice = results["results"]["moefleet_tiny_choice"]
    assert 0.0 <= gen["exact_match,none"] <= 1.0
    assert 0.0 <= choice["acc,none"] <= 1.0
    # Every choice got a finite loglikelihood from the echoed prompt logprobs.
    samples = results["samples"]["moefleet_tiny_choice"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        for loglikelihood, _greedy in (r[0] for r in sample["resps"]):
            assert loglikelihood < 0 and loglikelihood == loglikelihood
    gen_samples = results["samples"]["moefleet_tiny_gen"]
    assert len(gen_samples) == len(QUESTIONS) and all(isinstance(s["resps"][0][0], str) for s in gen_samples)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
