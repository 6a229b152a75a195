"""Reading the three data formats, reporting bad records, and masking the chat-template tokens."""

import json

import pytest

from core.errors import LoragError
from core.prompt import ChatMessage
from core.prompt import build_prompt
from tests.training.conftest import FIXTURES
from training.data import IGNORE_INDEX, encode_chat, load_examples, prompt_messages, split_train_val


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)


def test_alpaca_json_array_with_system_history_and_a_bad_record():
    data = load_examples(FIXTURES / "alpaca.json")
    assert data.format == "alpaca" and data.records == 4 and len(data.examples) == 3
    history = data.examples[1].messages
    assert [m.role for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[0].content == "Answer briefly."
    assert history[3].content == "Summarise the returns policy.\n\nUnused products may be returned within 30 days."
    assert history[-1].content == "Unused products can be returned within 30 days."
    # The bad record is the third element of the array, which starts on line 10 of the file.
    assert [str(b) for b in data.bad] == [f"{FIXTURES / 'alpaca.json'}:10: field 'instruction' is empty"]


def test_sharegpt_jsonl_reports_each_bad_line_with_its_reason():
    data = load_examples(FIXTURES / "sharegpt.jsonl")
    assert data.format == "sharegpt" and data.records == 5
    assert [e.messages[-1].content for e in data.examples] == ["Three years.", "Ten minutes."]
    assert data.examples[1].messages[0] == ChatMessage("system", "Answer briefly.")
    reasons = {b.line: b.reason for b in data.bad}
    assert set(reasons) == {3, 4, 5}
    assert "must end with an assistant answer" in reasons[3]
    assert "'robot'" in reasons[4]
    assert "not valid JSON" in reasons[5]


def test_openai_messages_sample_set_is_valid():
    data = load_examples(FIXTURES.parents[2] / "data" / "train" / "sample.jsonl")
    assert data.format == "openai" and not data.bad and 30 <= len(data.examples) <= 60
    assert len(data.sha256) == 64


def test_strict_mode_fails_on_the_first_bad_record_naming_file_and_line():
    with pytest.raises(LoragError, match=r"sharegpt\.jsonl:3: conversations must end"):
        load_examples(FIXTURES / "sharegpt.jsonl", strict=True)


def test_empty_and_all_bad_files_fail_clearly(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LoragError, match="is empty"):
        load_examples(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n{oops\n")
    with pytest.raises(LoragError, match=r"all 2 records are bad \(first: .*bad\.jsonl:1: messages must end"):
        load_examples(bad)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(LoragError, match="no record is in a known format"):
        load_examples(unknown)
    with pytest.raises(LoragError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")


def test_plain_chat_prompt_is_exactly_the_servers_prompt():
    example = load_examples(FIXTURES / "sharegpt.jsonl").examples[1]
    served = build_prompt(list(example.messages[:-1]), [])
    assert prompt_messages(example).messages == served.messages
    assert served.messages[0]["role"] == "system"


def test_only_assistant_tokens_and_end_of_turn_are_trained(tokenizer):
    example = load_examples(FIXTURES / "alpaca.json").examples[0]
    conversation = [*prompt_messages(example).messages, {"role": "assistant", "content": example.answer}]
    encoded = encode_chat(conversation, tokenizer, max_seq_len=2048)
    assert len(encoded.labels) == len(encoded.input_ids)
    trained = [token for token in encoded.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Three years.<|im_end|>"
    # Every trained position holds the input token itself (labels are not shifted here).
    assert all(l in (IGNORE_INDEX, i) for l, i in zip(encoded.labels, encoded.input_ids))
    # The full sequence is the chat template's rendering, token for token.
    assert encoded.input_ids == tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    example = load_examples(FIXTURES / "sharegpt.jsonl").examples[1]
    conversation = [*prompt_messages(example).messages, {"role": "assistant", "content": example.answer}]
    encoded = encode_chat(conversation, tokenizer, max_seq_len=2048)
    trained = [token for token in encoded.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Hello!<|im_end|>Ten minutes.<|im_end|>"


def test_truncation_is_reported(tokenizer):
    conversation = [{"role": "user", "content": "question " * 30}, {"role": "assistant", "content": "answer"}]
    encoded = encode_chat(conversation, tokenizer, max_seq_len=20)
    assert encoded.truncated and len(encoded.input_ids) == 20 and encoded.target_tokens == 0


def test_validation_split_is_seeded_and_reproducible():
    items = list(range(50))
    first = split_train_val(items, 0.1, seed=3)
    assert first == split_train_val(items, 0.1, seed=3)
    assert first != split_train_val(items, 0.1, seed=4)
    train, val = first
    assert len(val) == 5 and sorted(train + val) == items
    assert split_train_val(items, 0.0, seed=3) == (items, [])


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def test_sharegpt_top_level_system_is_the_system_prompt(tmp_path):
    path = _write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "Be brief."},
        # A system turn inside the conversation overrides the column, as in LLaMA-Factory.
        {"conversations": [{"from": "system", "value": "Inner."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}], "system": "Outer."},
    ])
    first, second = load_examples(path).examples
    assert first.messages[0] == ChatMessage("system", "Be brief.")
    assert [m.content for m in second.messages if m.role == "system"] == ["Inner."]
    assert "Be brief." in prompt_messages(first).messages[0]["content"]


def test_openai_weight_zero_turns_are_context_not_targets(tmp_path, tokenizer):
    _assert_weight_zero_turns_are_context(tmp_path, tokenizer)


@pytest.mark.slow
def test_openai_weight_zero_turns_with_the_packaged_models_tokenizer(tmp_path, packaged_model_path):
    """The same with the real model's tokenizer and chat template (SmolLM2, ChatML): only the learned turn is
    labelled."""
    from transformers import AutoTokenizer

    _assert_weight_zero_turns_are_context(tmp_path, AutoTokenizer.from_pretrained(packaged_model_path))


def _assert_weight_zero_turns_are_context(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "openai.jsonl", [{"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bad old answer.", "weight": 0},
        {"role": "user", "content": "Interval?"},
        {"role": "assistant", "content": "Ten minutes.", "weight": 1},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Also not learned.", "weight": 0},
    ]}])
    example = load_examples(path).examples[0]
    # The trailing unlearned turn changes no loss, so the example ends with the answer it learns.
    assert example.answer == "Ten minutes." and example.trained_turns == (False, True)
    conversation = [*prompt_messages(example).messages, {"role": "assistant", "content": example.answer}]
    encoded = encode_chat(conversation, tokenizer, max_seq_len=2048, trained_turns=example.trained_turns)
    trained = [token for token in encoded.labels if token != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Ten minutes.<|im_end|>"
    assert "Bad old answer." in tokenizer.decode(encoded.input_ids)  # still context


@pytest.mark.parametrize(("record", "reason"), [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "every assistant message has weight 0"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]},
     r"messages\[1\]\.weight is 0\.5; expected 0 or 1"),
    ({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
     r"messages\[0\]\.weight is only allowed on assistant messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "field 'tools': tool descriptions"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "functions": [{"name": "f"}]}, "field 'functions'"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
                   {"role": "tool", "content": "42", "tool_call_id": "1"}, {"role": "assistant", "content": "a"}]},
     r"messages\[1\]\.tool_calls: tool calls and tool results are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"},
                                                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                   {"role": "assistant", "content": "a"}]},
     r"messages\[0\]\.content\[1\]\.type is 'image_url': only text content parts"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": "b"}]}, "field 'preferred_output': preference"),
    ({"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}], "images": ["a.jpg"]},
     "field 'images': image inputs are not supported"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{\"name\": \"f\"}]"},
     "field 'tools'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"},
                        {"from": "observation", "value": "1"}, {"from": "gpt", "value": "a"}]},
     r"conversations\[1\]\.from is 'function_call': tool calls"),
    ({"instruction": "q", "input": "", "chosen": "a", "rejected": "b"}, "field 'chosen': preference"),
    ({"instruction": "q", "output": "a", "images": ["a.jpg"]}, "field 'images'"),
])
def test_unsupported_documented_fields_are_refused_with_file_and_line(tmp_path, record, reason):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    if "conversations" in record:
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    elif "instruction" in record:
        good = {"instruction": "q", "output": "a"}
    path = _write_jsonl(tmp_path / "data.jsonl", [good, record])
    with pytest.raises(LoragError, match=r"data\.jsonl:2: " + reason):
        load_examples(path, strict=True)
    data = load_examples(path)
    assert len(data.examples) == 1 and data.bad[0].line == 2
