"""Shared engine fixtures: peft adapters for the tiny models, reference peft models, a step-driven engine."""

import threading
from pathlib import Path

import pytest
import torch

from server.engine.scheduler import Sequence
from tests.peft_reference import greedy_tokens, load_peft_model

# name -> LoraConfig options; different ranks, scalings and targets so padding and scaling are exercised.
ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "beta": dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "gamma": dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                  alpha_pattern={"v_proj": 4}),
}


def build_adapter(model_path: Path, out: Path, *, seed: int, **options) -> Path:
    """A random LoRA (B != 0) for ``model_path``, saved with peft's save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():  # peft's random init is small; make the adapters change the greedy tokens
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def arch_setup(request, tmp_path_factory):
    """(architecture, model path, {adapter name: dir}) for each tiny architecture."""
    model_path = request.getfixturevalue(f"tiny_{request.param}_path")
    root = tmp_path_factory.mktemp(f"adapters-{request.param}")
    dirs = {name: build_adapter(model_path, root / name, seed=i + 10, **opts) for i, (name, opts) in enumerate(ADAPTERS.items())}
    return request.param, model_path, dirs


@pytest.fixture(scope="session")
def reference(arch_setup):
    """A peft model holding every adapter; ``generate(prompt, adapter, n)`` gives greedy token ids."""
    from transformers import AutoModelForCausalLM

    _, model_path, dirs = arch_setup
    model = load_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval(), dirs)

    def generate(prompt: list[int], adapter: str | None, n: int, *, eos: int | None = None) -> list[int]:
        return greedy_tokens(model, prompt, adapter, n, eos=eos)

    return generate


@pytest.fixture(scope="session")
def engine(arch_setup):
    """An engine (CPU, fp32, not started: tests drive ``scheduler.step()``) with every adapter resident."""
    from transformers import AutoModelForCausalLM

    from server.engine.engine import Engine, EngineConfig

    _, model_path, dirs = arch_setup
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = EngineConfig(max_rows=4, max_len=96, adapter_slots=3, max_rank=8, prefill_chunk=64, prefill_budget=128)
    built = Engine.from_hf(hf, config=config, device="cpu", dtype=torch.float32, start=False)
    for name, path in dirs.items():
        built.adapters.load(name, path)
    return built


class Collector:
    """An emit target that records tokens and the finish reason of one sequence."""

    def __init__(self):
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, tokens, finish, error):
        self.tokens.extend(tokens)
        if finish is not None:
            self.finish, self.error = finish, error
            self.done.set()


def make_sequence(engine, prompt: list[int], *, adapter: str | None = None, max_tokens: int = 16, **options):
    """A Sequence holding an acquired adapter slot, with a Collector as its emit."""
    collector = Collector()
    seq = Sequence(prompt=prompt, max_tokens=max_tokens, emit=collector,
                   adapter_slot=engine.adapters.acquire(adapter), **options)
    return seq, collector


def run_until_done(scheduler, collectors, *, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if all(c.done.is_set() for c in collectors):
            return
        scheduler.step()
    raise AssertionError(f"requests not finished after {max_steps} steps")


def prompt_of(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (length,), generator=generator).tolist()


def decode_ahead_workload(engine, *, seed: int = 90):
    """Eight requests for a four-row engine: two stop on a stop token a few tokens in (taken from their own
    free run), the rest end on length at different counts; one samples (temperature 0.8, its own seed)."""
    from server.engine.decode_step import EagerDecode
    from server.engine.scheduler import Scheduler

    plain = Scheduler(engine.model, engine.cache, engine.adapters, decode=EagerDecode(engine.model, engine.cache,
                      engine.adapters), decode_ahead=False)
    adapters = ["alpha", None, "beta", "gamma", "beta", None, "alpha", "gamma"]
    specs = []
    for i, adapter in enumerate(adapters):
        prompt, n = prompt_of(seed + i, 9 + 4 * i), 6 + 3 * (i % 4)
        stop = frozenset()
        if i in (1, 4):
            seq, out = make_sequence(engine, prompt, adapter=adapter, max_tokens=n)
            plain.submit(seq)
            run_until_done(plain, [out])
            stop = frozenset({out.tokens[3]})
        sampled = dict(temperature=0.8, seed=7) if i == 6 else {}
        specs.append((prompt, adapter, n, dict(stop_token_ids=stop, **sampled)))
    return specs


def run_workload(engine, scheduler, specs) -> list[tuple[list[int], str]]:
    """Submit the first four of ``specs``, the rest once the second has stopped (its blocks just freed, the
    step after its stop possibly still queued), and run them all to the end: (tokens, finish) each."""
    requests = [make_sequence(engine, prompt, adapter=adapter, max_tokens=n, **options)
                for prompt, adapter, n, options in specs]
    for seq, _ in requests[:4]:
        scheduler.submit(seq)
    run_until_done(scheduler, [requests[1][1]])
    for seq, _ in requests[4:]:
        scheduler.submit(seq)
    run_until_done(scheduler, [c for _, c in requests])
    return [(c.tokens, c.finish) for _, c in requests]
