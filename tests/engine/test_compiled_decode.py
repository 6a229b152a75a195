"""The compiled decode layer (torch.compile, CPU inductor) gives the eager engine's tokens, one graph for all layers."""

import pytest
import torch

from tests.engine.conftest import make_sequence, prompt_of, run_until_done

# Both rows carry an adapter and stop together: one batch size, one adapter variant, so one compile.
ROWS = [("alpha", 11), ("beta", 6)]


def _engine(arch_setup, *, compile: bool):
    from transformers import AutoModelForCausalLM

    from server.engine.engine import Engine, EngineConfig

    _, model_path, dirs = arch_setup
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = EngineConfig(max_rows=2, max_len=64, adapter_slots=3, max_rank=8, prefill_chunk=32,
                          prefill_budget=64, compile=compile)
    engine = Engine.from_hf(hf, config=config, device="cpu", dtype=torch.float32, start=False)
    for name, path in dirs.items():
        engine.adapters.load(name, path)
    return engine


def _generate(engine) -> list[list[int]]:
    requests = [make_sequence(engine, prompt_of(60 + i, length), adapter=adapter, max_tokens=6)
                for i, (adapter, length) in enumerate(ROWS)]
    for seq, _ in requests:
        engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [c for _, c in requests])
    return [c.tokens for _, c in requests]


@pytest.mark.slow  # one inductor compile with a C++ build (~15-30 s on a shared 2-core machine)
def test_compiled_decode_matches_eager_with_one_graph_for_all_layers(arch_setup):
    import torch._dynamo
    from torch._dynamo.utils import counters

    arch, _, _ = arch_setup
    if arch != "qwen2":
        pytest.skip("one architecture is enough for the CPU compile (qwen2 has the q/k/v bias)")
    eager = _engine(arch_setup, compile=False)
    compiled = _engine(arch_setup, compile=True)
    assert compiled.model.compiled and not eager.model.compiled
    torch._dynamo.reset()
    counters.clear()
    expected = _generate(eager)
    assert _generate(compiled) == expected
    # 2 layers x 5 decode steps ran through it; one (batch 2, adapters on) graph serves them all
    assert counters["stats"]["unique_graphs"] == 1
