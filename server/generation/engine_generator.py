"""EngineGenerator: the Generator protocol on top of the multi-adapter engine, streaming through asyncio,
and the adapter registry's AdapterHost (its slots are the resident adapters)."""

import asyncio
import logging
from dataclasses import replace

import torch

from core.errors import LoragError
from server.generation.text import IncrementalText, eos_token_ids
from server.engine.engine import Engine, EngineConfig
from server.engine.lora_slots import GROUPS, AdapterSlots
from server.engine.model import check_supported
from server.engine.rope import UnsupportedModel
from server.engine.scheduler import Sequence
from server.generation.protocol import GenerationRequest, GenerationStream, PromptInfo, TextDelta, TokenLogprob
from core.prompt import build_prompt, require_chat_template

log = logging.getLogger(__name__)

# How long unloading waits for requests that let go of an adapter (cancelled, or cut by a stop string)
# to leave the engine: they free their slot at its next step, well within this.
UNLOAD_WAIT_S = 30.0


class EngineError(LoragError):
    """The engine failed while generating (not the request's fault)."""

    http_status = 500


class EngineGenerator:
    """Generates for many requests at once, each with its own adapter (or none).

    ``adapters`` is the residency API (load(name, path) -> slot, unload(name), resident()); a
    request's ``adapter`` must be resident when it starts. The AdapterHost methods (served_model,
    load_adapter, unload_adapter, resident_keys) let server.adapters.AdapterService drive it.
    """

    kind = "generative"
    logprobs = True  # reports token log-probabilities when a request asks

    def __init__(self, engine: Engine, tokenizer, *, name: str, stop_token_ids: frozenset[int] = frozenset(),
                 model_name: str | None = None, fingerprint: str | None = None):
        """``model_name`` and ``fingerprint`` (adapters.manifest.model_fingerprint of the model's
        config) describe the base model to adapters; without a fingerprint no adapter can be validated."""
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.stop_token_ids = frozenset(stop_token_ids)
        self.model_name = model_name or name
        self.fingerprint = fingerprint

    @property
    def adapters(self) -> AdapterSlots:
        return self.engine.adapters

    @classmethod
    def from_pretrained(cls, path: str, *, config: EngineConfig = EngineConfig(), device=None, dtype=None,
                        name: str | None = None) -> "EngineGenerator":
        """Load model and tokenizer from ``path`` and start the engine thread.

        Raises:
            UnsupportedModel: the architecture or one of its settings is outside what the engine runs.
            LoragError: the tokenizer has no chat template.
        """
        from transformers import AutoConfig, AutoTokenizer

        from adapters.manifest import model_fingerprint

        model_config = AutoConfig.from_pretrained(path)
        check_supported(model_config)  # before the tokenizer, so an unsupported model falls back quietly
        tokenizer = AutoTokenizer.from_pretrained(path)
        require_chat_template(tokenizer, model=str(path))
        engine = Engine.from_pretrained(path, config=config, device=device, dtype=dtype)
        return cls(engine, tokenizer, name=name or f"engine:{path}", stop_token_ids=_stop_ids(path, tokenizer),
                   model_name=str(path), fingerprint=model_fingerprint(model_config))

    # ---- AdapterHost (adapters.host): called from worker threads ----------------------------
    def served_model(self):
        """The base model as adapters are validated against it: only the projections the engine adapts
        count as adaptable, and DoRA is refused (the engine runs plain LoRA only).

        Raises:
            LoragError: the generator was built without the model's fingerprint.
        """
        from adapters.host import ServedModel

        if self.fingerprint is None:
            raise LoragError(f"generator {self.name} was built without its model fingerprint, so it cannot "
                             "validate adapters", hint="build it with EngineGenerator.from_pretrained")
        linear = {}
        for layer in range(self.adapters.layers):
            for group, modules in GROUPS.items():
                block = "self_attn" if group in ("qkv", "o") else "mlp"
                for module in modules:
                    linear[f"model.layers.{layer}.{block}.{module}"] = self.adapters.dims[module]
        return ServedModel(name=self.model_name, fingerprint=self.fingerprint, linear=linear,
                           device=str(self.engine.model.device), max_adapters=self.adapters.num_slots, dora=False,
                           checks_finite=True)

    def load_adapter(self, key: str, adapter) -> None:
        """Copy ``adapter`` (a adapters.host.HostAdapter, already validated and in host memory) into
        a free slot under ``key``. Running requests are not disturbed: they only read their own slots.

        Raises:
            UnsupportedAdapter: DoRA, modules_to_save, biases or modules outside the attention/MLP projections.
            Conflict: every slot is taken, or ``key`` is resident and in use.
        """
        if adapter.flat is not None:  # one copy to the device; NaN/infinity checked there (checks_finite)
            self.adapters.load_flat(key, adapter.peft_config, adapter.flat, source=str(adapter.path))
        else:
            self.adapters.load_weights(key, adapter.peft_config, adapter.tensors, source=str(adapter.path))

    def unload_adapter(self, key: str) -> None:
        """Free the slot of ``key`` (nothing to do when it is not resident). The registry unloads only keys no
        request holds; rows it already let go of (cancelled, stop string) leave at the engine's next step,
        so this waits for them rather than refusing.

        Raises:
            Conflict: a request still used ``key`` after UNLOAD_WAIT_S seconds.
        """
        if key in self.adapters.resident():
            self.adapters.unload(key, wait_s=UNLOAD_WAIT_S)

    def resident_keys(self) -> set[str]:
        return set(self.adapters.resident())

    async def start(self, request: GenerationRequest) -> GenerationStream:
        """Build the prompt, queue the request in the engine and return its stream.

        Raises:
            LoragError: the prompt cannot fit the engine's context.  NotFound: the adapter is not resident.
        """
        sampling = request.sampling
        context = self.engine.cache.max_len
        sampling.check(context_tokens=context, model=self.name)
        prompt = build_prompt(request.messages, request.passages, tokenizer=self.tokenizer,
                              max_prompt_tokens=sampling.prompt_budget(context))
        sampling = replace(sampling, max_tokens=sampling.answer_tokens(context, len(prompt.token_ids)))
        slot = self.engine.adapters.acquire(request.adapter)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(tokens, finish, error):  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, (tokens, finish, error))

        seq = Sequence(prompt=list(prompt.token_ids), max_tokens=sampling.max_tokens, emit=emit, adapter_slot=slot,
                       temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                       repetition_penalty=sampling.repetition_penalty,
                       stop_token_ids=self.stop_token_ids,
                       top_logprobs=sampling.top_logprobs if sampling.logprobs else None)
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
        reported = 0  # entries of seq.logprobs already delivered
        try:
            while True:
                tokens, finish, error = await queue.get()
                while finish is None and not queue.empty():  # coalesce what piled up while we were away
                    more, finish, error = queue.get_nowait()
                    tokens = tokens + more
                if seq.top_logprobs is not None:  # appended before each emit: these tokens' entries are there
                    entries, reported = seq.logprobs[reported:reported + len(tokens)], reported + len(tokens)
                    logprobs = self._token_logprobs(entries)
                else:
                    logprobs = ()
                if error is not None:
                    done = True
                    raise EngineError(f"generation of request {seq.seq_id} failed in the engine: {error}") from error
                piece, stopped = text.add(tokens)
                if stopped:
                    self.engine.scheduler.cancel(seq.seq_id)
                    done = True
                    yield TextDelta(piece, tokens=len(tokens), finish_reason="stop", logprobs=logprobs)
                    return
                if finish is not None:
                    done = True
                    yield TextDelta(piece + text.flush(), tokens=len(tokens), finish_reason=finish, logprobs=logprobs)
                    return
                if piece or tokens:
                    yield TextDelta(piece, tokens=len(tokens), logprobs=logprobs)
        finally:
            if not done:  # the consumer went away: free the row and the adapter slot
                self.engine.scheduler.cancel(seq.seq_id)

    def kv_cache_stats(self) -> dict[str, float]:
        """The engine's KV cache blocks by state and its prefix cache's hit rate (prompt tokens found there
        over prompt tokens looked up), for /metrics."""
        pool = self.engine.cache.pool
        used, cached = pool.used, pool.cached
        return {"kv_blocks_used": used, "kv_blocks_cached": cached, "kv_blocks_free": pool.capacity - used - cached,
                "prefix_hit_rate": pool.stats.hit_rate}

    def _token_logprobs(self, entries) -> tuple[TokenLogprob, ...]:
        """The engine's (token, logprob, top ids, top logprobs) as TokenLogprob; end-of-turn tokens are left out,
        as their text is."""
        def decode(token_id: int) -> str:
            return self.tokenizer.decode([token_id])

        return tuple(
            TokenLogprob(decode(token), logprob, tuple(zip(map(decode, top_ids), top_values)))
            for token, logprob, top_ids, top_values in entries if token not in self.stop_token_ids
        )

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.close)


def load_engine_generator(settings, *, adapters=None, model: str | None = None) -> EngineGenerator | None:
    """The engine for ``model`` (default ``settings.model``), or None (logged) when it cannot run that architecture.

    ``settings`` is a server.settings.GenerationSettings (model, device, dtype, max_batch_size,
    max_context_tokens); ``adapters`` an AdapterSettings (max_resident slots of max_rank; defaults when None);
    ``model`` a directory or hub id to load instead of ``settings.model`` (the factory resolves aliases).

    Raises:
        LoragError, OSError, ...: the model or tokenizer cannot be loaded (the caller falls back).
    """
    from server.settings import AdapterSettings

    adapters = adapters or AdapterSettings()
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    config = EngineConfig(max_rows=settings.max_batch_size, max_len=settings.max_context_tokens or EngineConfig.max_len,
                          adapter_slots=adapters.max_resident, max_rank=adapters.max_rank)
    try:
        return EngineGenerator.from_pretrained(model or settings.model, config=config, device=settings.device,
                                               dtype=dtype)
    except UnsupportedModel as error:
        log.warning("multi-adapter engine not used, falling back to transformers + peft: %s", error)
        return None


def _stop_ids(path: str, tokenizer) -> frozenset[int]:
    """End-of-answer ids of the model at ``path`` (no generation_config.json: the tokenizer's eos alone)."""
    from transformers import GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        configured = None
    return frozenset(eos_token_ids(configured, tokenizer))
