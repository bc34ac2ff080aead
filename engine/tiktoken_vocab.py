"""A tiktoken BPE vocabulary as the Tokenizer's backend (Kimi-K2 ships `tiktoken.model`, no tokenizer.json).

Read from the checkpoint as data only - its `tokenization_kimi.py` is never executed:
- `tiktoken.model`: one `<base64 token bytes> <rank>` per line; a token's rank is its id;
- special tokens: the `num_base + RESERVED_SPECIAL` ids after the base vocabulary, named from
  tokenizer_config.json `added_tokens_decoder` ({"<id>": {"content": ...}}) or `<|reserved_token_<id>|>`
  (what Kimi's tokenizer class builds);
- pre-tokenisation: Kimi's pattern `KIMI_PAT_STR` (the `pat_str` constant of tokenization_kimi.py: Han runs
  split from other letters, then the cl100k-style branches).
Encoding treats special-token text in the input as the special token (Kimi's `encode` allows all of them);
decoding with skip_special_tokens drops every special id. Special tokens around a completion follow
transformers' `PreTrainedTokenizer.build_inputs_with_special_tokens` (which Kimi's class does not
override): tokenizer_config `special_tokens_pattern` "bos" / "eos" / "bos_eos", default none - so Kimi-K2
completions get no BOS.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import tiktoken

SPECIAL_TOKENS_PATTERNS = ("none", "bos", "eos", "bos_eos")
RESERVED_SPECIAL = 256 + 2  # Kimi: range(num_base, num_base + num_reserved_special_tokens + 2)
KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """`<base64> <rank>` lines -> {token bytes: rank}, with errors that name the line."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: expected '<base64 token> <rank>', got {line[:60]!r}") from exc
    return ranks


class _Encoding:
    def __init__(self, ids: list[int]):
        self.ids = ids


class TiktokenVocab:
    """The subset of `tokenizers.Tokenizer` the engine's Tokenizer uses, over a tiktoken Encoding."""

    def __init__(self, path: Path, tokenizer_config: dict[str, Any]):
        ranks = read_bpe_ranks(path)
        num_base = len(ranks)
        names: dict[int, str] = {}
        for key, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
            content = entry.get("content") if isinstance(entry, dict) else None
            if isinstance(content, str):
                names[int(key)] = content
        self.special_tokens = {
            names.get(i, f"<|reserved_token_{i}|>"): i for i in range(num_base, num_base + RESERVED_SPECIAL)
        }
        self.special_ids = set(self.special_tokens.values())
        self.encoding = tiktoken.Encoding(
            name=path.name, pat_str=KIMI_PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self._bytes_to_id = ranks
        pattern = tokenizer_config.get("special_tokens_pattern") or "none"
        if pattern not in SPECIAL_TOKENS_PATTERNS:
            raise ValueError(
                f"tokenizer_config.json special_tokens_pattern {pattern!r} is not supported for tiktoken "
                f"vocabularies (supported: {', '.join(SPECIAL_TOKENS_PATTERNS)})"
            )
        bos, eos = (self._special_id(tokenizer_config.get(k)) for k in ("bos_token", "eos_token"))
        self.prefix = [bos] if "bos" in pattern and bos is not None else []
        self.suffix = [eos] if "eos" in pattern and eos is not None else []

    def _special_id(self, value: Any) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return self.special_tokens.get(text) if isinstance(text, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> _Encoding:
        ids = self.encoding.encode(text, allowed_special="all")
        return _Encoding(self.prefix + ids + self.suffix if add_special_tokens else ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.encoding.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._bytes_to_id.get(token.encode("utf-8"))

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return int(self.encoding.n_vocab)
