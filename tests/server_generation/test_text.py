"""Streamed text: stop strings split across tokens, held-back prefixes, special tokens, split characters."""

import pytest

from server.generation.text import IncrementalText
from tests.model_factory import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _feed(text: IncrementalText, ids: list[int]) -> tuple[str, bool]:
    out = ""
    for token in ids:
        piece, stopped = text.add([token])
        out += piece
        if stopped:
            return out, True
    return out + text.flush(), False


def test_plain_stream_reassembles_the_text(tokenizer):
    sentence = "The warranty covers manufacturing defects for two years."
    ids = tokenizer.encode(sentence)
    assert _feed(IncrementalText(tokenizer), ids) == (sentence, False)


def test_stop_string_across_token_boundaries_cuts_before_it(tokenizer):
    sentence = "Refunds are issued within fourteen days when the product is returned unused."
    ids = tokenizer.encode(sentence)
    text = IncrementalText(tokenizer, stop=("fourteen days",))
    out, stopped = _feed(text, ids)
    assert stopped and out == "Refunds are issued within "


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    text = IncrementalText(tokenizer, stop=("XYZ",))
    piece, stopped = text.add(tokenizer.encode("abc X"))
    assert not stopped and piece == "abc"  # " X" could begin the stop string
    assert text.flush() == " X"


def test_stop_token_ids_and_special_tokens_are_not_text(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("two years") + [end]
    assert _feed(IncrementalText(tokenizer, stop_token_ids={end}), ids) == ("two years", False)


def test_split_multibyte_character_waits_for_its_bytes(tokenizer):
    ids = tokenizer.encode("café ok")
    out, _ = _feed(IncrementalText(tokenizer), ids)
    assert out == "café ok" and "\ufffd" not in out
