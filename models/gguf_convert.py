"""Turns a GGUF chat model into a plain transformers directory (safetensors, tokenizer, generation config).

transformers dequantizes GGUF weights on load but refuses to ``save_pretrained`` such a model (its config keeps a
``quantization_config`` naming the GGUF origin). We drop that, rebuild an ordinary model from the config, move the
dequantized weights in and save it; then we read the directory back and check that what a chat server relies on
survived: the chat template, the token ids it renders, end-of-turn and padding tokens.
"""

import logging
from pathlib import Path

from core.errors import LoragError

log = logging.getLogger(__name__)

CHATML_END = "<|im_end|>"  # ChatML's end of turn: a chat model must stop there, whatever its eos_token says
_PROBE = [
    {"role": "system", "content": "Answer from the documents."},
    {"role": "user", "content": "How long is the warranty? Cite like [1]."},
]


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors in float32, tokenizer files, generation_config.json).

    float32 keeps the dequantized values exactly (GGUF blocks are fp16 scale x small integer, which bfloat16
    cannot always hold); loading picks the serving dtype (``generation.dtype``). ``out_dir`` should be empty
    or missing; the caller makes the write atomic. The generation config stops at the tokenizer's eos token and
    at ChatML's ``<|im_end|>``, and pads with the tokenizer's pad token (its eos token when it has none).

    Raises:
        LoragError: the file cannot be read as a GGUF causal LM, it carries no chat template (not a chat model),
            its weights do not fit its config, or the written directory does not read back the same.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, ImportError, KeyError) as error:
        raise LoragError(
            f"cannot read {str(gguf_path)!r} as a GGUF causal LM: {type(error).__name__}: {error}",
            hint="Check that the file is complete (reinstall the package that ships it) and that the gguf "
            "package is installed (pip install gguf)",
        ) from error
    if not getattr(tokenizer, "chat_template", None):
        raise LoragError(f"{str(gguf_path)!r} carries no chat template: it is not an instruct/chat model")

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF origin; the weights are already dequantized
    config.dtype = torch.float32
    with torch.device("meta"):  # no second allocation: the loaded tensors are moved in below
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    plain.tie_weights()  # re-link lm_head to the embedding when the config ties them
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise LoragError(f"the weights in {str(gguf_path)!r} do not match its config: "
                         f"missing {missing}, unexpected {unexpected}")

    eos_ids = _end_of_turn_ids(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # GGUF tokenizers come without a length limit; the model's context is the honest one.
    tokenizer.model_max_length = config.max_position_embeddings
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    plain.generation_config = generation_config
    plain.config.eos_token_id = tokenizer.eos_token_id
    plain.config.pad_token_id = tokenizer.pad_token_id

    out_dir.mkdir(parents=True, exist_ok=True)
    plain.eval().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    check_round_trip(out_dir, tokenizer=tokenizer, eos_ids=eos_ids)
    return out_dir


def check_round_trip(path: Path, *, tokenizer, eos_ids: list[int]) -> None:
    """Read ``path`` back and compare it with the tokenizer and end-of-turn ids it was written from.

    Raises:
        LoragError: the chat template, the rendered token ids, the eos ids or the pad token changed.
    """
    from transformers import AutoTokenizer, GenerationConfig

    reread = AutoTokenizer.from_pretrained(path)
    generation = GenerationConfig.from_pretrained(path)
    configured = generation.eos_token_id
    configured = sorted(configured) if isinstance(configured, list) else [configured]
    problems = []
    if reread.chat_template != tokenizer.chat_template:
        problems.append("the chat template changed")
    elif _render(reread) != _render(tokenizer):
        problems.append("the chat template renders other token ids")
    if configured != eos_ids:
        problems.append(f"generation_config.json eos_token_id is {configured}, expected {eos_ids}")
    if reread.pad_token_id is None or generation.pad_token_id != reread.pad_token_id:
        problems.append(f"pad token: tokenizer {reread.pad_token_id}, generation_config {generation.pad_token_id}")
    if problems:
        raise LoragError(f"the converted model in {str(path)!r} does not read back as written: {'; '.join(problems)}",
                         hint="Delete that directory and report the transformers/gguf versions")


def _end_of_turn_ids(tokenizer) -> list[int]:
    """The tokenizer's eos id plus ChatML's ``<|im_end|>`` when the template uses it (never unk)."""
    ids = {tokenizer.eos_token_id}
    if CHATML_END in (tokenizer.chat_template or ""):
        ids.add(tokenizer.convert_tokens_to_ids(CHATML_END))
    ids -= {None, tokenizer.unk_token_id}
    if not ids:
        raise LoragError(f"the tokenizer of {tokenizer.name_or_path!r} names no end-of-sequence token")
    return sorted(ids)


def _render(tokenizer) -> list[int]:
    encoded = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(encoded)
