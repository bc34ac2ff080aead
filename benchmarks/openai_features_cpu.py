"""CPU cost of the OpenAI features in the engine step, on one tiny checkpoint: the same 16 concurrent requests
(greedy, 32 new tokens, EOS ignored) plain, with logprobs (top 5), with prompt logprobs (echo), as 4 prompts x
n=4 choices sharing their prompt blocks vs 16 unshared copies, and with a JSON-schema grammar. Prints output
tokens per second of wall time (best of `--repeats`) and prompt tokens the engine computed.

    .venv/bin/python benchmarks/openai_features_cpu.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from moefleet.engine import LLM, SamplingParams
from moefleet.engine.sampling_params import StructuredOutput
from moefleet.engine.tiny_model import make_tiny_model

NEW_TOKENS = 32
SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "string", "maxLength": 8},
        "b": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["a", "b"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        make_tiny_model("qwen3_moe", model, seed=0)
        llm = LLM(str(model), dtype="float32", max_model_len=256)
        prompts = [list(range(20 + i, 60 + i + 3 * i)) for i in range(16)]
        base = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        shared_prompts = [prompts[i // 4] for i in range(16)]
        cases = {
            "plain": (prompts, [base] * 16),
            "logprobs=5": (prompts, [replace(base, logprobs=5)] * 16),
            "echo prompt logprobs=1": (prompts, [replace(base, logprobs=1, prompt_logprobs=1)] * 16),
            "4 prompts x 4 copies": (shared_prompts, [base] * 16),
            "4 prompts x n=4 shared": (
                shared_prompts,
                [replace(base, prefix_share_key=f"p{i // 4}") for i in range(16)],
            ),
            "json_schema grammar": (
                prompts,
                [
                    replace(
                        base,
                        temperature=1.0,
                        seed=i,
                        ignore_eos=False,
                        structured=StructuredOutput("json_schema", json.dumps(SCHEMA)),
                    )
                    for i in range(16)
                ],
            ),
        }
        print("| case | output tok/s | prompt tokens computed |\n|---|---|---|")
        for name, (case_prompts, params) in cases.items():
            best, computed = 0.0, 0
            for _ in range(args.repeats):
                before = llm.engine.prompt_tokens_total
                start = time.perf_counter()
                results = llm.generate(case_prompts, params)
                elapsed = time.perf_counter() - start
                tokens = sum(len(r.token_ids) for r in results)
                best = max(best, tokens / elapsed)
                computed = llm.engine.prompt_tokens_total - before
            print(f"| {name} | {best:.0f} | {computed} |")


if __name__ == "__main__":
    main()
