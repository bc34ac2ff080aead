"""Incremental detokenizer: clean UTF-8 deltas, stop strings across token boundaries, stop tokens, length."""

import pytest
from moefleet.engine.detokenizer import IncrementalDetokenizer
from moefleet.engine.sampling_params import SamplingParams
from moefleet.engine.tiny_model import make_tiny_model
from moefleet.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3"))


def feed(tokenizer, prompt, output_ids, **params):
    detok = IncrementalDetokenizer(
        tokenizer, prompt, SamplingParams(**{"max_tokens": 1000, **params}), tokenizer.eos_token_ids
    )
    deltas, result = [], (None, None)
    for token_id in output_ids:
        delta, reason, stop_reason = detok.update(token_id)
        deltas.append(delta)
        if reason is not None:
            result = (reason, stop_reason)
            break
    return deltas, result


def test_multibyte_characters_are_never_split(tokenizer):
    prompt = tokenizer.encode("Say it:")
    text = " héllo 世界 🙂 naïve — done"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # byte-level pieces: some characters span several tokens
    deltas, _ = feed(tokenizer, prompt, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some token only completed part of a character and was held back


def test_stop_string_across_tokens_is_cut_and_never_emitted(tokenizer):
    text = " The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text)
    stop = "ck bro"
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # the stop string spans tokens
    deltas, (reason, stop_reason) = feed(tokenizer, [], ids, stop=["lazy", stop])
    assert (reason, stop_reason) == ("stop", stop)
    assert "".join(deltas) == " The qui"
    # Streaming held back enough: no prefix of the stop string leaked before the match.
    running = ""
    for d in deltas:
        running += d
        assert stop not in running


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode(" one, two, three, four")
    deltas, (reason, stop_reason) = feed(tokenizer, [], ids, stop=["four", "two"])
    assert (reason, stop_reason) == ("stop", "two") and "".join(deltas) == " one, "


def test_eos_and_stop_token_ids(tokenizer):
    ids = tokenizer.encode(" Hello world")
    eos = tokenizer.eos_token_ids[0]
    deltas, result = feed(tokenizer, [], ids + [eos] + ids)
    assert result == ("stop", None) and "".join(deltas) == " Hello world"
    deltas, result = feed(tokenizer, [], ids + [eos] + ids, ignore_eos=True, max_tokens=len(ids) * 2 + 1)
    assert result == ("length", None) and "".join(deltas) == " Hello world Hello world"
    deltas, result = feed(tokenizer, [], ids, stop_token_ids=[ids[1]])
    assert result == ("stop", ids[1]) and "".join(deltas) == tokenizer.decode(ids[:1])
    # min_tokens: EOS before it does not stop.
    deltas, result = feed(tokenizer, [], [eos, *ids, eos], min_tokens=2)
    assert result == ("stop", None) and "".join(deltas) == " Hello world"


def test_max_tokens_is_length(tokenizer):
    ids = tokenizer.encode(" Monday, Tuesday, Wednesday")
    deltas, result = feed(tokenizer, [], ids, max_tokens=3)
    assert result == ("length", None)
    assert "".join(deltas) == tokenizer.decode(ids[:3])


def test_deltas_equal_full_decode_for_random_tokens(tokenizer):
    import random

    rng = random.Random(0)
    special = set(tokenizer.eos_token_ids)
    ids = [t for t in (rng.randrange(tokenizer.vocab_size) for _ in range(300)) if t not in special]
    prompt = tokenizer.encode("Once upon a time")
    deltas, _ = feed(tokenizer, prompt, ids, max_tokens=len(ids))
    assert "".join(deltas) == tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(20))
def test_stop_string_property_random_streams(tokenizer, seed):
    import random

    rng = random.Random(seed)
    special = set(tokenizer.eos_token_ids)
    ids = [t for t in (rng.randrange(3, tokenizer.vocab_size) for _ in range(60)) if t not in special]
    full = tokenizer.decode(ids)
    start = rng.randrange(len(full) // 2)
    stop = full[start : start + rng.randint(1, 6)]
    deltas, (reason, stop_reason) = feed(tokenizer, [], ids, stop=[stop])
    assert (reason, stop_reason) == ("stop", stop)
    assert "".join(deltas) == full[: full.find(stop)]
