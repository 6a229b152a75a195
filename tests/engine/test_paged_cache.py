"""The paged KV cache: block accounting, growth across block boundaries, admission by free blocks, prefix
sharing by reference and LRU eviction, each with the tokens transformers + peft give (float32, CPU)."""

import pytest
import torch

from server.engine.block_pool import SCRATCH_BLOCK, BlockPool, block_keys
from tests.engine.conftest import make_sequence, prompt_of, run_until_done


# ---- the pool alone -------------------------------------------------------------------------------------

def test_pool_reserves_allocates_and_frees_without_touching_scratch():
    pool = BlockPool(5, 4)
    assert pool.capacity == 4 and pool.available == 4
    assert pool.reserve(3) and not pool.reserve(2)  # one left after the promise of three
    blocks = [pool.allocate() for _ in range(3)]
    assert SCRATCH_BLOCK not in blocks and len(set(blocks)) == 3
    assert pool.used == 3 and pool.available == 1
    pool.release(blocks)
    assert pool.used == 0 and pool.available == 4
    with pytest.raises(RuntimeError, match="not reserved"):
        for _ in range(5):
            pool.reserve(0)
            pool.allocate()


def test_block_keys_chain_every_earlier_token_and_the_salt():
    tokens = list(range(10, 30))
    keys = block_keys(tokens, 4, b"base")
    assert len(keys) == 5 and len(set(keys)) == 5
    assert block_keys(tokens + [1, 2], 4, b"base") == keys  # a partial last block has no key
    changed = block_keys([99] + tokens[1:], 4, b"base")
    assert all(a != b for a, b in zip(changed, keys))  # a change in block 0 changes every later key
    assert block_keys(tokens, 4, b"slot1.1")[0] != keys[0]  # another adapter's keys/values are other blocks


def test_prefix_blocks_are_shared_then_evicted_least_recently_used_first():
    pool = BlockPool(5, 4)
    a, b = block_keys(list(range(8)), 4, b"s"), block_keys(list(range(100, 104)), 4, b"s")
    pool.reserve(3)
    first = [pool.allocate(), pool.allocate()]
    other = pool.allocate()
    for block, key in zip(first, a):
        pool.register(block, key)
    pool.register(other, b[0])
    assert pool.lookup(a) == first and pool.lookup([a[0], bytes(16), a[1]]) == first[:1]  # stops at a miss
    pool.share(pool.lookup(a))  # a second sequence takes the same blocks by reference
    pool.release(first)
    assert pool.used == 3  # still referenced by the second sequence
    pool.release([other])
    pool.release(first)
    assert pool.cached == 3 and pool.used == 0 and pool.available == 4
    pool.reserve(2)
    pool.allocate()  # the free block first
    evicted = pool.allocate()  # then the least recently released cached block: ``other``
    assert evicted == other and pool.lookup(b) == [] and pool.lookup(a) == first


# ---- the scheduler over the pool ------------------------------------------------------------------------

def _engine(arch_setup, **options):
    from transformers import AutoModelForCausalLM

    from server.engine.engine import Engine, EngineConfig

    _, model_path, dirs = arch_setup
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = EngineConfig(**{**dict(max_rows=4, max_len=96, adapter_slots=3, max_rank=8, prefill_chunk=64,
                                    prefill_budget=128, block_size=8), **options})
    engine = Engine.from_hf(hf, config=config, device="cpu", dtype=torch.float32, start=False)
    for name, path in dirs.items():
        engine.adapters.load(name, path)
    return engine


def test_sequence_grows_across_block_boundaries_and_frees_its_blocks(arch_setup, reference):
    engine = _engine(arch_setup)
    pool, scheduler = engine.cache.pool, engine.scheduler
    seq, out = make_sequence(engine, prompt_of(1, 13), adapter="alpha", max_tokens=20)
    scheduler.submit(seq)
    scheduler.step()  # prefill: 13 prompt tokens in 2 blocks of 8
    assert len(seq.blocks) == 2 and seq.reserved == 3  # 33 tokens can be needed: 5 blocks, 3 still promised
    while len(out.tokens) < 5:
        scheduler.step()
    assert len(seq.blocks) == 3  # position 16 opened the third block
    assert scheduler.tables[seq.row, :3].tolist() == seq.blocks
    run_until_done(scheduler, [out])
    assert out.tokens == reference(prompt_of(1, 13), "alpha", 20)
    assert pool.used == 0 and pool.available == pool.capacity
    assert not scheduler.tables.any()


def test_admission_waits_for_blocks_not_rows(arch_setup, reference):
    # 10 usable blocks of 8 tokens hold one of these requests (40 + 12 tokens: 7 blocks) at a time
    engine = _engine(arch_setup, kv_blocks=11)
    scheduler = engine.scheduler
    prompts = [prompt_of(20 + i, 40) for i in range(3)]
    requests = [make_sequence(engine, p, adapter=a, max_tokens=12) for p, a in zip(prompts, ["beta", None, "gamma"])]
    for seq, _ in requests:
        scheduler.submit(seq)
    scheduler.step()
    assert sum(s is not None for s in scheduler.rows) == 1  # rows are free, blocks are not
    run_until_done(scheduler, [c for _, c in requests])
    for prompt, adapter, (_, out) in zip(prompts, ["beta", None, "gamma"], requests):
        assert out.tokens == reference(prompt, adapter, 12)
    assert engine.cache.pool.used == 0


def test_shared_prefix_is_prefilled_once_and_gives_the_same_tokens(arch_setup, reference):
    engine = _engine(arch_setup)
    pool, scheduler = engine.cache.pool, engine.scheduler
    system = prompt_of(30, 27)  # 3 full blocks of 8, then 3 tokens of the next
    first_prompt, second_prompt = system + prompt_of(31, 9), system + prompt_of(32, 14)
    first, first_out = make_sequence(engine, first_prompt, adapter="beta", max_tokens=10)
    scheduler.submit(first)
    for _ in range(3):
        scheduler.step()
    third_prompt = system + prompt_of(33, 5)
    second, second_out = make_sequence(engine, second_prompt, adapter="beta", max_tokens=10)
    third, third_out = make_sequence(engine, third_prompt, adapter="beta", max_tokens=10)
    scheduler.submit(second)
    scheduler.submit(third)
    scheduler.step()
    assert second.cached == third.cached == 24  # taken by reference while all three run
    assert second.blocks[:3] == third.blocks[:3] == first.blocks[:3]
    assert second.computed == len(second_prompt) and third.computed == len(third_prompt)  # one forward for both rests
    other, other_out = make_sequence(engine, second_prompt, adapter="alpha", max_tokens=10)
    scheduler.submit(other)
    scheduler.step()
    assert other.cached == 0  # another adapter: its keys and values differ
    run_until_done(scheduler, [first_out, second_out, third_out, other_out])
    assert first_out.tokens == reference(first_prompt, "beta", 10)
    assert second_out.tokens == reference(second_prompt, "beta", 10)
    assert third_out.tokens == reference(third_prompt, "beta", 10)
    assert other_out.tokens == reference(second_prompt, "alpha", 10)
    assert pool.stats.hit_tokens == 48 and pool.used == 0 and pool.cached > 0


def test_cached_prefix_is_evicted_when_its_blocks_are_needed(arch_setup, reference):
    engine = _engine(arch_setup, kv_blocks=9)  # 8 usable blocks: 64 tokens
    pool, scheduler = engine.cache.pool, engine.scheduler
    prompt = prompt_of(40, 30)
    seq, out = make_sequence(engine, prompt, max_tokens=4)
    scheduler.submit(seq)
    run_until_done(scheduler, [out])
    assert pool.cached == 3  # the prompt's 3 full blocks stay for a later request
    big, big_out = make_sequence(engine, prompt_of(41, 50), max_tokens=10)  # needs 8 blocks: all of them
    scheduler.submit(big)
    run_until_done(scheduler, [big_out])
    assert big_out.tokens == reference(prompt_of(41, 50), None, 10)
    again, again_out = make_sequence(engine, prompt, max_tokens=4)
    scheduler.submit(again)
    run_until_done(scheduler, [again_out])
    assert again.cached < 24  # the 50-token prompt's blocks evicted the cached prefix
    assert again_out.tokens == out.tokens


def test_prompt_larger_than_the_whole_cache_is_refused_with_its_size(arch_setup):
    from core.errors import LoragError

    engine = _engine(arch_setup, kv_blocks=5)  # 32 tokens in all
    seq, _ = make_sequence(engine, prompt_of(50, 40), max_tokens=4)
    with pytest.raises(LoragError, match="40 tokens, the engine's KV cache holds 32 tokens"):
        engine.scheduler.submit(seq)


def test_cache_is_sized_from_free_gpu_memory_less_headroom(monkeypatch):
    from server.engine.engine import EngineConfig, kv_blocks

    # The free-memory query is the hardware's answer; on a CPU-only machine it is given here.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda")
    block = 2**20  # 1 MiB a block
    config = EngineConfig(max_rows=1000, max_len=4096, block_size=16, kv_headroom_gib=8)
    assert kv_blocks(config, max_len=4096, device=cuda, block_bytes=block) == 12 * 1024  # (20 - 8) GiB of blocks
    few_rows = EngineConfig(max_rows=2, max_len=4096, block_size=16)
    assert kv_blocks(few_rows, max_len=4096, device=cuda, block_bytes=block) == 2 * 2 * 256 + 1  # no use for more
    assert kv_blocks(few_rows, max_len=4096, device=torch.device("cpu"), block_bytes=block) == 2 * 256 + 1
    with pytest.raises(ValueError, match="free GPU memory .*20.0 GiB.* fewer than one request of max_len 4096"):
        kv_blocks(EngineConfig(max_rows=8, kv_headroom_gib=19.9), max_len=4096, device=cuda, block_bytes=block)
