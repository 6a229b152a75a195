"""Causal-LM loss from hidden states, computed in chunks of target tokens.

The full (batch, seq, vocab) float32 logits tensor is never built: only positions whose label is not
-100 go through ``lm_head``, a chunk at a time, and each chunk's logits are recomputed in backward
instead of kept (for a 150k vocabulary that is the largest activation of the whole step).
"""

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from training.data import IGNORE_INDEX


class CausalLMLoss(nn.Module):
    """Wraps a causal LM (plain or peft) so ``forward`` returns (sum of token losses, target tokens).

    Being an ``nn.Module`` lets DDP wrap it: the decoder is called through this module's forward.
    """

    def __init__(self, model: nn.Module, *, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    @property
    def causal_lm(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor):
        causal_lm = self.causal_lm
        decoder = getattr(causal_lm, causal_lm.base_model_prefix)
        # attention_mask=None + restarting position_ids: transformers keeps packed sequences apart.
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]  # (batch, seq-1): token t+1 is predicted at position t
        keep = targets != IGNORE_INDEX
        states = hidden[:, :-1][keep]  # (n_targets, hidden)
        targets = targets[keep]  # (n_targets,)
        lm_head = causal_lm.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), self.chunk_tokens):
            chunk = slice(start, start + self.chunk_tokens)
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, lm_head, states[chunk], targets[chunk], use_reentrant=False)
            else:
                total = total + _chunk_loss(lm_head, states[chunk], targets[chunk])
        return total, targets.numel()


def _chunk_loss(lm_head: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(states).float()  # (chunk, vocab)
    return F.cross_entropy(logits, targets, reduction="sum")
