"""EngineGenerator: the Generator protocol on top of the multi-adapter engine, streaming through asyncio."""

import asyncio
import logging

import torch

from retrieval.errors import LoragError
from server.engine.detokenizer import IncrementalText
from server.engine.engine import Engine, EngineConfig
from server.engine.lora_slots import AdapterSlots
from server.engine.rope import UnsupportedModel
from server.engine.scheduler import Sequence
from server.generation import GenerationRequest, GenerationStream, PromptInfo, TextDelta
from server.prompting import build_prompt

log = logging.getLogger(__name__)


class EngineError(LoragError):
    """The engine failed while generating (not the request's fault)."""

    http_status = 500


class EngineGenerator:
    """Generates for many requests at once, each with its own adapter (or none).

    ``adapters`` is the residency API (load(name, path) -> slot, unload(name), resident()); a
    request's ``adapter`` must be resident when it starts.
    """

    kind = "generative"

    def __init__(self, engine: Engine, tokenizer, *, name: str, stop_token_ids: frozenset[int] = frozenset()):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.stop_token_ids = frozenset(stop_token_ids)

    @property
    def adapters(self) -> AdapterSlots:
        return self.engine.adapters

    @classmethod
    def from_pretrained(cls, path: str, *, config: EngineConfig = EngineConfig(), device=None, dtype=None,
                        name: str | None = None) -> "EngineGenerator":
        """Load model and tokenizer from ``path`` and start the engine thread.

        Raises:
            UnsupportedModel: the architecture or one of its settings is outside what the engine runs.
        """
        from transformers import AutoTokenizer

        engine = Engine.from_pretrained(path, config=config, device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(engine, tokenizer, name=name or f"engine:{path}", stop_token_ids=_stop_ids(path, tokenizer))

    async def start(self, request: GenerationRequest) -> GenerationStream:
        """Build the prompt, queue the request in the engine and return its stream.

        Raises:
            LoragError: the prompt cannot fit the engine's context.  NotFound: the adapter is not resident.
        """
        sampling = request.sampling
        context = self.engine.cache.max_len
        if sampling.max_tokens < 1 or sampling.max_tokens >= context:
            raise LoragError(f"max_tokens={sampling.max_tokens} must be between 1 and {context - 1} (the engine's context)")
        prompt = build_prompt(request.messages, request.passages, tokenizer=self.tokenizer,
                              max_prompt_tokens=context - sampling.max_tokens)
        slot = self.engine.adapters.acquire(request.adapter)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(tokens, finish, error):  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, (tokens, finish, error))

        seq = Sequence(prompt=list(prompt.token_ids), max_tokens=sampling.max_tokens, emit=emit, adapter_slot=slot,
                       temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                       stop_token_ids=self.stop_token_ids)
        try:
            self.engine.scheduler.submit(seq)
        except BaseException:
            self.engine.adapters.release(slot)
            raise
        text = IncrementalText(self.tokenizer, stop_token_ids=self.stop_token_ids, stop=sampling.stop)
        info = PromptInfo(prompt_tokens=len(seq.prompt), passages_used=tuple(prompt.passages),
                          dropped_passages=prompt.dropped)
        return GenerationStream(prompt=info, deltas=self._deltas(seq, queue, text), extra={"engine_request": seq.seq_id})

    async def _deltas(self, seq: Sequence, queue: asyncio.Queue, text: IncrementalText):
        done = False
        try:
            while True:
                tokens, finish, error = await queue.get()
                while finish is None and not queue.empty():  # coalesce what piled up while we were away
                    more, finish, error = queue.get_nowait()
                    tokens = tokens + more
                if error is not None:
                    done = True
                    raise EngineError(f"generation of request {seq.seq_id} failed in the engine: {error}") from error
                piece, stopped = text.add(tokens)
                if stopped:
                    self.engine.scheduler.cancel(seq.seq_id)
                    done = True
                    yield TextDelta(piece, tokens=len(tokens), finish_reason="stop")
                    return
                if finish is not None:
                    done = True
                    yield TextDelta(piece + text.flush(), tokens=len(tokens), finish_reason=finish)
                    return
                if piece or tokens:
                    yield TextDelta(piece, tokens=len(tokens))
        finally:
            if not done:  # the consumer went away: free the row and the adapter slot
                self.engine.scheduler.cancel(seq.seq_id)

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)


def load_engine_generator(settings) -> EngineGenerator | None:
    """The engine for ``settings.generation.model``, or None (logged) when it cannot run that architecture.

    ``settings`` is a ServerSettings: ``generation`` gives model/device/dtype/max_batch_size/
    max_context_tokens, ``adapters`` gives max_resident/max_rank.
    """
    gen, adapters = settings.generation, settings.adapters
    dtype = None if gen.dtype == "auto" else getattr(torch, gen.dtype)
    config = EngineConfig(max_rows=gen.max_batch_size, max_len=gen.max_context_tokens or EngineConfig.max_len,
                          adapter_slots=adapters.max_resident, max_rank=adapters.max_rank)
    try:
        return EngineGenerator.from_pretrained(gen.model, config=config, device=gen.device, dtype=dtype)
    except UnsupportedModel as error:
        log.warning("multi-adapter engine not used, falling back to transformers + peft: %s", error)
        return None


def _stop_ids(path: str, tokenizer) -> frozenset[int]:
    """End-of-answer ids: the generation config's eos ids plus the tokenizer's eos."""
    from transformers import GenerationConfig

    ids = set()
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass  # no generation_config.json: the tokenizer's eos is all there is
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
