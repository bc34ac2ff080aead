"""The stated bfloat16 tolerance: moefleet in bf16 against moefleet in float32, prompt logits per position.

- median over positions of the relative L2 error of the logits <= 3e-2 (bf16 keeps 8 mantissa bits, so
  ~1e-2 per layer output is expected);
- the top-1 token agrees on >= 85% of positions.
The aggregate error is not bounded: MoE routing is discrete, so a position whose top-k experts flip in bf16
has a large error (up to ~0.6 relative on the tiny random models, whose router scores are near-tied).
Measured 2026-11-28 on one prompt, identical on CPU and H200: median 1.3e-2 to 2.4e-2, agreement 90% to 98%.
Over the four prompts below (194 positions), CPU 2026-11-30, all ten tiny configs: median 1.2e-2 to 2.4e-2,
agreement 89% (glm4_flat) to 98.5%. glm4_flat is lowest because its logits are near-tied: transformers'
own bf16 agrees with its float32 on the same 89.2% of positions (routing sets flip for ~6% of tokens per
layer in both), so ours is exactly as faithful as the reference there.
"""

from __future__ import annotations

import torch
from moefleet.engine.loader import load_model

from support.tiny_models import PagedDriver, tiny_model_dir

MEDIAN_REL_L2 = 3e-2
TOP1_AGREEMENT = 0.85
# Four prompts (~200 positions), each its own sequence. One prompt of ~50 positions was too few: a tiny random
# model can have near-ties at many of them (glm4_flat: 8 of 51 positions with a float32 top-2 margin < 0.1, where
# bf16 hidden states move logits by ~0.2), so its agreement swung from 82% to 90% with the rounding order alone
# (CUDA vs CPU matmuls; transformers' own bf16: 86%); over these 194 positions it measures 89-90% on CPU.
TEXTS = [
    "Once upon a time there was a little town by the sea, where the people woke up early to fish and to "
    "bake bread. The children went to school, and the old men sat in the sun",
    "Machines that serve language models must be fast, fair and reliable. Every request waits in a queue, "
    "the scheduler picks a batch, and the model computes the next token",
    "The knight rode through the forest for many days. He was tired and hungry, but he did not give up. "
    "At last he found the cave of the dragon",
    "Experts in a mixture of experts model are small networks; a router sends each token to a few of them. "
    "Some experts are busy and some are idle",
]
TEXT = TEXTS[0]


def check_bf16_tolerance(name: str, device: str) -> tuple[float, float]:
    from moefleet.engine.tokenizer import Tokenizer

    path = tiny_model_dir(name)
    tokenizer = Tokenizer(str(path))
    prompts = [tokenizer.encode(text) for text in TEXTS]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(path, device, dtype)
        driver = PagedDriver(model, dtype=dtype, device=device)
        with torch.inference_mode():
            per_prompt = [
                driver.step([(seq, prompt)], all_logits=True).float().cpu()
                for seq, prompt in enumerate(prompts)
            ]
        logits[dtype] = torch.cat(per_prompt)
    ref, low = logits[torch.float32], logits[torch.bfloat16]
    per_position = torch.linalg.vector_norm(low - ref, dim=-1) / torch.linalg.vector_norm(ref, dim=-1)
    median = per_position.median().item()
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(
        f"{name} on {device}: bf16 vs fp32 over {ref.shape[0]} positions: median relative L2 {median:.2e}, "
        f"top-1 agreement {agree:.1%}"
    )
    assert median <= MEDIAN_REL_L2, f"{name}: bf16 median relative L2 error {median:.3e} > {MEDIAN_REL_L2}"
    assert agree >= TOP1_AGREEMENT, f"{name}: bf16 top-1 agreement {agree:.1%} < {TOP1_AGREEMENT:.0%}"
    return median, agree


# Ours may trail transformers' own bf16-vs-float32 agreement by at most this much (the rounding order differs,
# so a few near-tied positions can go either way).
AGREEMENT_SLACK_VS_TRANSFORMERS = 0.03


def transformers_bf16_agreement(name: str, device: str) -> float:
    """transformers' own bf16 vs float32 top-1 agreement on the same prompts: how faithful bf16 can be."""
    import transformers
    from moefleet.engine.tokenizer import Tokenizer

    path = tiny_model_dir(name)
    tokenizer = Tokenizer(str(path))
    prompts = [tokenizer.encode(text) for text in TEXTS]
    top1 = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        with torch.no_grad():
            top1[dtype] = torch.cat(
                [hf(torch.tensor([p], device=device)).logits[0].argmax(-1).cpu() for p in prompts]
            )
    return (top1[torch.float32] == top1[torch.bfloat16]).float().mean().item()


def check_bf16_as_faithful_as_transformers(name: str, device: str) -> None:
    _, ours = check_bf16_tolerance(name, device)
    reference = transformers_bf16_agreement(name, device)
    print(f"{name} on {device}: transformers bf16 vs fp32 top-1 agreement {reference:.1%}, ours {ours:.1%}")
    assert ours >= reference - AGREEMENT_SLACK_VS_TRANSFORMERS, (
        f"{name}: bf16 top-1 agreement {ours:.1%} trails transformers' own bf16 ({reference:.1%}) by more "
        f"than {AGREEMENT_SLACK_VS_TRANSFORMERS:.0%}: some step runs in bf16 where transformers keeps float32"
    )
