"""GPU-only pieces: captured (and compiled) decode graphs give the same tokens as eager decoding and as peft."""

import pytest
import torch

from tests.engine.conftest import make_sequence, prompt_of, run_until_done

pytestmark = pytest.mark.gpu

ROWS = [("alpha", 12), (None, 40), ("gamma", 7), ("beta", 25), ("alpha", 3)]


def _engine(arch_setup, *, cuda_graphs: bool, dtype=torch.float32, compile: bool = False, max_rows: int = 8,
            **options):
    from transformers import AutoModelForCausalLM

    from server.engine.engine import Engine, EngineConfig

    _, model_path, dirs = arch_setup
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    config = EngineConfig(max_rows=max_rows, max_len=128, adapter_slots=3, max_rank=8, prefill_chunk=16,
                          prefill_budget=32, cuda_graphs=cuda_graphs, compile=compile, **options)
    engine = Engine.from_hf(hf, config=config, device="cuda", dtype=dtype, start=False)
    for name, path in dirs.items():
        engine.adapters.load(name, path)
    return engine


def _generate(engine, n: int = 16) -> list[list[int]]:
    requests = [make_sequence(engine, prompt_of(i, length), adapter=adapter, max_tokens=n)
                for i, (adapter, length) in enumerate(ROWS)]
    for seq, _ in requests:
        engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [c for _, c in requests])
    return [c.tokens for _, c in requests]


def test_graphed_decode_matches_eager_and_peft(arch_setup, reference):
    from server.engine.decode_step import GraphedDecode

    graphed = _engine(arch_setup, cuda_graphs=True)
    assert isinstance(graphed.scheduler.decode, GraphedDecode)
    eager = _engine(arch_setup, cuda_graphs=False)
    graphed_tokens, eager_tokens = _generate(graphed), _generate(eager)
    assert graphed_tokens == eager_tokens
    # the CPU peft reference: float32 on both sides, so greedy ids agree
    for (adapter, length), tokens, i in zip(ROWS, graphed_tokens, range(len(ROWS))):
        assert tokens == reference(prompt_of(i, length), adapter, 16), f"row with adapter {adapter}"


def _qwen2_only(arch_setup):
    if arch_setup[0] != "qwen2":  # compiles cost time; qwen2's layer (q/k/v bias) covers llama's
        pytest.skip("compiled decode is checked on the qwen2 model")


def test_compiled_graphs_match_eager_and_peft(arch_setup, reference):
    from server.engine.decode_step import GraphedDecode

    _qwen2_only(arch_setup)
    compiled = _engine(arch_setup, cuda_graphs=True, compile=True, max_rows=4)  # buckets 1, 2, 4: six compiles
    assert isinstance(compiled.scheduler.decode, GraphedDecode) and compiled.scheduler.decode.compiled
    eager = _engine(arch_setup, cuda_graphs=False, max_rows=4)
    compiled_tokens = _generate(compiled)
    assert compiled_tokens == _generate(eager)
    for (adapter, length), tokens, i in zip(ROWS, compiled_tokens, range(len(ROWS))):
        assert tokens == reference(prompt_of(i, length), adapter, 16), f"row with adapter {adapter}"


def test_compiled_step_logits_close_to_eager_in_bf16(arch_setup):
    from server.engine.segments import segment_rows, to_segments

    _qwen2_only(arch_setup)
    engine = _engine(arch_setup, cuda_graphs=False, dtype=torch.bfloat16, max_rows=4)
    model, cache = engine.model, engine.cache
    model.compile_decode()
    prompts = [prompt_of(70 + i, 20) for i in range(4)]
    tables = torch.arange(1, 1 + 4 * cache.max_blocks, dtype=torch.int32, device="cuda").view(4, cache.max_blocks)
    model.forward(torch.tensor(prompts, device="cuda"), torch.arange(20, device="cuda").expand(4, 20), cache=cache,
                  block_tables=tables, adapters=None, cached=0)
    tokens, positions = torch.tensor([[5], [6], [7], [8]], device="cuda"), torch.full((4, 1), 20, device="cuda")
    segments = to_segments(segment_rows([1, 0, 2, 3]), device="cuda", capacity=4)
    for adapters, rows_segments in ((None, None), (engine.adapters, segments)):
        run = dict(cache=cache, block_tables=tables, adapters=adapters, segments=rows_segments)
        expected = model.forward(tokens, positions, **run)
        got = model.forward(tokens, positions, compiled=True, **run)
        # one rounding per fused kernel instead of one per op: close, not equal
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.15)


def test_adapter_reload_needs_no_recapture(arch_setup, reference):
    engine = _engine(arch_setup, cuda_graphs=True)
    graphs_before = dict(engine.scheduler.decode.graphs)
    _, _, dirs = arch_setup
    engine.adapters.unload("alpha")
    engine.adapters.load("alpha-again", dirs["alpha"])
    seq, collector = make_sequence(engine, prompt_of(3, 20), adapter="alpha-again")
    engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [collector])
    assert collector.tokens == reference(prompt_of(3, 20), "alpha", 16)
    assert engine.scheduler.decode.graphs == graphs_before


def test_bf16_engine_runs_mixed_batch(arch_setup):
    engine = _engine(arch_setup, cuda_graphs=True, dtype=torch.bfloat16)
    outputs = _generate(engine, n=8)
    assert all(len(tokens) == 8 for tokens in outputs)
    assert len({tuple(t) for t in outputs}) > 1


def test_decode_ahead_on_captured_graphs_gives_the_tokens_of_steps_read_first(arch_setup):
    """Captured decode steps launched before the host reads the step before (the default) against every
    step read first, on a cache small enough that a waiting request takes the blocks of one that stopped on
    a stop token while the step after it was queued: the same tokens and finish reasons."""
    from server.engine.decode_step import GraphedDecode
    from tests.engine.conftest import decode_ahead_workload, run_workload

    # 16 usable blocks: four requests of up to 52 tokens (4 blocks each), so a newcomer gets the blocks
    # freed last
    engine = _engine(arch_setup, cuda_graphs=True, max_rows=4, kv_blocks=17)
    assert isinstance(engine.scheduler.decode, GraphedDecode)
    specs = decode_ahead_workload(engine)
    results = {}
    for ahead in (False, True):
        engine.cache.pool.clear_prefixes()
        engine.scheduler.decode_ahead = ahead
        results[ahead] = run_workload(engine, engine.scheduler, specs)
        assert engine.cache.pool.used == 0
    assert results[True] == results[False]
    assert [finish for _, finish in results[True]].count("stop") == 2


def test_rests_after_a_cached_prefix_match_peft(arch_setup, reference):
    """Prompts that share a cached prefix are prefilled from its end on the GPU (the rows' cached positions
    gathered, causal attention aligned to the end) and give peft's tokens."""
    engine = _engine(arch_setup, cuda_graphs=True)
    system = prompt_of(30, 35)  # 2 full blocks of 16, then 3 tokens
    prompts = [system + prompt_of(31 + i, 9 + 4 * i) for i in range(3)]
    requests = [make_sequence(engine, p, adapter="beta", max_tokens=10) for p in prompts]
    engine.scheduler.submit(requests[0][0])
    run_until_done(engine.scheduler, [requests[0][1]])
    for seq, _ in requests[1:]:
        engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [c for _, c in requests])
    assert [seq.cached for seq, _ in requests] == [0, 32, 32]
    for prompt, (_, collector) in zip(prompts, requests):
        assert collector.tokens == reference(prompt, "beta", 10)
