"""New request fields and outputs over a data-parallel group: `moefleet serve --nproc-per-node 2` (2 ranks,
DP attention + EP MoE over gloo), driven by the official openai SDK. Logprobs (and echo prompt logprobs) equal
transformers', n > 1 with a seed equals single requests with per-choice seeds, and a JSON-schema request is
parsed by `beta.chat.completions.parse`: SamplingParams' new fields and RequestOutput's logprobs cross the
ranks (request_router / dp_client)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import openai
import pytest
import torch
from pydantic import BaseModel, Field
from server.conftest import stop_process, wait_for_banner_url
from support.reference import free_port
from support.tiny_models import tiny_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow, pytest.mark.multiprocess]

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))
NAME = "qwen3_norm_topk"
PROMPT = list(range(30, 50))


class Answer(BaseModel):
    city: str = Field(max_length=6)
    sure: bool
    kind: Literal["a", "b"]


def test_logprobs_n_and_json_schema_over_a_two_rank_group():
    model = tiny_model_dir(NAME)
    command = [MOEFLEET, "serve", "--model", str(model), "--port", "0", "--print-examples"]
    command += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["--max-model-len", "128", "--max-num-seqs", "8", "--max-num-batched-tokens", "16"]
    command += ["--dtype", "float32", "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = wait_for_banner_url(process, timeout=240)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        name = model.name  # served under the checkpoint directory's name

        echo = client.completions.create(
            model=name,
            prompt=PROMPT,
            max_tokens=3,
            temperature=0,
            logprobs=2,
            echo=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        ids = PROMPT + echo.choices[0].model_extra["token_ids"]
        hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)
        got = echo.choices[0].logprobs.token_logprobs
        assert got[0] is None and len(got) == len(ids)
        for p in range(1, len(ids)):
            assert got[p] == pytest.approx(float(ref[p - 1, ids[p]]), abs=1e-4)

        kwargs = dict(
            model=name, prompt=PROMPT, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True}
        )
        together = client.completions.create(n=3, seed=7, **kwargs)
        with ThreadPoolExecutor(3) as pool:  # concurrent singles land on both ranks
            singles = list(
                pool.map(lambda i: client.completions.create(seed=7 + i, **kwargs).choices[0].text, range(3))
            )
        assert [c.text for c in together.choices] == singles

        parsed = client.beta.chat.completions.parse(
            model=name,
            messages=[{"role": "user", "content": "hi"}],
            response_format=Answer,
            max_tokens=80,
            seed=1,
        )
        assert isinstance(parsed.choices[0].message.parsed, Answer)
    finally:
        code = stop_process(process)
    assert code == 0
