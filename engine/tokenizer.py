"""Tokenizer of an HF checkpoint directory without transformers: `tokenizers` (tokenizer.json) or `tiktoken`
(tiktoken.model, Kimi-K2) for the vocabulary, jinja2 for the chat template.

Reads tokenizer.json (or tiktoken.model: see `TiktokenVocab`), special tokens from tokenizer_config.json / special_tokens_map.json, EOS ids from
generation_config.json (an int or a list), and the chat template from tokenizer_config.json (or a
chat_template.jinja file). Templates render in the same sandbox with the same helpers as transformers'
`apply_chat_template` (raise_exception, strftime_now, tojson, namespace, bos_token, eos_token, ...), so ids
match what transformers produces.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

TIKTOKEN_FILE = "tiktoken.model"
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """Special tokens are saved either as strings or as AddedToken dicts ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode / decode / chat template of the checkpoint in `model_dir`."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        config = _read_json(model_dir / "tokenizer_config.json")
        self._tokenizer: Any
        if path.is_file():
            self._tokenizer = HFTokenizer.from_file(str(path))
        elif (model_dir / TIKTOKEN_FILE).is_file():
            from moefleet.engine.tiktoken_vocab import TiktokenVocab

            self._tokenizer = TiktokenVocab(model_dir / TIKTOKEN_FILE, config)
        else:
            raise ValueError(
                f"model ({str(model_dir)!r}) has neither tokenizer.json nor {TIKTOKEN_FILE}: moefleet needs a "
                "fast tokenizer file or a tiktoken BPE file"
            )
        special_map = _read_json(model_dir / "special_tokens_map.json")
        generation = _read_json(model_dir / "generation_config.json")

        # Names -> strings as a chat template sees them; tokenizer_config wins over special_tokens_map.
        self.special_tokens: dict[str, Any] = {}
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(config.get(name)) or _token_text(special_map.get(name))
            if text is not None:
                self.special_tokens[name] = text
        extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
        self.special_tokens["additional_special_tokens"] = [t for t in map(_token_text, extra) if t]

        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id = self.token_to_id(self.bos_token) if self.bos_token else None
        eos_ids = generation.get("eos_token_id")
        if eos_ids is None:
            eos_ids = []
        elif isinstance(eos_ids, int):
            eos_ids = [eos_ids]
        tokenizer_eos = self.token_to_id(self.eos_token) if self.eos_token else None
        # The tokenizer's EOS first: it is the one a model is trained to emit; generation_config may add more.
        self.eos_token_ids: list[int] = list(
            dict.fromkeys(([tokenizer_eos] if tokenizer_eos is not None else []) + list(eos_ids))
        )
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.chat_template = self._find_chat_template(model_dir, config)

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        token_id = self._tokenizer.token_to_id(token)
        return None if token_id is None else int(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # BOS (when the model wants one) comes from tokenizer.json's post-processor, as in transformers>=5;
        # tokenizer_config's add_bos_token is not consulted. tiktoken vocabularies never add one (Kimi's
        # tokenizer class keeps PreTrainedTokenizer's default: no special tokens around a completion).
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The chat template applied to `messages`, as text."""
        if self.chat_template is None:
            raise ValueError(
                "this model has no chat template (tokenizer_config.json 'chat_template'): send a plain "
                "completion prompt instead of chat messages"
            )
        template_kwargs = {**self.special_tokens, **kwargs}
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **template_kwargs
            )
        except jinja2.TemplateError as exc:
            # raise_exception() in templates rejects the conversation (e.g. roles must alternate): bad input.
            raise ValueError(f"the model's chat template rejected the messages: {exc}") from exc

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat; special tokens come from the template text only (as in HF)."""
        return self.encode(
            self.render_chat(messages, add_generation_prompt, **kwargs), add_special_tokens=False
        )

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        assert self.chat_template is not None
        return env.from_string(self.chat_template)

    @staticmethod
    def _find_chat_template(model_dir: Path, config: dict[str, Any]) -> str | None:
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():
            return template_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as in transformers).
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
