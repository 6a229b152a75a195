"""The contract between the chat route and whatever produces answer text.

Implementations: the in-process transformers generator, the extractive fallback, and the
multi-adapter engine. A remote OpenAI-compatible backend (e.g. vLLM serving base + LoRA)
fits the same shape: it receives the conversation and passages, builds the prompt, streams text.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from core.errors import LoragError
from core.prompt import ChatMessage
from core.records import Passage


# Without max_tokens the prompt (passages, history) may fill the context up to this share; the answer gets the rest.
ANSWER_SHARE = 4  # the answer always keeps at least 1/ANSWER_SHARE of the context


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until the model ends its answer or the context is full (OpenAI's rule)
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # > 1 discourages repeating what the answer already said (not the prompt): small models loop without it
    repetition_penalty: float = 1.0
    logprobs: bool = False  # report each generated token's log-probability (generators with ``logprobs = True``)
    top_logprobs: int = 0  # and this many most likely alternatives at each position

    def check(self, *, context_tokens: int, model: str) -> None:
        """Refuse values no generator can honour, the same way for every generator.

        Raises:
            LoragError: max_tokens below 1 or leaving no room for a prompt, negative temperature, top_p outside (0, 1].
        """
        if self.max_tokens is not None and self.max_tokens < 1:
            raise LoragError(f"max_tokens is {self.max_tokens}; it must be at least 1")
        if self.max_tokens is not None and self.max_tokens >= context_tokens:
            raise LoragError(
                f"max_tokens={self.max_tokens} leaves no room for the prompt in the {context_tokens}-token context "
                f"of {model}; it must be between 1 and {context_tokens - 1}"
            )
        if self.temperature < 0:
            raise LoragError(f"temperature is {self.temperature}; it must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise LoragError(f"top_p is {self.top_p}; it must be in (0, 1]")
        if not 0 < self.repetition_penalty <= 10:
            raise LoragError(f"repetition_penalty is {self.repetition_penalty}; it must be in (0, 10]")

    def prompt_budget(self, context_tokens: int) -> int:
        """Tokens the prompt may use: the context less max_tokens, or less 1/ANSWER_SHARE of it without max_tokens."""
        reserved = self.max_tokens if self.max_tokens is not None else max(1, context_tokens // ANSWER_SHARE)
        return context_tokens - reserved

    def answer_tokens(self, context_tokens: int, prompt_tokens: int) -> int:
        """The most tokens the answer may have once the prompt is known."""
        room = max(1, context_tokens - prompt_tokens)
        return room if self.max_tokens is None else min(self.max_tokens, room)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a generator needs; it builds the prompt itself (it owns the tokenizer and budget)."""

    messages: tuple[ChatMessage, ...]
    passages: tuple[Passage, ...]  # retrieved, best first; empty when retrieval is off
    sampling: SamplingParams = SamplingParams()
    adapter: str | None = None  # registry key of the tenant's adapter; None = base model
    request_id: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as OpenAI's ``logprobs.content`` reports it."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()  # the most likely tokens at this position, best first

    def as_openai(self) -> dict:
        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return entry(self.token, self.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in self.top]}


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer as it is produced."""

    text: str
    tokens: int = 0  # tokens this delta adds (0 for generators that do not count tokens)
    finish_reason: Literal["stop", "length", "cancelled"] | None = None  # set on the last delta
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens of this delta, when the request asked for logprobs


@dataclass(frozen=True)
class PromptInfo:
    """What the generator actually put in front of the model, reported back to the caller."""

    prompt_tokens: int
    passages_used: tuple[Passage, ...]  # numbered [1]..[n] in this order; budget may drop the tail
    dropped_passages: int = 0


@dataclass
class GenerationStream:
    """A running generation: iterate ``deltas``; ``prompt`` is known before the first delta."""

    prompt: PromptInfo
    deltas: AsyncIterator[TextDelta]
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Generator(Protocol):
    name: str  # reported to clients, e.g. "transformers:Qwen/Qwen2.5-0.5B-Instruct" or "extractive"
    kind: Literal["generative", "extractive"]

    async def start(self, request: GenerationRequest) -> GenerationStream:
        """Build the prompt and begin generating. Cancelling the consuming task cancels generation."""
        ...

    async def close(self) -> None:
        """Release model memory and worker threads."""
        ...
