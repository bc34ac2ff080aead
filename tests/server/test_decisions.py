"""Pure decisions of the server: context-length budget and validation-error translation."""

from __future__ import annotations

import pytest
from moefleet.engine.server.errors import OpenAIError
from moefleet.engine.server.protocol import ChatCompletionRequest, CompletionRequest
from moefleet.engine.server.serving import resolve_max_tokens


def test_default_max_tokens():
    assert resolve_max_tokens(10, None, 16, 100, "max_tokens") == 16  # completions: OpenAI's 16
    assert resolve_max_tokens(90, None, 16, 100, "max_tokens") == 10  # ... but never past the window
    assert resolve_max_tokens(10, None, None, 100, "max_tokens") == 90  # chat: the rest of the window


def test_explicit_max_tokens_must_fit():
    assert resolve_max_tokens(10, 90, 16, 100, "max_tokens") == 90
    with pytest.raises(OpenAIError) as error:
        resolve_max_tokens(10, 91, 16, 100, "max_completion_tokens")
    assert error.value.param == "max_completion_tokens" and error.value.code == "context_length_exceeded"
    assert "at most 90" in error.value.message


@pytest.mark.parametrize("prompt_len", [0, 100, 150])
def test_prompt_that_leaves_no_room(prompt_len):
    with pytest.raises(OpenAIError) as error:
        resolve_max_tokens(prompt_len, None, 16, 100, "max_tokens")
    assert error.value.param == "prompt" and error.value.status_code == 400


def test_request_models_normalise_fields():
    request = CompletionRequest(model="m", prompt=["only one"], stop="x", top_k=0)
    assert (request.prompts(), request.stop, request.top_k) == (["only one"], ["x"], -1)
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(model="m", prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert CompletionRequest(model="m", prompt="p").prompts() == ["p"]
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "a"}], max_tokens=5)
    assert chat.requested_max_tokens == 5
    both = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "a"}], max_tokens=5, max_completion_tokens=7
    )
    assert both.requested_max_tokens == 7
