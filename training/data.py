"""Training data: read alpaca / sharegpt / OpenAI-messages files, render them with the serving prompt
and the base model's chat template, and turn them into token ids with loss only on assistant tokens.
"""

import hashlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import LoragError
from core.prompt import ChatMessage

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips
FORMATS = ("alpaca", "sharegpt", "openai")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Documented fields of LLaMA-Factory's data formats (data/README.md) and OpenAI's fine-tuning format that lorag
# cannot train on. A record using one is refused by name rather than trained as if the field were not there.
_UNSUPPORTED_FIELDS = {
    "tools": "tool descriptions (function calling) are not supported",
    "functions": "function descriptions (function calling) are not supported",
    "images": "image inputs are not supported (lorag trains text-only models)",
    "videos": "video inputs are not supported (lorag trains text-only models)",
    "audios": "audio inputs are not supported (lorag trains text-only models)",
    "chosen": "preference (chosen/rejected) data is not supported; lorag trains supervised answers only",
    "rejected": "preference (chosen/rejected) data is not supported; lorag trains supervised answers only",
    "kto_tag": "KTO feedback data is not supported; lorag trains supervised answers only",
    "preferred_output": "preference (DPO) data is not supported; lorag trains supervised answers only",
    "non_preferred_output": "preference (DPO) data is not supported; lorag trains supervised answers only",
}
_TOOL_ROLES = ("observation", "function_call", "tool", "function")


@dataclass(frozen=True)
class Example:
    """One conversation ending in the assistant answer to learn; ``line`` points back into the file."""

    messages: tuple[ChatMessage, ...]
    line: int
    # One flag per assistant turn of ``messages``, in order: False for a turn kept as context but not learned
    # (OpenAI fine-tuning's ``weight: 0``). None: every assistant turn is learned.
    trained_turns: tuple[bool, ...] | None = None

    @property
    def question(self) -> str:
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    @property
    def answer(self) -> str:
        return self.messages[-1].content


@dataclass(frozen=True)
class BadRecord:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class LoadedData:
    path: Path
    format: str
    sha256: str
    records: int
    examples: list[Example]
    bad: list[BadRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; ``labels[i]`` is ``input_ids[i]`` on assistant tokens, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def load_examples(path: str | Path, *, strict: bool = False) -> LoadedData:
    """Read a JSON or JSONL training file, detect its format and validate every record.

    Bad records are logged as ``file:line: reason`` and skipped (with ``strict``, the first one fails).

    Raises:
        LoragError: the file is missing, unreadable, empty, has no valid record, or (strict) a bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise LoragError(f"training data file {str(path)!r} does not exist")
    raw = path.read_bytes()
    sha256 = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LoragError(f"training data file {str(path)!r} is not UTF-8 text: {error}") from error
    if not text.strip():
        raise LoragError(f"training data file {str(path)!r} is empty", hint="Add records in alpaca, sharegpt or OpenAI messages format")

    records = list(read_json_records(text, str(path)))
    data_format = detect_format([record for _, record, error in records if error is None])
    if data_format is None:
        raise LoragError(
            f"training data file {str(path)!r}: no record is in a known format",
            hint="Use alpaca (instruction/output), sharegpt (conversations with from/value) or OpenAI (messages with role/content)",
        )
    parse = {"alpaca": _parse_alpaca, "sharegpt": _parse_sharegpt, "openai": _parse_openai}[data_format]
    examples, bad = [], []
    for line, record, error in records:
        if error is None:
            try:
                messages, trained_turns = parse(record)
                examples.append(Example(messages, line, trained_turns))
                continue
            except ValueError as invalid:
                error = str(invalid)
        problem = BadRecord(str(path), line, error)
        if strict:
            raise LoragError(f"bad training record {problem}", hint="Fix the record or run without --strict to skip it")
        log.warning("skipping bad training record %s", problem)
        bad.append(problem)
    if not examples:
        raise LoragError(
            f"training data file {str(path)!r}: all {len(records)} records are bad (first: {bad[0]})"
        )
    return LoadedData(path, data_format, sha256, len(records), examples, bad)


def detect_format(records: Sequence[object]) -> str | None:
    """The format of the first record that looks like one of the three, or None."""
    for record in records:
        if isinstance(record, dict):
            if "preferred_output" in record or "non_preferred_output" in record:
                return "openai"  # OpenAI's preference format: refused per record with the reason
            if "messages" in record:
                return "openai"
            if "conversations" in record:
                return "sharegpt"
            if "instruction" in record or "output" in record:
                return "alpaca"
    return None


def read_json_records(text: str, name: str) -> Iterator[tuple[int, object, str | None]]:
    """Yield (line, record, error) for a JSON array or JSONL text; error is None for parsed records.

    Shared by the training formats and the evaluation question sets, so both report bad lines alike.
    """
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _read_json_array(text, name)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as error:
            yield number, None, f"not valid JSON: {error.msg} (column {error.colno})"


def _read_json_array(text: str, name: str) -> Iterator[tuple[int, object, str | None]]:
    decoder = json.JSONDecoder()
    position = text.index("[") + 1

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        return pos

    position = skip(position)
    while position < len(text) and text[position] != "]":
        line = text.count("\n", 0, position) + 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            # A broken element makes the rest of the array unreadable: there is no safe place to resume.
            raise LoragError(f"training data file {name}:{error.lineno}: not valid JSON: {error.msg}") from error
        yield line, record, None
        position = skip(position)


def _require_text(record: dict, key: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def _refuse_unsupported_fields(record: dict) -> None:
    """Raise for a documented field lorag cannot train on, when it carries something (empty values are harmless)."""
    for key, reason in _UNSUPPORTED_FIELDS.items():
        if record.get(key) not in (None, "", [], {}):
            raise ValueError(f"field {key!r}: {reason}")


def _parse_alpaca(record: object) -> tuple[tuple[ChatMessage, ...], None]:
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with instruction/output, got {type(record).__name__}")
    _refuse_unsupported_fields(record)
    if "instruction" not in record or "output" not in record:
        raise ValueError(f"alpaca record needs 'instruction' and 'output'; found keys {sorted(record)}")
    instruction = _require_text(record, "instruction")
    extra = _require_text(record, "input", optional=True)
    output = _require_text(record, "output")
    system = _require_text(record, "system", optional=True)
    messages = [ChatMessage("system", system)] if system.strip() else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ValueError("field 'history' must be a list of [instruction, answer] pairs")
    for index, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(p, str) and p.strip() for p in pair)):
            raise ValueError(f"history[{index}] must be a pair of non-empty strings")
        messages += [ChatMessage("user", pair[0]), ChatMessage("assistant", pair[1])]
    question = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return (*messages, ChatMessage("user", question), ChatMessage("assistant", output)), None


def _parse_sharegpt(record: object) -> tuple[tuple[ChatMessage, ...], None]:
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ValueError("sharegpt record needs 'conversations': a list of {from, value}")
    _refuse_unsupported_fields(record)
    messages = []
    for index, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict):
            raise ValueError(f"conversations[{index}] must be an object with 'from' and 'value'")
        if turn.get("from") in _TOOL_ROLES:
            raise ValueError(f"conversations[{index}].from is {turn.get('from')!r}: tool calls and tool results are not supported")
        role = _SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"conversations[{index}].from is {turn.get('from')!r}; expected human, gpt or system")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"conversations[{index}].value must be non-empty text")
        messages.append(ChatMessage(role, value))
    # LLaMA-Factory's top-level system prompt; a system turn inside the conversation overrides it, as there.
    system = _require_text(record, "system", optional=True)
    if system.strip() and not any(m.role == "system" for m in messages):
        messages.insert(0, ChatMessage("system", system))
    return _check_conversation(messages, "conversations"), None


def _parse_openai(record: object) -> tuple[tuple[ChatMessage, ...], tuple[bool, ...] | None]:
    if not isinstance(record, dict):
        raise ValueError("OpenAI record needs 'messages': a list of {role, content}")
    _refuse_unsupported_fields(record)
    if not isinstance(record.get("messages"), list):
        raise ValueError("OpenAI record needs 'messages': a list of {role, content}")
    messages, weights = [], []
    for index, turn in enumerate(record["messages"]):
        if not isinstance(turn, dict):
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        role, content = turn.get("role"), turn.get("content")
        if role in _TOOL_ROLES or turn.get("tool_calls") or turn.get("function_call"):
            field_name = "role" if role in _TOOL_ROLES else ("tool_calls" if turn.get("tool_calls") else "function_call")
            raise ValueError(f"messages[{index}].{field_name}: tool calls and tool results are not supported")
        if role == "developer":  # the newer name of the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{index}].role is {role!r}; expected system, user or assistant")
        if isinstance(content, list):
            content = _text_parts(content, f"messages[{index}].content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{index}].content must be non-empty text")
        if "weight" in turn:
            weight = turn["weight"]
            if role != "assistant":
                raise ValueError(f"messages[{index}].weight is only allowed on assistant messages")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise ValueError(f"messages[{index}].weight is {weight!r}; expected 0 or 1")
        if role == "assistant":
            weights.append(turn.get("weight", 1) == 1)
        messages.append(ChatMessage(role, content))
    if weights and not any(weights):
        raise ValueError("every assistant message has weight 0: nothing to learn")
    # Assistant turns after the last learned one change no loss (the model is causal): leave them out so the
    # example ends with the answer it learns.
    if messages and messages[-1].role == "assistant":
        while not weights[-1]:
            weights.pop()
            messages.pop()
            while messages[-1].role != "assistant":
                messages.pop()
    trained = None if all(weights) else tuple(weights)
    return _check_conversation(messages, "messages"), trained


def _text_parts(parts: list, where: str) -> str:
    """The text of OpenAI content parts; image, audio and file parts are refused, not dropped."""
    texts = []
    for number, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"{where}[{number}].type is {kind!r}: only text content parts are supported")
        texts.append(part.get("text", ""))
    return "".join(texts)


def _check_conversation(messages: list[ChatMessage], key: str) -> tuple[ChatMessage, ...]:
    if not messages or messages[-1].role != "assistant":
        raise ValueError(f"{key} must end with an assistant answer")
    if not any(m.role == "user" for m in messages):
        raise ValueError(f"{key} has no user turn")
    dialogue = [m.role for m in messages if m.role != "system"]
    for first, second in zip(dialogue, dialogue[1:]):
        if first == second:
            raise ValueError(f"{key} has two {first} turns in a row")
    return tuple(messages)


def prompt_messages(example: Example, passages: Sequence = (), *, tokenizer=None, max_prompt_tokens=None):
    """The server's prompt for this example (``core.prompt.build_prompt``), without the answer."""
    from core.prompt import build_prompt

    return build_prompt(example.messages[:-1], passages, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens)


def encode_chat(
    messages: Sequence[dict], tokenizer, *, max_seq_len: int, trained_turns: Sequence[bool] | None = None
) -> Encoded:
    """Render ``messages`` (ending with the assistant answer) through the chat template and mask labels.

    Labels keep every assistant turn's content plus the end-of-turn token that follows it; the
    template's role headers, the system prompt and the user turns are -100. Sequences longer than
    ``max_seq_len`` are cut at the end (``truncated`` is set). ``trained_turns`` (``Example.trained_turns``)
    masks the assistant turns flagged False; it is matched to the last assistant turns, so a prompt that
    dropped its oldest turns to fit still lines up.

    Raises:
        LoragError: the chat template does not render a conversation as a prefix of its extension.
    """
    messages = [dict(m) for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assistant_turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    learned = set(assistant_turns)
    if trained_turns is not None:
        learned = {index for index, flag in zip(reversed(assistant_turns), reversed(trained_turns)) if flag}
        learned |= set(assistant_turns[: max(len(assistant_turns) - len(trained_turns), 0)])
    spans = []
    for index, message in enumerate(messages):
        if index not in learned:
            continue
        prefix = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        content = message["content"].strip()
        start = text.find(content, len(prefix)) if text.startswith(prefix) else -1
        if start < 0:
            raise LoragError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', 'the tokenizer')!r} does not render "
                "assistant turns after the generation prompt, so the answer tokens cannot be masked"
            )
        spans.append((start, start + len(content)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        end_of_turn_pending = True
        for position, (token_start, token_end) in enumerate(offsets):
            if start <= token_start < end:
                labels[position] = input_ids[position]
            elif token_start >= end and end_of_turn_pending:
                # The token right after the answer closes the turn (<|im_end|>, <|eot_id|>): learning it
                # is what makes generation stop.
                labels[position] = input_ids[position]
                end_of_turn_pending = False
    labels[0] = IGNORE_INDEX  # the first token has no predecessor; also keeps packed sequences separate
    truncated = len(input_ids) > max_seq_len
    return Encoded(input_ids[:max_seq_len], labels[:max_seq_len], truncated)


def split_train_val(items: Sequence, val_split: float, *, seed: int) -> tuple[list, list]:
    """A seeded shuffle and split: the same seed and data always give the same validation set."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(items) * val_split))
    if val_split > 0 and len(items) >= 2:
        n_val = min(max(n_val, 1), len(items) - 1)
    else:
        n_val = 0
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    return train, val
