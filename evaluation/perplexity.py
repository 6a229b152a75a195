"""Perplexity of the base model and of base + adapter on a held-out instruction set (any training format).

Examples are rendered exactly as training renders them (the server's prompt, the chat template, loss
on answer tokens only), so the numbers are comparable with the manifest's validation perplexity.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from core.errors import LoragError
from training.recipe import perplexity_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    examples: int
    tokens: int  # answer tokens scored per model
    base: float
    adapter: float | None  # None without an adapter

    def as_dict(self) -> dict:
        return {"examples": self.examples, "tokens": self.tokens, "base": self.base, "adapter": self.adapter}


def measure_perplexity(
    data_file: str | Path, *, base_model: str, adapter_dir: Path | None = None, max_seq_len: int = 1024,
    batch_size: int = 4, device: str | None = None,
) -> PerplexityResult:
    """exp(mean answer-token loss) of ``base_model`` and of it with the adapter in ``adapter_dir``.

    Raises:
        LoragError: bad data file, a model or adapter that cannot be loaded, no example within ``max_seq_len``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from training.batches import collate, single_rows
    from training.data import encode_chat, load_examples, prompt_messages
    from training.loss import CausalLMLoss
    from training.model import load_tokenizer

    tokenizer = load_tokenizer(base_model)
    examples = load_examples(data_file).examples
    encoded = []
    for example in examples:
        messages = [*prompt_messages(example).messages, {"role": "assistant", "content": example.answer}]
        item = encode_chat(messages, tokenizer, max_seq_len=max_seq_len, trained_turns=example.trained_turns)
        if item.target_tokens:
            encoded.append(item)
    if not encoded:
        raise LoragError(f"held-out file {str(data_file)!r}: no example keeps an answer token within {max_seq_len} tokens")
    rows = single_rows(encoded)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(device)
    except (OSError, ValueError) as error:
        raise LoragError(f"cannot load base model {base_model!r} for perplexity: {error}") from error
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir)).to(device)
        except (OSError, ValueError, RuntimeError) as error:
            raise LoragError(f"cannot load adapter {str(adapter_dir)!r} onto {base_model!r}: {error}") from error
    model.eval()
    scorer = CausalLMLoss(model)

    def mean_loss() -> tuple[float, int]:
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collate(rows[start : start + batch_size], tokenizer.pad_token_id)
                loss, n = scorer(**{key: value.to(device) for key, value in batch.items()})
                total, count = total + float(loss), count + int(n)
        return total / max(count, 1), count

    if adapter_dir is not None:
        with model.disable_adapter():
            base_loss, tokens = mean_loss()
        adapter_loss, _ = mean_loss()
    else:
        base_loss, tokens = mean_loss()
        adapter_loss = None
    return PerplexityResult(
        examples=len(rows), tokens=tokens, base=perplexity_of(base_loss), adapter=perplexity_of(adapter_loss),
    )
