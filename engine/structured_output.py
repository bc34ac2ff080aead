"""Structured outputs: JSON object / JSON-schema / regex / choice grammars enforced as a token bitmask (xgrammar).

Why xgrammar (over llguidance; both are on PyPI, both install as CPU wheels for Python 3.11): it is the
default backend of vLLM and SGLang, compiles a JSON schema once per tokenizer into a cached adaptive token
mask (most tokens' validity is precomputed, so the per-token host work is a small fill of a [S, V/32] int32
bitmask), and ships the device kernel that applies the bitmask to a batch of logits rows in place.

Flow per step (model runner): before the forward, `GrammarMasks.prepare(seqs, device)` fills one bitmask row
per constrained sequence (host, the library's own work, on its thread pool) and starts one copy of the bitmask
to the device, so on a GPU the fill overlaps the forward; after the logits, `apply` masks the rows there in
one kernel; after sampling, `accept(seqs, tokens)` advances each sequence's matcher. The sampled token's logprobs
are taken before the mask (engine/logprobs.py), so they stay the model's raw distribution.

The HTTP server compiles each grammar once at request time (`compiler_for(...).compile`, off the event loop), so
a bad schema is a 400 there; a local engine then finds it in the same compiler's cache, while the ranks of a
DP group compile it on first use (inside their step: that step waits for the compile; cached afterwards).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from .sampling_params import StructuredOutput
from .sequence import Sequence


class GrammarError(ValueError):
    """The grammar of a request cannot be compiled (bad schema or regex); the message says why."""


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as exc:  # pragma: no cover - xgrammar is a dependency
        raise GrammarError("structured outputs need the xgrammar package: pip install xgrammar") from exc
    return xgrammar


def tokenizer_info(backend_tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> Any:
    """xgrammar's view of a `tokenizers.Tokenizer`: every id's token string and how to decode it."""
    xgr = _xgrammar()
    vocab = backend_tokenizer.get_vocab(with_added_tokens=True)
    encoded = [""] * max(vocab_size, max(vocab.values(), default=-1) + 1)
    for token, token_id in vocab.items():
        encoded[token_id] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend_tokenizer.to_str())
    return xgr.TokenizerInfo(
        encoded,
        vocab_type=xgr.VocabType(metadata["vocab_type"]),
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        add_prefix_space=bool(metadata["add_prefix_space"]),
    )


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one tokenizer; compiled grammars are cached by the library."""

    def __init__(self, backend_tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(
            tokenizer_info(backend_tokenizer, vocab_size, stop_token_ids), max_threads=2
        )

    def compile(self, spec: StructuredOutput) -> Any:
        try:
            if spec.kind == "json":  # an object (OpenAI's json_object), compact like json_schema
                return self._compiler.compile_grammar(json_schema_grammar('{"type": "object"}', strict=False))
            if spec.kind == "json_schema":
                return self._compiler.compile_grammar(json_schema_grammar(spec.spec))
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.spec)
            if spec.kind == "choice":
                return self._compiler.compile_grammar(choice_grammar(json.loads(spec.spec)))
        except (RuntimeError, ValueError) as exc:
            raise GrammarError(f"invalid {spec.kind} for structured output: {exc}") from exc
        raise GrammarError(f"unknown structured output kind {spec.kind!r}")


# xgrammar 0.2.9 writes the characters of a length-bounded string (minLength/maxLength) as [^"\\\r\n], which
# admits raw control characters that JSON forbids in strings (its unbounded strings exclude them).
_LOOSE_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"


def json_schema_grammar(schema: str, strict: bool = True) -> str:
    """EBNF of a JSON schema: compact JSON (no free whitespace, so a model cannot pad its output with blanks
    forever), strict (no properties beyond the schema's), control characters never inside strings."""
    grammar = _xgrammar().Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
    return str(grammar).replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of `choices`."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("guided_choice must be a non-empty list of non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


_compilers: dict[Any, GrammarCompiler] = {}
_compilers_lock = threading.Lock()


def compiler_for(backend_tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> GrammarCompiler:
    """One compiler (and so one grammar cache) per tokenizer content, vocabulary size and stop ids in this
    process: the HTTP server's check and a local engine's step share it, so the engine's compile of a grammar
    the server already compiled is a cache hit."""
    content = hashlib.sha256(backend_tokenizer.to_str().encode()).hexdigest()
    key = (content, vocab_size, tuple(stop_token_ids))
    with _compilers_lock:
        compiler = _compilers.get(key)
        if compiler is None:
            compiler = GrammarCompiler(backend_tokenizer, vocab_size, stop_token_ids)
            _compilers[key] = compiler
        return compiler


@dataclass(slots=True)
class PendingMask:
    rows: list[int]  # sampling rows to mask
    bitmask: torch.Tensor  # [S, ceil(V / 32)] int32 on the logits' device


class GrammarMasks:
    """Per-sequence grammar matchers of one model runner, and the batched bitmask they produce."""

    def __init__(self, compiler_factory: Any):
        self._compiler_factory = compiler_factory  # () -> GrammarCompiler, built on first use
        self._compiler: GrammarCompiler | None = None
        self._matchers: dict[int, Any] = {}
        self._batch: Any = None  # xgrammar.BatchGrammarMatcher, made on first use

    def _matcher(self, seq: Sequence) -> Any:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is None:
            if self._compiler is None:
                self._compiler = self._compiler_factory()
            assert self._compiler is not None and seq.params.structured is not None
            compiled = self._compiler.compile(seq.params.structured)
            matcher = _xgrammar().GrammarMatcher(compiled)
            # A recomputed (preempted) sequence keeps its outputs: replay them.
            for token in seq.output_token_ids:
                matcher.accept_token(token)
            self._matchers[seq.seq_id] = matcher
        return matcher

    def prepare(self, seqs: Seq[Sequence], device: torch.device) -> PendingMask | None:
        """Before the forward: fill the bitmask rows of the constrained sequences (host, xgrammar's threads)
        and start its copy to `device`, so on a GPU this host work overlaps the forward."""
        rows = [i for i, seq in enumerate(seqs) if seq.params.structured is not None]
        if not rows:
            return None
        matchers = [self._matcher(seqs[i]) for i in rows]
        live = [(row, m) for row, m in zip(rows, matchers, strict=True) if not m.is_terminated()]
        if not live:  # after the grammar's end (ignore_eos) nothing is masked
            return None
        xgr = _xgrammar()
        assert self._compiler is not None
        bitmask = xgr.allocate_token_bitmask(len(seqs), self._compiler.vocab_size)
        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher()
        self._batch.batch_fill_next_token_bitmask(
            [m for _, m in live], bitmask, indices=[row for row, _ in live]
        )
        if device.type == "cuda":
            bitmask = bitmask.pin_memory()
        return PendingMask([row for row, _ in live], bitmask.to(device, non_blocking=True))

    def apply(self, logits: torch.Tensor, pending: PendingMask | None) -> None:
        """Mask (to -inf) every token the grammar forbids next, in the rows `prepare` filled."""
        if pending is not None:
            _xgrammar().apply_token_bitmask_inplace(
                logits, pending.bitmask, vocab_size=logits.shape[1], indices=pending.rows
            )

    def accept(self, seqs: Seq[Sequence], tokens: list[int]) -> None:
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.params.structured is not None:
                matcher = self._matchers.get(seq.seq_id)
                if matcher is not None and not matcher.is_terminated():
                    matcher.accept_token(token)

    def release(self, seq: Sequence) -> None:
        self._matchers.pop(seq.seq_id, None)
