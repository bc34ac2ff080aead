"""Reference outputs from Hugging Face transformers (the engine's correctness oracle).

`free_port` is re-exported from support.controlplane for tests that start servers."""

from __future__ import annotations

from pathlib import Path

import torch

from support.controlplane import free_port

__all__ = ["free_port", "moefleet_executable", "transformers_greedy"]


def transformers_greedy(
    model_dir: str | Path, prompts: list[list[int]], new_tokens: int, ignore_eos: bool = False
) -> list[list[int]]:
    """transformers `generate(do_sample=False)` continuation of each prompt, one prompt at a time, float32 CPU.
    `ignore_eos`: exactly `new_tokens` each, past any end-of-sequence token (what a request with `ignore_eos`
    gets from our server, e.g. `complete_token_ids`); otherwise generation stops at the model's EOS ids."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if ignore_eos:
        hf.generation_config.eos_token_id = None
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            gen = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
            )
        out.append(gen[0, len(prompt) :].tolist())
    return out


def moefleet_executable() -> str:
    """The `moefleet` command: beside this interpreter (a venv) or on PATH (a lent GPU machine's shim)."""
    import shutil
    import sys

    local = Path(sys.executable).with_name("moefleet")
    return str(local) if local.exists() else str(shutil.which("moefleet"))
