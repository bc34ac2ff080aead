"""A tiny Kimi-K2-style tiktoken tokenizer for test checkpoints (`make-tiny-model --arch kimi_k2`).

Trains byte-level BPE merges on a text (256 single-byte tokens first, then the most frequent adjacent pair
merged, again and again, inside whitespace-separated pieces), writes `tiktoken.model` (`<base64> <rank>`
lines) and a tokenizer_config.json whose `added_tokens_decoder` places Kimi's special tokens at Kimi's
offsets after the base vocabulary ([BOS] +0, [EOS] +1, <|im_end|> +2, ...), plus a Kimi-style chat template.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from pathlib import Path

from moefleet.engine.tiktoken_vocab import RESERVED_SPECIAL

# Kimi-K2's special tokens and their offsets from the first id after the base vocabulary.
KIMI_SPECIAL_OFFSETS = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|im_middle|>": 17,
}
KIMI_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>system<|im_middle|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- else -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
    "{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)
_PIECES = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+")


def train_bpe(text: str, merges: int) -> list[bytes]:
    """Tokens in rank order: the 256 bytes, then up to `merges` merged pairs (most frequent first)."""
    words = Counter(tuple(bytes([b]) for b in piece.encode("utf-8")) for piece in _PIECES.findall(text))
    vocab = [bytes([b]) for b in range(256)]
    for _ in range(merges):
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[a, b] += count
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        vocab.append(a + b)
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, n in words.items():
            out: list[bytes] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab


def write_tiktoken_tokenizer(out_dir: Path, text: str, merges: int = 300) -> dict[str, int]:
    """Write tiktoken.model + tokenizer_config.json; returns {vocab_size, bos_token_id, eos_token_id, ...}."""
    tokens = train_bpe(text, merges)
    (out_dir / "tiktoken.model").write_text(
        "".join(f"{base64.b64encode(t).decode('ascii')} {rank}\n" for rank, t in enumerate(tokens))
    )
    base = len(tokens)
    added = {
        str(base + offset): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for name, offset in KIMI_SPECIAL_OFFSETS.items()
    }
    config = {
        "tokenizer_class": "TikTokenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[EOS]",
        "unk_token": "[EOS]",
        "model_max_length": 1024,
        "added_tokens_decoder": added,
        "additional_special_tokens": [
            "<|im_end|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|im_system|>",
            "<|im_middle|>",
        ],
        "chat_template": KIMI_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {
        "vocab_size": base + RESERVED_SPECIAL,
        "bos_token_id": base + KIMI_SPECIAL_OFFSETS["[BOS]"],
        "eos_token_id": base + KIMI_SPECIAL_OFFSETS["<|im_end|>"],
        "pad_token_id": base + KIMI_SPECIAL_OFFSETS["[EOS]"],
    }
