"""CPU throughput of moefleet against transformers on the same tiny model, side by side in one run.

For each architecture's tiny checkpoint (`moefleet make-tiny-model`), generate greedily with 1 and with 16
concurrent requests of different prompt lengths:
- transformers: `generate(do_sample=False)`; 16 requests as one left-padded batch (what a plain HF
  deployment does), 1 request alone;
- moefleet: `LLM.generate` (continuous batching over the paged KV cache).
Both run in float32 on the same threads; output tokens per second of wall time, best of `--repeats`.

    .venv/bin/python benchmarks/throughput_cpu.py [--new-tokens 64] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import transformers
from moefleet.engine import LLM, SamplingParams
from moefleet.engine.tiny_model import make_tiny_model

WORDS = "the quick brown fox jumps over the lazy dog while the knight rides to the cave of the dragon".split()


def prompts_for(count: int, tokenizer) -> list[list[int]]:
    """`count` prompts of 4..64 tokens (different lengths, as real traffic)."""
    out = []
    for i in range(count):
        n_words = 3 + (i * 7) % 40
        out.append(tokenizer(" ".join(WORDS[j % len(WORDS)] for j in range(i, i + n_words)))["input_ids"])
    return out


def time_best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    assert out.shape[1] == batch["input_ids"].shape[1] + new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("qwen3_moe", "deepseek_v3"):
            path = make_tiny_model(arch, Path(tmp) / arch)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            llm = LLM(str(path), dtype="float32", max_num_seqs=64)
            params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
            for n in args.concurrency:
                prompts = prompts_for(n, tokenizer)
                generated = n * args.new_tokens
                hf_s = time_best(partial(hf_generate, hf, tokenizer, prompts, args.new_tokens), args.repeats)
                mf_s = time_best(partial(llm.generate, prompts, params), args.repeats)
                rows.append((arch, n, generated / hf_s, generated / mf_s))
                print(
                    f"{arch} x{n}: transformers {generated / hf_s:,.0f} tok/s, moefleet {generated / mf_s:,.0f} tok/s",
                    flush=True,
                )
    print()
    print(
        f"CPU, float32, {args.threads} thread(s), {args.new_tokens} new tokens per request, best of {args.repeats}"
    )
    print("| model | concurrent requests | transformers tok/s | moefleet tok/s | moefleet / transformers |")
    print("|---|---|---|---|---|")
    for arch, n, hf_rate, mf_rate in rows:
        print(f"| tiny {arch} | {n} | {hf_rate:,.0f} | {mf_rate:,.0f} | {mf_rate / hf_rate:.2f}x |")


if __name__ == "__main__":
    main()
