"""transformers + peft greedy generation: the reference the engine's tokens are compared with (by the
engine tests, and by benchmarks/engine_parity.py at real model sizes)."""

from collections.abc import Mapping
from pathlib import Path

import torch


def load_peft_model(base, adapters: Mapping[str, Path]):
    """``base`` (a transformers model) wrapped by peft with every adapter loaded under its name."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def greedy_tokens(model, prompt: list[int], adapter: str | None, n: int, *, eos: int | None = None) -> list[int]:
    """Up to ``n`` greedy token ids after ``prompt`` with ``adapter`` (None: the base model alone), stopping
    early only at ``eos``."""
    ids = torch.tensor([prompt], device=model.device)
    kwargs = dict(max_new_tokens=n, min_new_tokens=0, do_sample=False, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, **kwargs)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, **kwargs)
    return out[0, len(prompt):].tolist()
