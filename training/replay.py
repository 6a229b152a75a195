"""Replay against forgetting: the base model's own answers to general prompts, mixed into adapter training.

A RAFT adapter learns to answer tersely from passages; asked something without documents it then answers
tersely too, and a general-ability check scores worse (benchmarks/RESULTS.md). Training on the base model's
own greedy answers to prompts without documents (self-distillation) tells the adapter to leave that
behaviour as it was, without needing anyone's answer key: the targets are what the base model says.

The prompts are the server's own prompt without passages (``core.prompt.build_prompt``), the same one a
request without retrieval gets, so what is kept is what users see.
"""

import json
import logging
from pathlib import Path

from core.atomic import write_atomically
from core.datadir import PRIVATE_FILE_MODE, make_private_dir
from core.errors import LoragError
from core.prompt import ChatMessage
from training.data import Example, prompt_messages, read_json_records

log = logging.getLogger(__name__)

CACHE_FILE = "replay.jsonl"  # in the run dir: a resumed run trains on exactly the answers the first one made


def load_prompts(path: str | Path) -> list[str]:
    """The prompts of a replay file: JSON or JSONL records with a ``question`` (a lorag question set works
    as it is) or a ``prompt``. Bad records are named by file:line and skipped.

    Raises:
        LoragError: the file cannot be read or holds no prompt.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise LoragError(f"replay file {str(path)!r}: cannot read it: {error}") from error
    prompts = []
    for line, record, error in read_json_records(text, str(path)):
        prompt = record.get("question", record.get("prompt")) if isinstance(record, dict) and error is None else None
        if not isinstance(prompt, str) or not prompt.strip():
            log.warning("%s:%d: skipped: %s", path, line, error or "expected an object with a 'question' or 'prompt' string")
            continue
        prompts.append(prompt.strip())
    if not prompts:
        raise LoragError(f"replay file {str(path)!r} holds no prompt", hint="one JSON object per line with a 'question'")
    return prompts


def replay_conversations(prompts: list[str], *, base_path: str, tokenizer, max_new_tokens: int, run_dir: Path,
                         write_cache: bool, device: str, reuse_cache: bool = True,
                         batch_size: int = 16) -> list[list[dict]]:
    """``prompts`` answered greedily by the base model as the server would prompt it, as training conversations.

    Answers that reach ``max_new_tokens`` without ending are left out: a loop learnt is worse than none. The
    answers are cached in ``run_dir`` (by the main process when ``write_cache``) and read back when
    ``reuse_cache`` (a resumed run); a new run generates them again, since its prompts may differ.
    """
    cache = run_dir / CACHE_FILE
    if reuse_cache and cache.is_file():
        return [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines() if line.strip()]
    messages = [prompt_messages(Example((ChatMessage("user", p), ChatMessage("assistant", "")), 0)).messages
                for p in prompts]
    answers = _generate(messages, base_path=base_path, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                        device=device, batch_size=batch_size)
    conversations = [[*m, {"role": "assistant", "content": answer}]
                     for m, answer in zip(messages, answers) if answer is not None]
    log.info("replay: %d of %d base-model answers kept (the rest ran to %d tokens without ending)",
             len(conversations), len(prompts), max_new_tokens)
    if write_cache:  # whole or not at all: a run killed here regenerates on resume instead of reading half a file
        make_private_dir(run_dir)
        write_atomically(cache, "".join(json.dumps(c) + "\n" for c in conversations), mode=PRIVATE_FILE_MODE)
    return conversations


def _generate(messages: list[list[dict]], *, base_path: str, tokenizer, max_new_tokens: int, device: str,
              batch_size: int) -> list[str | None]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # A second, plain copy of the base: training loads its own (maybe 4-bit, maybe sharded) one afterwards.
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(device).eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The end of an answer: the generation config's EOS ids (a chat model's end-of-turn) and the tokenizer's.
    configured = model.generation_config.eos_token_id
    ends = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])} - {None}
    answers: list[str | None] = []
    try:
        for start in range(0, len(messages), batch_size):
            texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     for m in messages[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=sorted(ends))
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                ended = any(token in ends for token in row)
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                answers.append(text if ended and text else None)
    finally:
        tokenizer.padding_side = padding_side
        del model
    return answers
