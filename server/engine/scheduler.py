"""Continuous batching over fixed cache rows: requests join between decode steps, leave when done.

Every step first retires cancelled requests, admits waiting ones into free rows, prefills up to a
token budget of pending prompts in chunks, then runs one decode step for every request that has
its prompt in the cache. The same logic runs on CPU (eager) and GPU (captured decode graphs).
"""

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core.errors import LoragError
from server.engine.kv_cache import KVCache
from server.engine.lora_slots import AdapterSlots
from server.engine.sampling import penalise_repeats, row_generator, sample
from server.engine.segments import segment_prompts, to_segments

log = logging.getLogger(__name__)
_ids = itertools.count(1)

# emit(new_token_ids, finish_reason, error): called on the engine thread; finish_reason is
# "stop" | "length" | "cancelled" on the last call, error set when the engine failed.
Emit = Callable[[list[int], str | None, BaseException | None], None]


@dataclass(eq=False)
class Sequence:
    """One generation request as the engine sees it (prompt already tokenized)."""

    prompt: list[int]
    max_tokens: int
    emit: Emit
    adapter_slot: int = 0  # 0 = base model
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # on generated tokens only (see sampling.sample)
    stop_token_ids: frozenset[int] = frozenset()
    top_logprobs: int | None = None  # None: no log-probabilities; n: each token's, with the n most likely
    # (token, logprob, top ids, top logprobs) per generated token, appended on the engine thread before its emit
    logprobs: list[tuple[int, float, list[int], list[float]]] = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_ids))
    # engine-side state
    row: int | None = None
    computed: int = 0  # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish: str | None = None

    @property
    def decoding(self) -> bool:
        return self.row is not None and self.computed == len(self.prompt) and self.finish is None


class Scheduler:
    """Owns the cache rows and drives the model; ``submit``/``cancel`` are safe from any thread."""

    def __init__(
        self,
        model,
        cache: KVCache,
        adapters: AdapterSlots | None,
        *,
        decode: Callable[[list[int], list[int], list[int]], torch.Tensor],
        prefill_chunk: int = 1024,
        prefill_budget: int = 2048,
        prefill_pad: int = 1,
        max_group: int = 16,
    ):
        self.model, self.cache, self.adapters, self.decode = model, cache, adapters, decode
        self.prefill_chunk, self.prefill_budget, self.prefill_pad = prefill_chunk, prefill_budget, prefill_pad
        self.max_group = max_group  # prompts prefilled in one forward
        self.rows: list[Sequence | None] = [None] * cache.rows
        self._waiting: deque[Sequence] = deque()
        self._cancelled: set[int] = set()
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ---- any thread ----------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; its tokens arrive through ``seq.emit`` on the engine thread.

        Raises:
            LoragError: the prompt is empty or leaves no room in a cache row (max_len) for an answer.
        """
        if not seq.prompt:
            raise LoragError(f"request {seq.seq_id}: the prompt is empty")
        room = self.cache.max_len - len(seq.prompt)
        if room < 1:
            raise LoragError(
                f"request {seq.seq_id}: the prompt has {len(seq.prompt)} tokens, the engine's context is "
                f"{self.cache.max_len} tokens", hint="shorten the prompt or raise the engine's max_len")
        seq.max_tokens = max(1, min(seq.max_tokens, room))
        seq.generator = row_generator(seq.seed, self.model.device)
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()

    def cancel(self, seq_id: int) -> None:
        """Stop ``seq_id`` at the next step and free its row; its emit gets finish "cancelled"."""
        with self._wake:
            self._cancelled.add(seq_id)
            self._wake.notify()

    def start(self) -> None:
        """Run steps on a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, name="lorag-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(self.rows)

    # ---- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not any(self.rows) and not self._cancelled:
                    self._wake.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as error:  # noqa: BLE001 - every waiting consumer must hear about it
                log.exception("engine step failed; failing all running requests")
                self._fail_all(error)

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling round: retire, admit, prefill within budget, one decode step."""
        self._retire_cancelled()
        self._admit()
        self._prefill()
        self._decode_step()

    def _retire_cancelled(self) -> None:
        with self._wake:
            cancelled, self._cancelled = self._cancelled, set()
            kept = deque()
            for seq in self._waiting:
                if seq.seq_id in cancelled:
                    self._finish(seq, "cancelled")
                else:
                    kept.append(seq)
            self._waiting = kept
        for seq in self.rows:
            if seq is not None and seq.seq_id in cancelled:
                self._finish(seq, "cancelled")

    def _admit(self) -> None:
        with self._wake:
            for row, occupant in enumerate(self.rows):  # lowest rows first keeps decode batches small
                if not self._waiting:
                    break
                if occupant is None:
                    seq = self._waiting.popleft()
                    seq.row = row
                    self.rows[row] = seq

    def _prefill(self) -> None:
        """Prefill pending prompts within the step's token budget.

        Whole prompts that fit one chunk are prefilled together in one forward (padded to the
        longest; causal attention keeps the padding after every real token), one such group per
        step: a forward costs the host about the same dispatch time whatever its size (10-30 ms on
        an H100 host for a 0.5B model), so a prompt that does not fit this step's group joins the
        next step's rather than paying for a forward of its own. Longer prompts and continuations go
        one chunk at a time, attending to what the cache already holds.
        """
        budget = self.prefill_budget
        group: list[Sequence] = []
        width = 0
        grouped = False  # this step's group of whole prompts has run
        pending = sorted((s for s in self.rows if s is not None and s.computed < len(s.prompt)), key=lambda s: s.seq_id)
        for seq in pending:
            if seq.computed == 0 and len(seq.prompt) <= self.prefill_chunk:
                if grouped:
                    continue
                padded = self._padded(len(seq.prompt))
                if group and (max(width, padded) * (len(group) + 1) > budget or len(group) == self.max_group):
                    break  # the group is full: it runs below, the rest waits for the next step
                group.append(seq)
                width = max(width, padded)
                continue
            if group:
                budget -= self._prefill_group(group, width)
                group, width, grouped = [], 0, True
            while budget > 0 and seq.computed < len(seq.prompt):
                budget -= self._prefill_chunk(seq, min(self.prefill_chunk, budget, len(seq.prompt) - seq.computed))
            if budget <= 0:
                break
        if group and budget > 0:
            self._prefill_group(group, width)

    def _padded(self, n: int) -> int:
        # Padding to a multiple keeps the set of shapes small (kernel choice is cached per shape);
        # pad tokens sit at the scratch position, after every real one, so nothing attends to them.
        return -(-n // self.prefill_pad) * self.prefill_pad

    def _prefill_group(self, group: list[Sequence], width: int) -> int:
        """Whole prompts of ``group`` in one forward, (len(group), width) padded; returns tokens spent."""
        device = self.model.device
        scratch = self.cache.scratch_position
        tokens = [s.prompt + [0] * (width - len(s.prompt)) for s in group]
        positions = [list(range(len(s.prompt))) + [scratch] * (width - len(s.prompt)) for s in group]
        segments = self._segments([len(s.prompt) for s in group], [s.adapter_slot for s in group], width=width)
        logits = self.model.forward(
            torch.tensor(tokens, device=device), torch.tensor(positions, device=device), cache=self.cache,
            rows=torch.tensor([s.row for s in group], device=device), adapters=self.adapters, segments=segments,
            logits_at=torch.tensor([len(s.prompt) - 1 for s in group], device=device), fresh=True,
        )
        for seq in group:
            seq.computed = len(seq.prompt)
        picked = self._sample(group, logits)
        self._keep_logprobs(group, logits, picked)
        for seq, token in zip(group, picked):
            self._accept(seq, token)
        return width * len(group)

    def _prefill_chunk(self, seq: Sequence, n: int) -> int:
        """The next ``n`` prompt tokens of ``seq``; returns tokens spent."""
        start = seq.computed
        padded = self._padded(n)
        tokens = seq.prompt[start : start + n] + [0] * (padded - n)
        positions = list(range(start, start + n)) + [self.cache.scratch_position] * (padded - n)
        device = self.model.device
        logits = self.model.forward(
            torch.tensor([tokens], device=device), torch.tensor([positions], device=device), cache=self.cache,
            rows=slice(seq.row, seq.row + 1), adapters=self.adapters,
            segments=self._segments([n], [seq.adapter_slot], width=padded), logits_at=n - 1, fresh=start == 0,
        )
        seq.computed += n
        if seq.computed == len(seq.prompt):
            picked = self._sample([seq], logits)
            self._keep_logprobs([seq], logits, picked)
            self._accept(seq, picked[0])
        return padded

    def _segments(self, lengths: list[int], slots: list[int], *, width: int):
        """Adapter segments of prompts laid out ``width`` tokens apart; None when none has an adapter."""
        if self.adapters is None or not any(slots):
            return None
        return to_segments(segment_prompts(lengths, slots, width=width), device=self.model.device)

    def _decode_step(self) -> None:
        active = [s for s in self.rows if s is not None and s.decoding]
        if not active:
            return
        n = max(s.row for s in active) + 1
        tokens, positions, slots = [0] * n, [self.cache.scratch_position] * n, [0] * n
        for seq in active:
            tokens[seq.row] = seq.generated[-1]
            positions[seq.row] = len(seq.prompt) + len(seq.generated) - 1
            slots[seq.row] = seq.adapter_slot
        logits = self.decode(tokens, positions, slots)  # (>= n, vocab)
        if all(s.temperature == 0 and s.repetition_penalty == 1.0 for s in active):  # plain greedy: no gather
            chosen = logits.argmax(dim=-1).tolist()
            picked = [chosen[s.row] for s in active]
        else:
            rows = torch.tensor([s.row for s in active], device=logits.device)
            picked = self._sample(active, logits[rows])
        if any(s.top_logprobs is not None for s in active):
            self._keep_logprobs(active, logits[torch.tensor([s.row for s in active], device=logits.device)], picked)
        for seq, token in zip(active, picked):
            self._accept(seq, token)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        return sample(logits, temperatures=[s.temperature for s in seqs], top_ps=[s.top_p for s in seqs],
                      generators=[s.generator for s in seqs], penalties=[s.repetition_penalty for s in seqs],
                      generated=[s.generated for s in seqs])

    def _keep_logprobs(self, seqs: list[Sequence], logits: torch.Tensor, picked: list[int]) -> None:
        """For rows that asked, the log-probability of each picked token and the most likely ones, from
        ``logits`` (len(seqs), vocab) after the repetition penalty, before temperature and top-p (as the
        transformers generator reports them). Runs before ``_accept`` adds the token to ``generated``."""
        wanted = [i for i, s in enumerate(seqs) if s.top_logprobs is not None]
        if not wanted:
            return
        index = torch.tensor(wanted, device=logits.device)
        penalised = penalise_repeats(logits[index].float(), [seqs[i].repetition_penalty for i in wanted],
                                     [seqs[i].generated for i in wanted])
        logprobs = torch.log_softmax(penalised, dim=-1)  # (len(wanted), vocab)
        for row, i in enumerate(wanted):
            seq, token = seqs[i], picked[i]
            values, ids = (logprobs[row].topk(seq.top_logprobs) if seq.top_logprobs
                           else (logprobs.new_empty(0), logprobs.new_empty(0, dtype=torch.long)))
            seq.logprobs.append((token, float(logprobs[row, token]), ids.tolist(), values.tolist()))

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        if token in seq.stop_token_ids:
            self._finish(seq, "stop", tokens=[token])
        elif len(seq.generated) >= seq.max_tokens:
            self._finish(seq, "length", tokens=[token])
        else:
            self._emit(seq, [token], None)

    def _finish(self, seq: Sequence, reason: str, *, tokens: list[int] | None = None,
                error: BaseException | None = None) -> None:
        seq.finish = reason
        if seq.row is not None and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
        if self.adapters is not None:
            self.adapters.release(seq.adapter_slot)
        seq.adapter_slot = 0
        self._emit(seq, tokens or [], reason, error)

    def _emit(self, seq: Sequence, tokens: list[int], reason: str | None, error: BaseException | None = None) -> None:
        try:
            seq.emit(tokens, reason, error)
        except Exception:  # noqa: BLE001 - a gone consumer must not stop the other requests
            log.exception("request %d: delivering tokens failed; cancelling it", seq.seq_id)
            if reason is None:
                self.cancel(seq.seq_id)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting + [s for s in self.rows if s is not None]:
            self._finish(seq, "cancelled", error=error)
