"""Next-token choice on the device: greedy, temperature and top-p, with optional per-request seeds, after a
repetition penalty on the tokens each row has generated so far."""

import torch


def sample(
    logits: torch.Tensor,
    *,
    temperatures: list[float],
    top_ps: list[float],
    generators: list[torch.Generator | None],
    penalties: list[float] | None = None,
    generated: list[list[int]] | None = None,
) -> list[int]:
    """One token id per row of ``logits`` (rows, vocab) float32.

    A row with a repetition penalty p != 1 first has the logit of every token it already generated divided by
    p where positive and multiplied by p where negative (the CTRL rule transformers uses); prompt tokens are
    not penalised, so copying from the documents stays cheap.

    A row with temperature 0 is greedy (argmax, ties to the lowest id as transformers does). Other
    rows sample from softmax(logits / temperature) cut to the smallest set of tokens whose
    probability reaches top_p; a row with its own generator draws from it (reproducible per seed).
    """
    if penalties is not None and generated is not None:
        logits = penalise_repeats(logits, penalties, generated)
    choice = logits.argmax(dim=-1)
    sampled = [i for i, t in enumerate(temperatures) if t > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([temperatures[i] for i in sampled], device=logits.device, dtype=logits.dtype)
        probs = torch.softmax(logits[index] / temps[:, None], dim=-1)
        tops = torch.tensor([top_ps[i] for i in sampled], device=logits.device, dtype=logits.dtype)
        probs = _top_p(probs, tops)
        drawn = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
        shared = [j for j, i in enumerate(sampled) if generators[i] is None]
        if shared:
            drawn[shared] = torch.multinomial(probs[shared], 1).squeeze(1)
        for j, i in enumerate(sampled):
            if generators[i] is not None:
                drawn[j] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
        choice[index] = drawn
    return choice.tolist()


def penalise_repeats(logits: torch.Tensor, penalties: list[float], generated: list[list[int]]) -> torch.Tensor:
    """``logits`` (rows, vocab) with each row's already generated tokens penalised (a copy when any row is)."""
    rows = [(i, sorted(set(tokens))) for i, (p, tokens) in enumerate(zip(penalties, generated)) if p != 1.0 and tokens]
    if not rows:
        return logits
    logits = logits.clone()
    row_index = torch.tensor([i for i, tokens in rows for _ in tokens], device=logits.device)
    token_index = torch.tensor([t for _, tokens in rows for t in tokens], device=logits.device)
    factor = torch.tensor([penalties[i] for i, tokens in rows for _ in tokens], device=logits.device, dtype=logits.dtype)
    seen = logits[row_index, token_index]
    logits[row_index, token_index] = torch.where(seen > 0, seen / factor, seen * factor)
    return logits


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row beyond its nucleus (the most likely token always stays), renormalised."""
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(dim=-1) - ordered  # probability mass ahead of each token
    ordered = ordered.masked_fill(before >= top_p[:, None], 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return kept / kept.sum(dim=-1, keepdim=True)


def row_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator for one request's draws, or None to share the engine's."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
