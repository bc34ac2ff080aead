"""A stand-in LLMEngine for server tests that must control engine behaviour (failures, slowness).

Follows the LLMEngine contract (add_request/abort_request/step/has_unfinished_requests/stats/tokenizer)
with a byte-level tokenizer and a deterministic "model": next token = (last token + 1) % 256.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from moefleet.engine.sampling_params import RequestOutput, SamplingParams

EOS = 256
BLOCK = 16


class ByteTokenizer:
    eos_token_id = EOS

    chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    output: list[int]


class FakeEngine:
    def __init__(self, max_model_len: int = 256, total_blocks: int = 64, step_delay: float = 0.0):
        self.tokenizer = ByteTokenizer()
        self.max_model_len = max_model_len
        self.total_blocks = total_blocks
        self.step_delay = step_delay
        self.fail_next_steps = 0
        self.requests: dict[str, _Request] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.thread_ids: set[int] = set()
        # When set, every request outputs these bytes (then finishes with "stop") instead of last + 1.
        self.script: str | None = None

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> None:
        self.thread_ids.add(threading.get_ident())
        if len(prompt_token_ids) + sampling_params.max_tokens > self.max_model_len:
            raise ValueError("prompt + max_tokens exceeds max_model_len")
        self.requests[request_id] = _Request(list(prompt_token_ids), sampling_params, [])

    def abort_request(self, request_id: str) -> None:
        self.thread_ids.add(threading.get_ident())
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.fail_next_steps > 0:
            self.fail_next_steps -= 1
            raise RuntimeError("simulated device failure")
        outputs = []
        for request_id, request in list(self.requests.items()):
            last = (request.output or request.prompt)[-1]
            token = (last + 1) % 256
            script = self.script.encode() if self.script is not None else None
            if script is not None:
                token = script[len(request.output)]
            request.output.append(token)
            text = self.tokenizer.decode([token])
            finished = len(request.output) >= request.params.max_tokens
            reason = "length" if finished else None
            if script is not None and len(request.output) == len(script):
                finished, reason = True, "stop"
            for stop in request.params.stop:
                if stop in self.tokenizer.decode(request.output):
                    finished, reason, text = True, "stop", ""
            if finished:
                del self.requests[request_id]
            outputs.append(
                RequestOutput(
                    request_id, [token], text, finished, reason, len(request.prompt), len(request.output)
                )
            )
        return outputs

    def stats(self) -> dict[str, float]:
        used = sum(-(-(len(r.prompt) + len(r.output)) // BLOCK) for r in self.requests.values())
        return {
            "num_running": len(self.requests),
            "num_waiting": 0,
            "kv_blocks_used": used,
            "kv_blocks_total": self.total_blocks,
            "kv_usage": used / self.total_blocks,
        }
