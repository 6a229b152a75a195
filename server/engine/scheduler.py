"""Continuous batching over a paged KV cache: requests join between decode steps, leave when done.

Every step first retires cancelled requests, admits waiting ones (a free decode row and the cache
blocks the request can ever need, see block_pool), prefills up to a token budget of pending prompts in
chunks, and gives every request that has its prompt in the cache its next token. Those decode rows ride
along the step's first prompt forward (chunked prefill mixed into decoding: a running batch keeps its pace
while new prompts prefill); a step without prompt work runs a decode step of its own. A prompt whose
first blocks are in the prefix cache starts after them. Greedy decode steps run one step ahead of the
host: while nothing else is to be done, the next step is launched from the device's own picks before the
host reads the current step's tokens, so the host's bookkeeping overlaps the GPU's work. The same logic
runs on CPU (eager) and GPU (captured decode graphs).
"""

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from core.errors import LoragError
from server.engine.block_pool import block_keys
from server.engine.kv_cache import PagedKVCache
from server.engine.lora_slots import AdapterSlots
from server.engine.model import DecodeRows
from server.engine.sampling import penalise_repeats, row_generator, sample
from server.engine.segments import segment_mixed, segment_prompts, to_segments

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
    cached: int = 0  # of those, tokens found in the prefix cache
    blocks: list[int] = field(default_factory=list)  # block table: cache blocks of tokens 0, bs, 2 bs, ...
    reserved: int = 0  # blocks promised by the pool, not taken yet
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the prompt's full blocks
    published: int = 0  # leading blocks registered in the prefix cache
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish: str | None = None

    @property
    def decoding(self) -> bool:
        return self.row is not None and self.computed == len(self.prompt) and self.finish is None


@dataclass
class InFlight:
    """A greedy decode step launched on the device whose tokens the host has not read yet."""

    seqs: list[Sequence]
    picked: torch.Tensor  # (rows,) long on the device: each cache row's argmax, the next step's input tokens
    host: torch.Tensor  # the same, being copied to page-locked host memory (on the CPU: the same tensor)
    copied: torch.cuda.Event | None  # recorded after that copy; None on the CPU

    def tokens(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


class Scheduler:
    """Owns the cache rows and drives the model; ``submit``/``cancel`` are safe from any thread."""

    def __init__(
        self,
        model,
        cache: PagedKVCache,
        adapters: AdapterSlots | None,
        *,
        decode: Callable[[list[int], list[int], list[int], torch.Tensor], torch.Tensor],
        prefill_chunk: int = 1024,
        prefill_budget: int = 2048,
        prefill_pad: int = 1,
        max_group: int = 16,
        mix_decode: bool = True,
        decode_ahead: bool = True,
        pack_prompts: bool = True,
    ):
        if prefill_chunk < 1 or prefill_budget < 1:
            raise ValueError(f"prefill_chunk and prefill_budget must be >= 1, got {prefill_chunk} and {prefill_budget}")
        self.model, self.cache, self.adapters, self.decode = model, cache, adapters, decode
        self.prefill_chunk, self.prefill_budget, self.prefill_pad = prefill_chunk, prefill_budget, prefill_pad
        self.mix_decode = mix_decode  # decode rows ride along the step's first prompt forward
        self.decode_ahead = decode_ahead  # greedy decode steps launched before the last one's tokens are read
        self.pack_prompts = pack_prompts  # forwards of several prompts run their real tokens only (no padding)
        self._in_flight: InFlight | None = None
        self.max_group = max_group  # prompts prefilled in one forward
        self.pool = cache.pool
        self.rows: list[Sequence | None] = [None] * cache.rows
        # Block table of every row (host side; all scratch where a row is free): rows' tables go to the
        # device with each forward, so growing a sequence is a host write.
        self.tables = torch.zeros(cache.rows, cache.max_blocks, dtype=torch.int32)
        self._tables_np = self.tables.numpy()  # the same memory: numpy slice writes cost far less than torch's
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
        blocks = self.pool.capacity * self.pool.block_size
        if len(seq.prompt) >= blocks:
            raise LoragError(
                f"request {seq.seq_id}: the prompt has {len(seq.prompt)} tokens, the engine's KV cache holds "
                f"{blocks} tokens in all", hint="shorten the prompt or give the engine more KV cache blocks")
        seq.max_tokens = min(seq.max_tokens, blocks - len(seq.prompt))
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
        """One scheduling round: retire, admit, prefill within budget, one token for every decoding request
        (in the first prompt forward when ``mix_decode``, else in a decode step after the prompts).

        A greedy decode step is left in flight (``decode_ahead``); the next round, when it has nothing else to
        do, launches the following step from the device's picks first and reads the tokens after, so the GPU
        never waits for the host between decode steps. Otherwise it reads them first and goes on as above.
        """
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            ahead = self._launch_ahead(in_flight)
            self._land(in_flight)
            if ahead is not None:
                self._in_flight = ahead
                return
        self._retire_cancelled()
        self._admit()
        mix = self.mix_decode  # once: a benchmark may flip it between steps from another thread
        riders = [s for s in self.rows if s is not None and s.decoding] if mix else []
        prefilled = self._prefill(riders)
        if not (mix and prefilled):
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
        """Waiting requests in order into free rows, while the pool can promise each the blocks it can ever
        need (the head of the queue waits for blocks rather than being overtaken by shorter requests)."""
        with self._wake:
            for row, occupant in enumerate(self.rows):  # lowest rows first keeps decode batches small
                if not self._waiting:
                    break
                if occupant is None:
                    if not self._claim_blocks(self._waiting[0]):
                        break
                    seq = self._waiting.popleft()
                    seq.row = row
                    self.rows[row] = seq
                    self._tables_np[row, : len(seq.blocks)] = seq.blocks

    def _claim_blocks(self, seq: Sequence) -> bool:
        """Share the prompt's cached leading blocks and reserve the rest; False (nothing taken) if they do not fit."""
        pool = self.pool
        if pool.prefix_cache and not seq.keys:
            salt = self.adapters.cache_salt(seq.adapter_slot) if self.adapters is not None else b"base"
            seq.keys = block_keys(seq.prompt, pool.block_size, salt)
        # At least the prompt's last token is computed here: its logits give the first answer token.
        cached = pool.lookup(seq.keys[: (len(seq.prompt) - 1) // pool.block_size])
        need = pool.blocks_for(len(seq.prompt) + seq.max_tokens) - len(cached)
        if need > pool.available - pool.evictable_among(cached):
            return False
        pool.share(cached)
        pool.reserve(need)
        seq.blocks, seq.reserved = list(cached), need
        seq.computed = seq.cached = len(cached) * pool.block_size
        seq.published = len(cached)
        pool.stats.queried_tokens += len(seq.prompt)
        pool.stats.hit_tokens += seq.cached
        return True

    def _grow(self, seq: Sequence, tokens: int) -> None:
        """Give ``seq`` blocks for its first ``tokens`` tokens (from its reservation)."""
        have, need = len(seq.blocks), self.pool.blocks_for(tokens)
        if need > have:
            new = [self.pool.allocate() for _ in range(need - have)]
            seq.reserved -= len(new)
            self._tables_np[seq.row, have:need] = new
            seq.blocks += new

    def _publish(self, seq: Sequence) -> None:
        """Register the prompt's blocks that are now full and computed in the prefix cache."""
        full = min(seq.computed // self.pool.block_size, len(seq.keys))
        for i in range(seq.published, full):
            self.pool.register(seq.blocks[i], seq.keys[i])
        seq.published = max(seq.published, full)

    def _prefill(self, riders: list[Sequence]) -> bool:
        """Prefill pending prompts within the step's token budget; ``riders`` (decoding requests) get their
        next token in the first forward. Returns whether a forward ran (a step without one decodes alone).

        Whole prompts that fit one chunk are prefilled together in one forward (padded to the
        longest; causal attention keeps the padding after every real token), one such group per
        step: a forward costs the host about the same dispatch time whatever its size (10-30 ms on
        an H100 host for a 0.5B model), so a prompt that does not fit this step's group joins the
        next step's rather than paying for a forward of its own. The rest of a prompt after its cached
        prefix is grouped the same way when it fits one chunk (with other such rests: their attention
        reads the cache). Longer prompts go one chunk at a time, attending to what the cache already
        holds; the group runs before them when its oldest prompt is older. The riders' tokens do not count
        against the budget: in a compute-bound prompt forward a few hundred extra rows cost little.
        """
        budget = self.prefill_budget
        pending = sorted((s for s in self.rows if s is not None and s.computed < len(s.prompt)), key=lambda s: s.seq_id)
        if not pending:
            return False
        # Whole rests: a prompt from its start, or from the end of its cached prefix, that fits one chunk.
        whole = [s for s in pending if s.computed == s.cached and len(s.prompt) - s.computed <= self.prefill_chunk]
        partial = [s for s in pending if s not in whole]
        group, width = self._choose_group(whole, budget)
        group_first = bool(group) and (not partial or group[0].seq_id < partial[0].seq_id)
        ran = False  # whether a forward ran (and carried the riders)
        if group_first:
            budget -= self._prefill_group(group, width, riders)
            riders, ran = [], True
        for seq in partial:
            while budget > 0 and seq.computed < len(seq.prompt):
                budget -= self._prefill_chunk(seq, min(self.prefill_chunk, budget, len(seq.prompt) - seq.computed),
                                              riders)
                riders, ran = [], True
            if budget <= 0:
                break
        if group and not group_first and budget > 0:
            self._prefill_group(group, width, riders)
            ran = True
        return ran

    def _choose_group(self, whole: list[Sequence], budget: int) -> tuple[list[Sequence], int]:
        """This step's group and its padded width: the oldest prompt, then those closest to it in length
        while the padded group fits the budget. Padding every prompt to the longest costs compute; prompts
        of like length waste little of it (with lengths spread over 1,000-2,000 tokens, groups in arrival
        order padded about a fifth of every forward), and the oldest still goes first. A group is all
        fresh prompts (causal attention over their own tokens) or all rests after cached prefixes of the
        oldest's length (attention reads the same cached positions of every row, without a mask tensor)."""
        if not whole:
            return [], 0
        anchor = whole[0]
        rest = len(anchor.prompt) - anchor.computed
        group, width = [anchor], self._padded(rest)
        alike = [s for s in whole[1:] if s.computed == anchor.computed]
        for seq in sorted(alike, key=lambda s: (abs(len(s.prompt) - s.computed - rest), s.seq_id)):
            if len(group) == self.max_group:
                break
            wider = max(width, self._padded(len(seq.prompt) - seq.computed))
            if wider * (len(group) + 1) <= budget:
                group.append(seq)
                width = wider
        return group, width

    def _padded(self, n: int) -> int:
        # Padding to a multiple keeps the set of shapes small (kernel choice is cached per shape);
        # pad tokens (position -1) write to the scratch block, after every real one, so nothing attends to them.
        return -(-n // self.prefill_pad) * self.prefill_pad

    def _prefill_group(self, group: list[Sequence], width: int, riders: list[Sequence]) -> int:
        """The rest of every prompt of ``group`` in one forward, laid out (len(group), width) for attention and
        packed (no padding) everywhere else, with the riders' next tokens; returns prompt tokens spent."""
        device = self.model.device
        for seq in group:
            self._grow(seq, len(seq.prompt))
        starts = [s.computed for s in group]
        tokens, positions, pack = self._prompt_batch(group, width)
        segments = self._segments([len(s.prompt) - a for s, a in zip(group, starts)], [s.adapter_slot for s in group],
                                  width=None if pack is not None else width, riders=riders)
        tables = self.tables[[s.row for s in group]]
        logits = self.model.forward(
            tokens, positions, cache=self.cache, block_tables=tables.to(device), adapters=self.adapters,
            segments=segments,
            logits_at=torch.tensor([len(s.prompt) - a - 1 for s, a in zip(group, starts)], device=device),
            cached=starts[0] if len(set(starts)) == 1 else None, decode=self._decode_rows(riders), pack=pack,
        )
        for seq in group:
            seq.computed = len(seq.prompt)
            self._publish(seq)
        prompt_logits = logits[: len(group)]
        picked = self._sample(group, prompt_logits)
        self._keep_logprobs(group, prompt_logits, picked)
        for seq, token in zip(group, picked):
            self._accept(seq, token)
        self._take_next(riders, logits[len(group) :])
        return width * len(group)

    def _prefill_chunk(self, seq: Sequence, n: int, riders: list[Sequence]) -> int:
        """The next ``n`` prompt tokens of ``seq``, with the riders' next tokens; returns prompt tokens spent."""
        start = seq.computed
        padded = self._padded(n)
        self._grow(seq, start + n)
        tokens, positions, pack = self._prompt_batch([seq], padded, upto=start + n)
        device = self.model.device
        logits = self.model.forward(
            tokens, positions, cache=self.cache,
            block_tables=self.tables[seq.row : seq.row + 1].to(device), adapters=self.adapters,
            segments=self._segments([n], [seq.adapter_slot], width=None if pack is not None else padded,
                                    riders=riders), logits_at=n - 1,
            cached=start, decode=self._decode_rows(riders), pack=pack,
        )
        seq.computed += n
        self._publish(seq)
        if seq.computed == len(seq.prompt):
            picked = self._sample([seq], logits[:1])
            self._keep_logprobs([seq], logits[:1], picked)
            self._accept(seq, picked[0])
        self._take_next(riders, logits[1:])
        return padded

    def _prompt_batch(self, seqs: list[Sequence], width: int, *, upto: int | None = None):
        """(tokens, positions, pack) on the device: tokens and positions (len(seqs), width), each prompt from
        its first uncomputed token (to ``upto``, else its end), then padding (token 0, position -1); pack the
        flat indices of the real tokens (the forward runs those only, see EngineModel.forward; None for one
        prompt, or when ``pack_prompts`` is off). Built in numpy: a group holds ~16k tokens, and this is on
        the host's path before every prompt forward, while the GPU waits."""
        tokens = np.zeros((len(seqs), width), dtype=np.int64)
        positions = np.full((len(seqs), width), -1, dtype=np.int64)
        for i, seq in enumerate(seqs):
            start, end = seq.computed, upto if upto is not None else len(seq.prompt)
            tokens[i, : end - start] = seq.prompt[start:end]
            positions[i, : end - start] = np.arange(start, end)
        device = self.model.device
        pack = None
        # One prompt's padding is the rounding to prefill_pad only: packing it would save little and add the
        # kernels that lay attention out again, which a launch-bound forward (a small model) pays for.
        if self.pack_prompts and len(seqs) > 1:
            pack = torch.from_numpy(np.flatnonzero(positions >= 0)).to(device)
        return torch.from_numpy(tokens).to(device), torch.from_numpy(positions).to(device), pack

    def _segments(self, lengths: list[int], slots: list[int], *, width: int | None, riders: list[Sequence]):
        """Adapter segments of prompts laid out ``width`` tokens apart (None: packed back to back), then the
        riders' tokens; None when none of them has an adapter."""
        rider_slots = [s.adapter_slot for s in riders]
        if self.adapters is None or not any(slots + rider_slots):
            return None
        plan = (segment_mixed(lengths, slots, width=width, decode_slots=rider_slots) if riders
                else segment_prompts(lengths, slots, width=width))
        return to_segments(plan, device=self.model.device)

    def _next_position(self, seq: Sequence, *, unread: int = 0) -> int:
        """The cache position of ``seq``'s newest token (the decode input), its block taken if new;
        ``unread``: tokens generated on the device that the host has not read yet."""
        position = len(seq.prompt) + len(seq.generated) + unread - 1
        self._grow(seq, position + 1)
        return position

    def _decode_rows(self, riders: list[Sequence]) -> DecodeRows | None:
        if not riders:
            return None
        device = self.model.device
        positions = [self._next_position(s) for s in riders]
        return DecodeRows(tokens=torch.tensor([s.generated[-1] for s in riders], device=device),
                          positions=torch.tensor(positions, device=device),
                          block_tables=self.tables[[s.row for s in riders]].to(device))

    def _decode_step(self) -> None:
        active = [s for s in self.rows if s is not None and s.decoding]
        if not active:
            return
        if self.decode_ahead and all(_plain_greedy(s) for s in active):
            self._in_flight = self._launch_greedy(active)
            return
        logits, n = self._run_decode(active, [s.generated[-1] for s in active])
        rows = [s.row for s in active]
        if rows != list(range(len(active))):
            logits = logits[torch.tensor(rows, device=logits.device)]
        self._take_next(active, logits[: len(active)])

    def _run_decode(self, active: list[Sequence], tokens: list[int] | torch.Tensor, *, unread: int = 0):
        """One decode step for ``active``: (logits with a row per cache row 0..n-1, n). ``tokens`` are the
        active requests' inputs in their order, or a device tensor indexed by cache row."""
        n = max(s.row for s in active) + 1
        # Rows not decoding (free, still prefilling, or about to finish) write to and read the scratch block:
        # position 0 of an all-scratch table.
        positions, slots = [0] * n, [0] * n
        for seq in active:
            positions[seq.row] = self._next_position(seq, unread=unread)
            slots[seq.row] = seq.adapter_slot
        if not isinstance(tokens, torch.Tensor):
            by_row = [0] * n
            for seq, token in zip(active, tokens):
                by_row[seq.row] = token
            tokens = by_row
        else:
            tokens = tokens[:n]
        tables = self.tables[:n].clone()
        if len(active) < n:
            tables[sorted(set(range(n)) - {s.row for s in active})] = 0
        return self.decode(tokens, positions, slots, tables), n  # logits (>= n, vocab)

    def _launch_greedy(self, active: list[Sequence], *, tokens: torch.Tensor | None = None) -> InFlight:
        """Launch a greedy decode step without waiting for it: its picks stay on the device (the next step's
        input) and are copied to the host behind it. ``tokens``: the inputs are the step before's picks,
        which the host has not read yet."""
        inputs = [s.generated[-1] for s in active] if tokens is None else tokens
        logits, n = self._run_decode(active, inputs, unread=0 if tokens is None else 1)
        picked = logits[:n].argmax(dim=-1)
        if picked.is_cuda:
            host = picked.to("cpu", non_blocking=True)  # into page-locked memory
            copied = torch.cuda.Event()
            copied.record()
            return InFlight(active, picked, host, copied)
        return InFlight(active, picked, picked, None)

    def _launch_ahead(self, in_flight: InFlight) -> InFlight | None:
        """The decode step after ``in_flight``, launched before its tokens are read, when this round would
        do nothing else: no cancellation, no waiting request with a free row to take, every occupied row in
        that step (a full engine with a queue keeps running ahead; a row freed by this landing is filled next
        round). Rows whose length ends with that step's token are left out; a row that stops on a stop token
        is only known once read, so its row in this step is computed and discarded (its blocks are freed
        after this launch, and the step's write into them runs before any later step's, in stream order)."""
        live = [s for s in in_flight.seqs if s.finish is None]
        admissible = self._waiting and None in self.rows
        if admissible or self._cancelled or sum(s is not None for s in self.rows) != len(live):
            return None
        going_on = [s for s in live if len(s.generated) + 1 < s.max_tokens]
        if not going_on:
            return None
        return self._launch_greedy(going_on, tokens=in_flight.picked)

    def _land(self, in_flight: InFlight) -> None:
        """Read a launched step's tokens and deliver them (requests finished since are skipped)."""
        tokens = in_flight.tokens()
        for seq in in_flight.seqs:
            if seq.finish is None:
                self._accept(seq, tokens[seq.row])

    def _take_next(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Pick and deliver each decoding request's next token from its row of ``logits`` (len(seqs), vocab)."""
        if not seqs:
            return
        if all(s.temperature == 0 and s.repetition_penalty == 1.0 for s in seqs):  # plain greedy
            picked = logits.argmax(dim=-1).tolist()
        else:
            picked = self._sample(seqs, logits)
        self._keep_logprobs(seqs, logits, picked)
        for seq, token in zip(seqs, picked):
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
            self.tables[seq.row].zero_()
            self.pool.release(seq.blocks)
            self.pool.unreserve(seq.reserved)
            seq.blocks, seq.reserved = [], 0
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
        self._in_flight = None
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting + [s for s in self.rows if s is not None]:
            self._finish(seq, "cancelled", error=error)


def _plain_greedy(seq: Sequence) -> bool:
    """Whether ``seq``'s next token is the argmax of its logits alone (what a step run ahead picks)."""
    return seq.temperature == 0 and seq.repetition_penalty == 1.0 and seq.top_logprobs is None
