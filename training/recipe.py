"""The fine-tuning recipe, top to bottom: setup -> train (-> evaluate, checkpoint) -> save adapter + manifest.

A plain PyTorch loop: accelerate only places the model and wraps it for data parallelism, so the same code
runs on one CPU process and under ``accelerate launch`` / ``torchrun``; with an FSDP accelerate config the
model is sharded instead (:mod:`training.sharding`). Resuming restores adapter weights,
optimizer, scheduler, RNG states and the position in the data order, so the loss sequence continues exactly.
"""

import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import Conflict, LoragError
from core.datadir import adapters_dir, make_private_dir, tenant_dir
from core.prompt import PROMPT_FORMAT
from models.locate import locate_model
from adapters.manifest import (
    AdapterManifest,
    DataStats,
    LoraSpec,
    TrainMetrics,
    model_fingerprint,
    write_adapter_dir,
    write_manifest,
)
from training import checkpoints, sharding
from training.batches import collate, micro_batches, pack_rows, single_rows
from training.data import Encoded, encode_chat, load_examples, prompt_messages, split_train_val
from training.settings import TrainSettings

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class TrainResult:
    name: str
    adapter_dir: Path | None  # None when interrupted
    run_dir: Path
    step: int
    interrupted: bool = False
    manifest: AdapterManifest | None = None
    history: list[dict] = field(default_factory=list)  # every logged step and evaluation
    stop_signal: int | None = None  # the signal that interrupted the run (SIGINT or SIGTERM)

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.history if "loss" in entry]


def train_adapter(
    settings: TrainSettings,
    *,
    tenant: str,
    data_file: str | Path,
    name: str | None = None,
    val_file: str | Path | None = None,
    resume: bool = False,
    retrieval=None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Fine-tune an adapter for ``tenant`` on ``data_file`` and register it under ``name``.

    ``retrieval`` (a RetrievalService) is used with ``training.with_retrieval``; one is built when missing.
    ``on_step(step, record)`` is called after every optimizer step (progress reporting).

    Raises:
        LoragError: bad data, a base model that cannot be loaded, QLoRA without CUDA.
        Conflict: the adapter name is taken, or a run of that name exists and ``resume`` is false.
    """
    recipe = LoraFinetuneRecipe(settings, tenant=tenant, name=name, resume=resume)
    recipe.setup(data_file=Path(data_file), val_file=Path(val_file) if val_file else None, retrieval=retrieval)
    interrupted = recipe.train(on_step=on_step)
    if interrupted:
        return TrainResult(
            recipe.name, None, recipe.run_dir, recipe.step, True, history=recipe.history, stop_signal=recipe.stop_signal
        )
    manifest = recipe.save()
    return TrainResult(recipe.name, recipe.adapter_dir, recipe.run_dir, recipe.step, False, manifest, recipe.history)


class LoraFinetuneRecipe:
    def __init__(self, settings: TrainSettings, *, tenant: str, name: str | None, resume: bool):
        from adapters.registry import validate_adapter_name

        self.settings = settings
        self.cfg = settings.training
        if not self.cfg.base_model:
            raise LoragError("no base model given", hint="Pass --base MODEL (hub id or local path) or set training.base_model")
        if resume and not name:
            raise LoragError("--resume needs the --name of the run to continue")
        self.tenant = tenant
        self.name = validate_adapter_name(name or f"{self.cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.resume = resume
        self.adapter_dir = adapters_dir(settings.data_dir, tenant) / self.name
        self.run_dir = tenant_dir(settings.data_dir, tenant) / "training" / self.name
        self.history: list[dict] = []
        self.step = 0
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, *, data_file: Path, val_file: Path | None, retrieval=None) -> None:
        import torch
        from accelerate import Accelerator

        from training.loss import CausalLMLoss
        from training.model import (
            attach_adapter, build_optimizer, compile_layers, load_base_model, load_tokenizer, require_cuda_for, use_bf16,
        )

        cfg = self.cfg
        require_cuda_for(cfg.method)  # before reading data or loading anything
        if self.adapter_dir.exists():
            raise Conflict(f"adapter {self.tenant}/{self.name} already exists", hint="Pick another --name or delete it with `lorag adapters delete`")
        latest = checkpoints.latest(self.run_dir)
        if latest is not None and not self.resume:
            raise Conflict(
                f"run {self.tenant}/{self.name} has a checkpoint at step {latest.step}",
                hint="Pass --resume to continue it, or another --name to start over",
            )
        if self.resume and latest is None:
            raise LoragError(f"--resume: run {self.tenant}/{self.name} has no checkpoint in {str(self.run_dir)!r}")

        # cpu=True without CUDA: torchrun/accelerate launch on CPU then runs gloo data parallel too.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.bf16 = use_bf16(cfg.precision)
        # "packaged" and hub ids resolve as the server resolves them (converted once; no minute of hub retries).
        self.base_path = locate_model(cfg.base_model, models_dir=Path(self.settings.data_dir) / "models")
        self.tokenizer = load_tokenizer(self.base_path)

        # Data: file -> examples -> server prompt (+ RAFT passages) -> chat template -> masked tokens.
        self.data = load_examples(data_file, strict=cfg.strict)
        examples = self.data.examples
        if val_file is not None:
            val_examples = load_examples(val_file, strict=cfg.strict).examples
            train_examples = examples
        else:
            train_examples, val_examples = split_train_val(examples, cfg.val_split, seed=cfg.seed)
        self.truncated = 0
        train_encoded = self._encode(train_examples, retrieval)
        val_encoded = self._encode(val_examples, retrieval)
        if cfg.replay_data and train_encoded:
            train_encoded += self._replayed(len(train_encoded))
        if not train_encoded:
            raise LoragError(f"training data file {str(data_file)!r}: no example keeps an answer token within --max-seq-len {cfg.max_seq_len}")
        if cfg.patience is not None and not val_encoded:
            raise LoragError("--patience needs validation data", hint="Use --val-split > 0 or --val-file F")
        self.counts = {"train": len(train_encoded), "val": len(val_encoded)}
        make_rows = (lambda enc: pack_rows(enc, cfg.max_seq_len)) if cfg.packing else single_rows
        self.train_rows, self.val_rows = make_rows(train_encoded), make_rows(val_encoded)

        # Schedule: optimizer steps per epoch from this process's share of micro-batches.
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_epoch = len(micro_batches(len(self.train_rows), cfg.batch_size, seed=cfg.seed, epoch=0, rank=rank, world=world))
        if per_epoch == 0:
            raise LoragError(f"{len(self.train_rows)} training rows are too few for {world} processes x --batch-size {cfg.batch_size}")
        self.steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.eval_steps = cfg.eval_steps or self.steps_per_epoch

        # Model: base (frozen) + fresh adapter, seeded so every run starts from the same weights.
        torch.manual_seed(cfg.seed)
        self.sharded = sharding.fsdp_requested()
        base = load_base_model(
            self.base_path, cfg, device_index=self.accelerator.local_process_index, sharded=self.sharded,
            weights=not (self.sharded and sharding.load_on_main_only() and not self.accelerator.is_main_process),
        )
        self.fingerprint = model_fingerprint(base.config)
        self.peft_model = attach_adapter(base, cfg)
        if cfg.method != "qlora" and not self.sharded:  # FSDP moves each process's shard, never the whole model
            self.peft_model.to(self.accelerator.device)
        if cfg.compile:
            compile_layers(self.peft_model)
        loss_module = CausalLMLoss(self.peft_model, chunk_tokens=cfg.loss_chunk_tokens)
        if self.sharded:
            sharding.shard(loss_module, device=self.accelerator.device, bf16=self.bf16)
            self.model = loss_module
        else:
            self.model = self.accelerator.prepare_model(
                loss_module,
                device_placement=cfg.method != "qlora",  # 4-bit weights were placed by device_map and cannot move
            )
        # After sharding: the optimizer then holds (and keeps state for) this process's shards only.
        self.optimizer = build_optimizer(self.peft_model.parameters(), cfg, sharded=self.sharded)
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, int(round(cfg.warmup_ratio * self.total_steps)), self.total_steps
        )
        self.best = checkpoints.BestTracker()
        self.base_val_loss = None
        self.position = (0, 0)  # (epoch, micro-batch within the epoch) of the next micro-batch
        self.tokens_seen, self.train_seconds = 0, 0.0
        if self.resume:
            self._restore(latest)
        elif self.accelerator.is_main_process:
            make_private_dir(self.run_dir)  # tenant data: 0700 down from the tenant dir
            (self.run_dir / LOG_FILE).write_text("")
            checkpoints.write_json(self.run_dir / "run.json", self._run_identity())
        if self.base_val_loss is None and self.val_rows:
            with self.peft_model.disable_adapter():
                self.base_val_loss = self.evaluate()

    def _replayed(self, train_count: int) -> list[Encoded]:
        """The base model's answers to the replay prompts: ``replay_share`` of the mixed training set."""
        import torch

        from training.replay import load_prompts, replay_conversations

        cfg = self.cfg
        prompts = load_prompts(cfg.replay_data)
        wanted = min(len(prompts), round(cfg.replay_share / (1 - cfg.replay_share) * train_count))
        shuffled = random.Random(cfg.seed).sample(prompts, wanted)
        device = f"cuda:{self.accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        conversations = replay_conversations(
            shuffled, base_path=self.base_path, tokenizer=self.tokenizer, max_new_tokens=cfg.replay_max_tokens,
            run_dir=self.run_dir, write_cache=self.accelerator.is_main_process, device=device, reuse_cache=self.resume,
        )
        return self._encoded([(conversation, None) for conversation in conversations])  # every answer is trained

    def _encode(self, examples, retrieval) -> list[Encoded]:
        cfg = self.cfg
        if cfg.with_retrieval and examples:
            from training.raft import build_raft_examples

            if retrieval is None:
                from retrieval.service import RetrievalService

                retrieval = self._retrieval = getattr(self, "_retrieval", None) or RetrievalService(self.settings)
            conversations = [
                (r.messages, e.trained_turns)
                for e, r in zip(examples, build_raft_examples(
                    examples,
                    lambda question: retrieval.retrieve(self.tenant, question, k=cfg.k),
                    settings=cfg,
                    tokenizer=self.tokenizer,
                    max_seq_len=cfg.max_seq_len,
                ))
            ]
        else:
            conversations = [
                ([*prompt_messages(e).messages, {"role": "assistant", "content": e.answer}], e.trained_turns)
                for e in examples
            ]
        return self._encoded(conversations)

    def _encoded(self, conversations: list[tuple[list[dict], object]]) -> list[Encoded]:
        """(conversation, trained_turns) as chat-templated, label-masked token ids (``trained_turns`` as
        ``training.data.Example``'s); examples with no answer token left within max_seq_len are dropped."""
        cfg = self.cfg
        encoded, truncated = [], 0
        for conversation, trained_turns in conversations:
            item = encode_chat(conversation, self.tokenizer, max_seq_len=cfg.max_seq_len, trained_turns=trained_turns)
            truncated += item.truncated
            if item.target_tokens:
                encoded.append(item)
        if truncated:
            log.warning(
                "%d of %d examples were cut at --max-seq-len %d; %d lost every answer token and were left out",
                truncated, len(conversations), cfg.max_seq_len, len(conversations) - len(encoded),
            )
        self.truncated += truncated
        return encoded

    # ------------------------------------------------------------------ train
    def train(self, *, on_step: Callable[[int, dict], None] | None = None) -> bool:
        """Run optimizer steps until the schedule ends, early stopping fires or SIGINT/SIGTERM arrives.

        Returns True when interrupted (a resumable checkpoint was saved).
        """
        from tqdm import tqdm

        cfg, accelerator = self.cfg, self.accelerator
        stop = _InterruptFlag()
        batches = self._micro_batch_stream()
        bar = tqdm(
            total=self.total_steps, initial=self.step, unit="step", desc=f"train {self.name}",
            disable=not (accelerator.is_main_process and sys.stderr.isatty()),
        )
        self.stopped_early = False
        interrupted = False
        with stop:
            while self.step < self.total_steps:
                started = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                loss = optimizer_step(
                    self.model, [batch for batch, _ in micro], optimizer=self.optimizer, scheduler=self.scheduler,
                    accelerator=accelerator, bf16=self.bf16, max_grad_norm=cfg.max_grad_norm,
                )
                self.step += 1
                self.train_seconds += time.perf_counter() - started
                self.tokens_seen += sum(tokens for _, tokens in micro)
                if accelerator.num_processes > 1:
                    loss = self._mean_over_ranks(loss)

                record = {
                    "step": self.step, "epoch": self.position[0],
                    "loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens": self.tokens_seen,
                    "tokens_per_s": self.tokens_seen / max(self.train_seconds, 1e-9),
                }
                if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                    self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.val_rows and (self.step % self.eval_steps == 0 or self.step == self.total_steps):
                    if self._evaluate_and_track():
                        self.stopped_early = True
                if on_step is not None:
                    on_step(self.step, record)
                interrupt = stop.requested
                if accelerator.num_processes > 1:  # every rank must stop at the same step, or DDP hangs
                    interrupt = self._mean_over_ranks(float(interrupt)) > 0
                if interrupt:
                    self.save_checkpoint()
                    self.stop_signal = stop.signum or signal.SIGINT  # another rank may have received it
                    interrupted = True
                    break
                if self.stopped_early:
                    log.info("early stopping at step %d: val loss did not improve for %d evaluations", self.step, cfg.patience)
                    break
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        bar.close()
        if interrupted:
            log.warning("interrupted at step %d; continue with --resume --name %s", self.step, self.name)
        return interrupted

    def _mean_over_ranks(self, value: float) -> float:
        import torch

        return float(self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), reduction="mean"))

    def _micro_batch_stream(self):
        """(batch, real tokens) in the seeded order from the saved position; endless (epochs repeat)."""
        cfg, accelerator = self.cfg, self.accelerator
        epoch, start = self.position
        while True:
            batches = micro_batches(
                len(self.train_rows), cfg.batch_size, seed=cfg.seed, epoch=epoch,
                rank=accelerator.process_index, world=accelerator.num_processes,
            )
            for index in range(start, len(batches)):
                self.position = (epoch, index + 1)
                rows = [self.train_rows[i] for i in batches[index]]
                yield collate(rows, self.tokenizer.pad_token_id), sum(len(row) for row in rows)
            epoch, start = epoch + 1, 0
            self.position = (epoch, 0)

    def _autocast(self):
        return _autocast(self.accelerator.device, self.bf16)

    # --------------------------------------------------------------- evaluate
    def evaluate(self) -> float:
        """Mean token loss of the adapter (or of the base, under ``disable_adapter``) on the validation rows."""
        import torch

        self.model.eval()
        total, count = 0.0, 0
        batch_size = self.cfg.batch_size
        with torch.no_grad(), self._autocast():
            for start in range(0, len(self.val_rows), batch_size):
                batch = collate(self.val_rows[start : start + batch_size], self.tokenizer.pad_token_id)
                batch = {key: value.to(self.accelerator.device) for key, value in batch.items()}
                loss, n = self.model(**batch)
                total += float(loss)
                count += int(n)
        self.model.train()
        return total / max(count, 1)

    def _evaluate_and_track(self) -> bool:
        """Evaluate, keep the best adapter weights; True when patience has run out."""
        val_loss = self.evaluate()
        improved = self.best.update(self.step, val_loss)
        if improved:
            tensors = sharding.gather_adapter(self.peft_model)  # every process: a collective when sharded
            if self.accelerator.is_main_process:
                checkpoints.save_adapter_weights(tensors, self.run_dir / "best")
        self._log({"step": self.step, "val_loss": val_loss, "val_perplexity": perplexity_of(val_loss)})
        return self.cfg.patience is not None and self.best.evals_since_best >= self.cfg.patience

    # -------------------------------------------------------------- checkpoint
    def save_checkpoint(self) -> Path | None:
        # Gathering sharded tensors is a collective: every process takes part, the main one writes.
        adapter = sharding.gather_adapter(self.peft_model)
        optimizer_state = sharding.optimizer_state(self.model, self.optimizer)
        path = None
        if self.accelerator.is_main_process:
            state = {
                "step": self.step, "position": list(self.position), "tokens_seen": self.tokens_seen,
                "train_seconds": self.train_seconds, "base_val_loss": self.base_val_loss, "best": self.best.to_dict(),
            }
            path = checkpoints.save(self.run_dir, step=self.step, adapter=adapter, optimizer_state=optimizer_state,
                                    scheduler=self.scheduler, state=state)
            log.info("checkpoint saved: %s", path)
        self.accelerator.wait_for_everyone()  # no process goes on (or exits) before the checkpoint is complete
        return path

    def _restore(self, latest) -> None:
        identity = checkpoints.read_json(self.run_dir / "run.json")
        now = self._run_identity()
        changed = sorted(key for key in now.keys() | identity.keys() if identity.get(key) != now.get(key))
        if changed:
            raise LoragError(
                f"--resume: run {self.tenant}/{self.name} was started with different {', '.join(changed)}",
                hint="Resume with the same flags and data, or start a new run with another --name",
            )
        state = checkpoints.load(latest.path, model=self.peft_model, optimizer=self.optimizer, scheduler=self.scheduler,
                                 root=self.model if self.sharded else None)
        self.step = state["step"]
        self.position = tuple(state["position"])
        self.tokens_seen, self.train_seconds = state["tokens_seen"], state["train_seconds"]
        self.base_val_loss = state["base_val_loss"]
        self.best = checkpoints.BestTracker.from_dict(state["best"])
        # Log lines written after the checkpoint belong to the lost part of the interrupted run.
        log_path = self.run_dir / LOG_FILE
        kept = [line for line in _read_log(log_path) if line["step"] <= self.step]
        self.history = kept
        if self.accelerator.is_main_process:
            log_path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        log.info("resumed %s/%s at step %d", self.tenant, self.name, self.step)

    def _run_identity(self) -> dict:
        """What must not change between a run and its resumption."""
        hyper = self.cfg.model_dump(exclude={"save_steps", "logging_steps", "eval_steps", "patience", "strict"})
        identity = {"hyperparameters": hyper, "data_sha256": self.data.sha256, "rows": len(self.train_rows)}
        # Recorded only when not the default, so runs of one process without FSDP keep their identity.
        if self.accelerator.num_processes > 1:
            identity["processes"] = self.accelerator.num_processes  # the data order is split by it
        if self.sharded:
            identity["sharding"] = "fsdp2"  # its optimizer state is saved by parameter name, not position
        return identity

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------- save
    def save(self) -> AdapterManifest | None:
        """Put the best adapter (or the last, without validation) into the tenant's registry, atomically."""
        import torch

        accelerator = self.accelerator
        if self.best.step is not None and self.best.step != self.step:
            checkpoints.load_adapter_weights(self.peft_model, self.run_dir / "best")
        val_loss = self.evaluate() if self.val_rows else None
        # Full adapter tensors under the model's own parameter names, for save_pretrained (a collective when sharded).
        adapter_state = {
            name: sharding.full_tensor(param) for name, param in self.peft_model.named_parameters() if param.requires_grad
        }
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return None
        train_losses = [entry["loss"] for entry in self.history if "loss" in entry]
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        cfg = self.cfg
        manifest = AdapterManifest(
            name=self.name,
            tenant=self.tenant,
            base_model=cfg.base_model,
            base_fingerprint=self.fingerprint,
            method=cfg.method,
            lora=LoraSpec(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=cfg.target_module_list,
                          use_rslora=cfg.rslora, use_dora=cfg.method == "dora"),
            hyperparameters=cfg.model_dump(exclude={"base_model", "method", "rank", "alpha", "dropout", "target_modules", "rslora"}),
            data=DataStats(
                file=str(self.data.path), sha256=self.data.sha256, format=self.data.format, records=self.data.records,
                skipped=len(self.data.bad), truncated=self.truncated, train=self.counts["train"], val=self.counts["val"],
                with_retrieval=cfg.with_retrieval,
            ),
            metrics=TrainMetrics(
                steps=self.step, best_step=self.best.step, train_loss=train_losses[-1] if train_losses else None,
                val_loss=val_loss, base_val_perplexity=perplexity_of(self.base_val_loss), val_perplexity=perplexity_of(val_loss),
                tokens_per_second=self.tokens_seen / max(self.train_seconds, 1e-9), peak_memory_bytes=peak,
                wall_time_s=self.train_seconds, stopped_early=self.stopped_early,
            ),
            versions=_library_versions(),
            prompt_format=PROMPT_FORMAT,
        )

        def fill(directory: Path) -> None:
            from training.plot import plot_losses

            self.peft_model.save_pretrained(directory, state_dict=adapter_state)
            (directory / "README.md").unlink(missing_ok=True)
            (directory / LOG_FILE).write_text((self.run_dir / LOG_FILE).read_text())
            plot_losses(self.history, directory / PLOT_FILE, title=f"{self.tenant}/{self.name}")
            write_manifest(directory, manifest)

        write_adapter_dir(self.adapter_dir, fill)
        checkpoints.remove_run(self.run_dir)
        log.info("adapter saved: %s", self.adapter_dir)
        accelerator.wait_for_everyone()
        return manifest


def optimizer_step(model, micro_batches: list[dict], *, optimizer, scheduler, accelerator, bf16: bool, max_grad_norm: float) -> float:
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns the mean token loss.

    ``model`` is a :class:`training.loss.CausalLMLoss` (possibly DDP-wrapped). Gradients sync only on the
    last micro-batch. The loss is normalised by the target tokens of the whole step, not per micro-batch,
    so accumulating k micro-batches equals one k-times larger batch.
    """
    import torch

    step_targets = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in micro_batches)
    world = accelerator.num_processes
    if world > 1:
        # Gradients are averaged over processes; dividing by the mean target count of all of them makes the
        # step the token mean of the global batch, as one process with the whole batch would compute it.
        step_targets = float(accelerator.reduce(torch.tensor(float(step_targets), device=accelerator.device), reduction="sum")) / world
    step_targets = max(step_targets, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    model.train()
    for index, batch in enumerate(micro_batches):
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        with _maybe_no_sync(accelerator, model, index == len(micro_batches) - 1), _autocast(accelerator.device, bf16):
            token_loss, _ = model(**batch)
            accelerator.backward(token_loss / step_targets)
        loss_sum += token_loss.detach()  # no host sync per micro-batch
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_sum) / step_targets


def _autocast(device, bf16: bool):
    import contextlib

    import torch

    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _InterruptFlag:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM asks the loop to checkpoint and stop; a second one aborts.

    SIGTERM is what a scheduler, ``docker stop`` or Kubernetes sends before killing the process, so it
    gets the same resumable checkpoint as Ctrl-C.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: saving a checkpoint after this step (send it again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        return False


def _maybe_no_sync(accelerator, model, sync: bool):
    import contextlib

    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last micro-batch
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else accelerator.no_sync(model)


def perplexity_of(loss: float | None) -> float | None:
    """exp(mean token loss), capped so a diverged model reports a huge number instead of overflowing."""
    return None if loss is None else float(math.exp(min(loss, 50.0)))


def _read_log(path: Path) -> list[dict]:
    """The step log; a line torn by the interruption being resumed from is dropped (it is rewritten)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("lorag", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions

