"""In-process generation with any transformers causal LM that has a chat template.

One worker thread runs ``model.generate`` on small static batches: requests that arrive while a
batch runs wait and form the next one (left-padded, stopped per row; rows of different LoRA adapters
share a batch through peft's per-row ``adapter_names``). Adapters are loaded and unloaded by that same
thread between batches (the ``AdapterHost`` methods), so the model never changes under a running generate.
"""

import asyncio
import logging
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Literal

from core.errors import LoragError, NotFound
from core.records import Passage
from server.generation.protocol import (
    GenerationRequest, GenerationStream, PromptInfo, SamplingParams, TextDelta, TokenLogprob,
)
from server.generation.text import IncrementalText, eos_token_ids
from core.prompt import Prompt, build_prompt, require_chat_template

log = logging.getLogger(__name__)

MAX_DEFAULT_CONTEXT = 8192
BASE_ROW = "__base__"  # peft's adapter name for rows that run without an adapter
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(eq=False)
class _Row:
    """One request inside the worker; the worker writes its fields, the event loop reads ``deltas``."""

    token_ids: list[int]
    sampling: SamplingParams
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: IncrementalText | None = None  # the answer's streaming text, set when the row is queued
    generated: int = 0  # tokens generated so far
    unreported_tokens: int = 0
    done: bool = False
    step_logprobs: object = None  # (vocab,) log-softmax of the distribution the newest token was drawn from
    unreported_logprobs: list = field(default_factory=list)  # TokenLogprob of tokens not yet delivered

    def batch_key(self, adapter_group) -> tuple:
        """Rows batch together only when one generate call can serve them all (``adapter_group``: see
        TransformersGenerator._adapter_group)."""
        sampling = self.sampling
        if sampling.temperature == 0:
            return (adapter_group, "greedy", sampling.repetition_penalty)
        if sampling.seed is not None:  # a seeded row owns the RNG for its whole run
            return (adapter_group, "seeded", id(self))
        return (adapter_group, "sample", sampling.temperature, sampling.top_p, sampling.repetition_penalty)


@dataclass
class GeneratorStats:
    """Counters the worker keeps, for metrics and tests."""

    batch_sizes: Counter = field(default_factory=Counter)  # batch size -> batches run with it
    finish_reasons: Counter = field(default_factory=Counter)  # reason -> rows finished with it
    generated_tokens: int = 0


class TransformersGenerator:
    """A :class:`server.generation.protocol.Generator` over a transformers model and its tokenizer."""

    kind: Literal["generative"] = "generative"
    logprobs = True  # reports token log-probabilities when a request asks

    def __init__(self, model, tokenizer, *, name: str, max_batch_size: int = 8, max_context_tokens: int | None = None):
        """Serve ``model`` (a causal LM, or a PEFT model whose loaded adapters requests may name).

        Raises:
            LoragError: the tokenizer has no chat template or the model names no end-of-sequence token.
        """
        from transformers import GenerationConfig

        require_chat_template(tokenizer, model=name)
        if max_batch_size < 1:
            raise LoragError(f"generation.max_batch_size is {max_batch_size}; it must be at least 1")
        self.name = f"transformers:{name}"
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_context_tokens = max_context_tokens or _context_length(model, tokenizer)
        self._eos_ids = eos_token_ids(model.generation_config.eos_token_id, tokenizer)
        if not self._eos_ids:
            raise LoragError(f"the model {name!r} names no end-of-sequence token")
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos_ids)
        # Sampling comes from each request only; a checkpoint's own defaults (top_k, repetition penalty)
        # would otherwise fill every field a request leaves unset. A PEFT wrapper generates with its base's config.
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.generation_config = GenerationConfig(eos_token_id=self._eos_ids, pad_token_id=self._pad_id)
        self._tokenizer_lock = threading.Lock()  # the Rust tokenizer is not safe to share across threads
        self._pending: list[_Row] = []
        self._running: list[_Row] = []  # the batch in the worker, so close() can cancel it
        self._adapter_ops: list[tuple[str, str, object, Future]] = []  # (op, key, adapter, done), worker applies
        self._solo_adapters: set[str] = set()  # DoRA adapters: peft cannot mix them per row
        self._wakeup = threading.Condition()
        self._closed = False
        self.stats = GeneratorStats()
        self._worker = threading.Thread(target=self._serve, name="lorag-generate", daemon=True)
        self._worker.start()

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int = 8,
        max_context_tokens: int | None = None,
    ) -> "TransformersGenerator":
        """Load ``model`` (hub id or local directory) with AutoModelForCausalLM and AutoTokenizer.

        ``dtype`` "auto" means bfloat16 on a GPU and float32 on the CPU.

        Raises:
            LoragError: the model or tokenizer cannot be loaded, or the tokenizer has no chat template.
        """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = _torch_dtype(dtype, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
            require_chat_template(tokenizer, model=model)
            causal_lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device)
        except LoragError:
            raise
        except (OSError, ValueError, RuntimeError, ImportError) as error:
            raise LoragError(
                f"cannot load generation model {model!r}: {_first_line(error)}",
                hint="set generation.model to a local directory holding config.json, the tokenizer and the weights "
                "(as written by save_pretrained), or to a hub id that is cached or downloadable",
            ) from error
        log.info("loaded generation model %s on %s as %s", model, device, torch_dtype)
        return cls(causal_lm, tokenizer, name=model, max_batch_size=max_batch_size, max_context_tokens=max_context_tokens)

    async def start(self, request: GenerationRequest) -> GenerationStream:
        """Build the prompt, queue the request for the next batch and return its stream.

        Raises:
            LoragError: bad sampling values or a prompt that cannot fit the context.
            NotFound: ``request.adapter`` is not loaded in this model.
        """
        if self._closed:
            raise LoragError(f"generator {self.name} is closed")
        sampling = request.sampling
        sampling.check(context_tokens=self.max_context_tokens, model=self.name)
        self._check_adapter(request.adapter)
        budget = sampling.prompt_budget(self.max_context_tokens)
        prompt = await asyncio.to_thread(self._build_prompt, request.messages, request.passages, budget)
        sampling = replace(sampling, max_tokens=sampling.answer_tokens(self.max_context_tokens, len(prompt.token_ids)))
        row = _Row(
            token_ids=prompt.token_ids,
            sampling=sampling,
            adapter=request.adapter,
            loop=asyncio.get_running_loop(),
            deltas=asyncio.Queue(),
            text=IncrementalText(self.tokenizer, stop=sampling.stop, lock=self._tokenizer_lock),
        )
        with self._wakeup:
            if self._closed:  # checked again under the lock: a closed worker would never serve the row
                raise LoragError(f"generator {self.name} is closed")
            self._pending.append(row)
            self._wakeup.notify()
        info = PromptInfo(
            prompt_tokens=len(prompt.token_ids), passages_used=tuple(prompt.passages), dropped_passages=prompt.dropped
        )
        return GenerationStream(prompt=info, deltas=_stream(row))

    async def close(self) -> None:
        """Stop the worker (queued requests end as cancelled) and release the model."""
        with self._wakeup:
            self._closed = True
            for row in self._running:
                row.cancelled.set()
            self._wakeup.notify_all()
        await asyncio.to_thread(self._worker.join)
        self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _build_prompt(self, messages, passages: tuple[Passage, ...], budget: int) -> Prompt:
        with self._tokenizer_lock:
            return build_prompt(messages, passages, tokenizer=self.tokenizer, max_prompt_tokens=budget)

    def _check_adapter(self, adapter: str | None) -> None:
        """Hook for the adapter registry: a PEFT model serves the adapters loaded into it, a base model none."""
        if adapter is None:
            return
        if adapter not in self.resident_keys():
            raise NotFound(
                f"adapter {adapter!r} is not loaded in {self.name}",
                hint="train one with `lorag train` or ask without an adapter",
            )

    # ---- AdapterHost (adapters.host): called from any thread, applied by the worker -------

    def served_model(self):
        """The served model's fingerprint, name and linear module shapes, for validating adapters."""
        from adapters.host import ServedModel

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return ServedModel.of_module(base, name=self.name.removeprefix("transformers:"))

    def resident_keys(self) -> set[str]:
        return set(getattr(self.model, "peft_config", None) or {})

    def load_adapter(self, key: str, adapter) -> None:
        """Put ``adapter`` (a adapters.host.HostAdapter: peft config + CPU tensors) on the model's
        device under ``key``. Blocks until the worker has applied it, after the running batch: a request
        could not join that batch anyway, so a cold adapter costs its own load time and nothing more."""
        self._adapter_op("load", key, adapter)

    def unload_adapter(self, key: str) -> None:
        """Remove adapter ``key`` from the model, after the running batch (callers unload only unused keys)."""
        self._adapter_op("unload", key, None)

    def _adapter_op(self, op: str, key: str, adapter) -> None:
        done: Future = Future()
        with self._wakeup:
            if self._closed:
                raise LoragError(f"generator {self.name} is closed")
            self._adapter_ops.append((op, key, adapter, done))
            self._wakeup.notify()
        done.result()

    def _apply_adapter_ops(self) -> None:
        """Worker thread, between batches: apply the queued loads and unloads in order."""
        with self._wakeup:
            ops, self._adapter_ops = self._adapter_ops, []
        for op, key, adapter, done in ops:
            try:
                self._load_now(key, adapter) if op == "load" else self._unload_now(key)
            except BaseException as error:  # noqa: BLE001 - the caller waiting on ``done`` hears about it
                done.set_exception(error)
            else:
                done.set_result(None)

    def _load_now(self, key: str, adapter) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

        config = LoraConfig.from_peft_type(**adapter.peft_config)
        config.inference_mode = True
        if key in self.resident_keys():
            self._unload_now(key)
        if isinstance(self.model, PeftModel):
            self.model.add_adapter(key, config)
        else:
            self.model = get_peft_model(self.model, config, adapter_name=key)
        # New modules start in training mode, and peft's add_adapter leaves them so: the adapter's lora_dropout
        # (training's default is 0.05) would then drop activations at random, and one request's answer would
        # change from run to run and with whatever else shares its batch.
        self.model.eval()
        result = set_peft_model_state_dict(self.model, adapter.tensors, adapter_name=key)
        missing = [name for name in result.missing_keys if "lora_" in name and f".{key}." in name]
        if result.unexpected_keys or missing:
            self.model.delete_adapter(key)
            raise LoragError(
                f"adapter {key!r} does not fit the model: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}"
            )
        if config.use_dora:
            self._solo_adapters.add(key)
        if self.model.active_adapter not in self.model.peft_config:
            # peft leaves a deleted adapter active; generate() looks its config up even with per-row names.
            self.model.set_adapter(key)

    def _unload_now(self, key: str) -> None:
        if key in self.resident_keys():
            self.model.delete_adapter(key)
        self._solo_adapters.discard(key)

    def _adapter_group(self, row: _Row):
        """Rows of one group share a batch: peft mixes LoRA adapters per row, but not DoRA ones."""
        return row.adapter if row.adapter in self._solo_adapters else "mixed"

    def _adapter_call(self, rows: list[_Row]):
        """The generate function for ``rows`` and its keyword arguments selecting each row's adapter
        (base rows: peft's "__base__")."""
        if not self.resident_keys():  # a plain model, or a PEFT model whose adapters were all removed
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            return base.generate, {}
        if rows[0].adapter in self._solo_adapters:
            self.model.set_adapter(rows[0].adapter)
            return self.model.generate, {}
        return self.model.generate, {"adapter_names": [row.adapter or BASE_ROW for row in rows]}

    # ---- worker thread -------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            self._apply_adapter_ops()
            with self._wakeup:
                while not self._pending and not self._adapter_ops and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    rows, self._pending = self._pending, []
                    for row in rows:
                        self._finish(row, "cancelled")
                    for _, key, _, done in self._adapter_ops:
                        done.set_exception(LoragError(f"generator {self.name} closed before adapter {key!r} changed"))
                    self._adapter_ops = []
                    return
                if not self._pending:
                    continue
                batch = self._take_batch()
                self._running = batch
            batch = [row for row in batch if not self._skip_cancelled(row)]
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as error:  # noqa: BLE001 - each waiting request must hear about it
                log.exception("generation failed for a batch of %d", len(batch))
                for row in batch:
                    if not row.done:
                        row.done = True
                        _deliver(row, error)

    def _take_batch(self) -> list[_Row]:
        """The oldest pending row plus every later one that shares its batch key, up to max_batch_size."""
        key = self._pending[0].batch_key(self._adapter_group(self._pending[0]))
        batch = [row for row in self._pending if row.batch_key(self._adapter_group(row)) == key][: self.max_batch_size]
        self._pending = [row for row in self._pending if row not in batch]
        return batch

    def _skip_cancelled(self, row: _Row) -> bool:
        if row.cancelled.is_set():
            self._finish(row, "cancelled")
            return True
        return False

    def _generate(self, rows: list[_Row]) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteriaList

        self.stats.batch_sizes[len(rows)] += 1
        device = self.model.device
        width = max(len(row.token_ids) for row in rows)
        # Left padding keeps every row's last prompt token in the last column. (batch, width)
        input_ids = torch.tensor(
            [[self._pad_id] * (width - len(row.token_ids)) + row.token_ids for row in rows], device=device
        )
        attention_mask = torch.tensor(
            [[0] * (width - len(row.token_ids)) + [1] * len(row.token_ids) for row in rows], device=device
        )
        sampling = rows[0].sampling  # the batch key makes temperature/top_p/seed equal across rows
        do_sample = sampling.temperature > 0
        config = GenerationConfig(
            max_new_tokens=max(row.sampling.max_tokens for row in rows),
            do_sample=do_sample,
            temperature=sampling.temperature if do_sample else 1.0,
            top_p=sampling.top_p if do_sample else 1.0,
            top_k=0 if do_sample else None,  # 0 turns off the library's default top-k of 50
            repetition_penalty=1.0,
            eos_token_id=self._eos_ids,
            pad_token_id=self._pad_id,
        )
        if do_sample and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:  # the batch key makes it equal across rows
            # Generated tokens only: the stock penalty also counts the prompt, and would punish quoting the documents.
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty, prompt_ignore_length=width))
        if any(row.sampling.logprobs for row in rows):
            # Last of ours, and generate() adds temperature and top_p after its caller's processors: this sees the
            # model's distribution after the repetition penalty, before sampling reshapes it.
            processors.append(_KeepLogprobs(rows))
        generate, adapter_kwargs = self._adapter_call(rows)
        with torch.inference_mode():
            generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([_RowStops(self, rows)]),
                logits_processor=processors,
                **adapter_kwargs,
            )
        for row in rows:  # generate ended on its own limit; rows the criteria did not close ran out of room
            if not row.done:
                self._finish(row, "length")

    def _advance(self, row: _Row, token: int) -> None:
        """Take one new token of ``row``: emit the text that is now certain, or finish the row."""
        row.unreported_tokens += 1
        self.stats.generated_tokens += 1
        if row.cancelled.is_set():
            self._finish(row, "cancelled")
            return
        if token in self._eos_ids:
            self._finish(row, "stop")
            return
        row.generated += 1
        if row.sampling.logprobs and row.step_logprobs is not None:
            row.unreported_logprobs.append(self._token_logprob(row, token))
        piece, stopped = row.text.add([token])
        if stopped:
            self._finish(row, "stop", last=piece)
        elif row.generated >= row.sampling.max_tokens:
            self._finish(row, "length", last=piece + row.text.flush())
        elif piece:
            self._emit(row, piece)

    def _emit(self, row: _Row, text: str, finish_reason: FinishReason | None = None) -> None:
        logprobs, row.unreported_logprobs = tuple(row.unreported_logprobs), []
        _deliver(row, TextDelta(text=text, tokens=row.unreported_tokens, finish_reason=finish_reason,
                                logprobs=logprobs))
        row.unreported_tokens = 0

    def _token_logprob(self, row: _Row, token: int) -> TokenLogprob:
        distribution = row.step_logprobs  # (vocab,)
        top = ()
        if row.sampling.top_logprobs:
            values, ids = distribution.topk(row.sampling.top_logprobs)
            top = tuple(zip(self._token_texts(ids.tolist()), values.tolist()))
        return TokenLogprob(self._token_texts([token])[0], float(distribution[token]), top)

    def _token_texts(self, ids: list[int]) -> list[str]:
        with self._tokenizer_lock:
            return [self.tokenizer.decode([token_id]) for token_id in ids]

    def _finish(self, row: _Row, reason: FinishReason, *, last: str | None = None) -> None:
        """Close ``row`` with ``reason``; its last delta is ``last``, or all the text still held back."""
        if row.done:
            return
        row.done = True
        self.stats.finish_reasons[reason] += 1
        self._emit(row, row.text.flush() if last is None else last, reason)


class _KeepLogprobs:
    """A logits processor that keeps, for each row asking for logprobs, the log-softmax it is about to sample from."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores):
        import torch

        wanted = [i for i, row in enumerate(self.rows) if row.sampling.logprobs and not row.done]
        if wanted:
            chosen = torch.log_softmax(scores[wanted].float(), dim=-1).cpu()  # (len(wanted), vocab)
            for position, index in enumerate(wanted):
                self.rows[index].step_logprobs = chosen[position]
        return scores


class _RowStops:
    """generate() calls this after every step with the ids so far; it streams each row and says which are done."""

    def __init__(self, generator: TransformersGenerator, rows: list[_Row]):
        self.generator = generator
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        newest = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, newest):
            if not row.done:
                self.generator._advance(row, token)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


async def _stream(row: _Row):
    """The deltas of ``row``; leaving early (client gone, task cancelled) cancels the row in the worker."""
    try:
        while True:
            item = await row.deltas.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        row.cancelled.set()


def _deliver(row: _Row, item: TextDelta | BaseException) -> None:
    try:
        row.loop.call_soon_threadsafe(row.deltas.put_nowait, item)
    except RuntimeError:  # the consumer's event loop is gone: nobody is listening any more
        row.cancelled.set()


def _context_length(model, tokenizer) -> int:
    # Capped: a model declaring 128k positions would otherwise let one request claim memory for all of them here.
    return min(declared_context(model.config, tokenizer), MAX_DEFAULT_CONTEXT)


def declared_context(config, tokenizer) -> int:
    """The context length a model's config (its text part) or else its tokenizer declares; 2048 if neither does."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else 2048


def _torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    choices = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if dtype not in choices:
        raise LoragError(f"generation.dtype is {dtype!r}; expected auto, {', '.join(choices)}")
    return choices[dtype]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
