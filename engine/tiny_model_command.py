"""`moefleet make-tiny-model`: write a small random HF-format MoE checkpoint (CPU demos and tests)."""

from __future__ import annotations

import argparse
import os
from typing import Any

ARCHES = (
    "qwen3_moe",
    "deepseek_v3",
    "kimi_k2",
    "glm4_moe",
    "gpt_oss",
    "llama4",
)  # = tiny_model.ARCHES (not imported: no torch at CLI parse)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "make-tiny-model",
        help="write a tiny random MoE checkpoint (config.json, safetensors, tokenizer) to a directory",
        description="Write a tiny random Hugging Face-format MoE checkpoint that `moefleet serve` can load.",
    )
    parser.add_argument("--arch", required=True, choices=ARCHES, help="model architecture")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    return parser


def run(args: argparse.Namespace) -> int:
    from moefleet.engine.cli import CommandError

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CommandError(f"--out {args.out} exists and is not a directory", "pass a new or empty directory")
    from moefleet.engine.tiny_model import make_tiny_model

    make_tiny_model(args.arch, args.out, seed=args.seed)
    print(f"wrote a tiny {args.arch} model to {os.path.abspath(args.out)}")
    print(f"serve it with: moefleet serve --model {args.out} --port 8000")
    return 0
