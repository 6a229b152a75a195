"""Continuous batching: joining mid-flight, queueing past the row count, chunked prefill, stops, cancellation."""

import pytest
import torch

from core.errors import LoragError
from server.engine.decode_step import EagerDecode
from server.engine.scheduler import Scheduler
from tests.engine.conftest import decode_ahead_workload, make_sequence, prompt_of, run_until_done, run_workload


def _alone(engine, prompt, adapter, n=12):
    seq, collector = make_sequence(engine, prompt, adapter=adapter, max_tokens=n)
    engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [collector])
    return collector.tokens


def test_request_joining_mid_flight_gets_the_same_tokens_as_alone(engine):
    first_prompt, late_prompt = prompt_of(1, 20), prompt_of(2, 33)
    expected_first = _alone(engine, first_prompt, "alpha")
    expected_late = _alone(engine, late_prompt, "gamma")

    first, first_out = make_sequence(engine, first_prompt, adapter="alpha", max_tokens=12)
    engine.scheduler.submit(first)
    for _ in range(4):
        engine.scheduler.step()
    assert 0 < len(first_out.tokens) < 12  # the first request is decoding when the second arrives
    late, late_out = make_sequence(engine, late_prompt, adapter="gamma", max_tokens=12)
    engine.scheduler.submit(late)
    run_until_done(engine.scheduler, [first_out, late_out])
    assert first_out.tokens == expected_first
    assert late_out.tokens == expected_late


def test_more_requests_than_rows_queue_and_match(engine, reference):
    adapters = ["alpha", None, "beta", "gamma", "beta", None]
    prompts = [prompt_of(60 + i, 8 + 3 * i) for i in range(len(adapters))]
    requests = [make_sequence(engine, p, adapter=a, max_tokens=10) for p, a in zip(prompts, adapters)]
    for seq, _ in requests:
        engine.scheduler.submit(seq)
    engine.scheduler.step()
    assert sum(s is not None for s in engine.scheduler.rows) == engine.cache.rows  # 4 rows, 2 waiting
    run_until_done(engine.scheduler, [c for _, c in requests])
    for prompt, adapter, (_, collector) in zip(prompts, adapters, requests):
        assert collector.tokens == reference(prompt, adapter, 10)


def test_chunked_prefill_gives_identical_tokens(engine):
    prompt = prompt_of(7, 70)
    expected = _alone(engine, prompt, "beta")
    engine.cache.pool.clear_prefixes()  # the prompt is prefilled from its first token, chunk by chunk
    chunked = Scheduler(engine.model, engine.cache, engine.adapters,
                        decode=EagerDecode(engine.model, engine.cache, engine.adapters), prefill_chunk=9, prefill_budget=20)
    seq, collector = make_sequence(engine, prompt, adapter="beta", max_tokens=12)
    other, other_out = make_sequence(engine, prompt_of(8, 15), adapter="alpha", max_tokens=12)
    chunked.submit(other)
    chunked.step()  # "other" decodes while the long prompt is prefilled over several steps
    chunked.submit(seq)
    chunked.step()
    assert 0 < seq.computed < len(prompt)
    run_until_done(chunked, [collector, other_out])
    assert collector.tokens == expected
    assert other_out.tokens == _alone(engine, prompt_of(8, 15), "alpha")


def test_stop_token_ends_the_answer_with_reason_stop(engine):
    prompt = prompt_of(11, 16)
    free_run = _alone(engine, prompt, None)
    stop_id = free_run[3]
    seq, collector = make_sequence(engine, prompt, max_tokens=12, stop_token_ids=frozenset({stop_id}))
    engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [collector])
    assert collector.finish == "stop"
    assert collector.tokens == free_run[: free_run.index(stop_id) + 1]


def test_max_tokens_and_context_end_with_reason_length(engine):
    seq, collector = make_sequence(engine, prompt_of(12, 90), max_tokens=50)
    engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [collector])
    assert collector.finish == "length"
    assert len(collector.tokens) == engine.cache.max_len - 90  # clipped to the row's room


def test_cancel_frees_the_row_and_the_adapter(engine):
    seq, collector = make_sequence(engine, prompt_of(13, 10), adapter="gamma", max_tokens=40)
    engine.scheduler.submit(seq)
    engine.scheduler.step()
    engine.scheduler.step()
    assert engine.adapters.in_use("gamma") == 1
    engine.scheduler.cancel(seq.seq_id)
    engine.scheduler.step()
    assert collector.finish == "cancelled"
    assert not any(engine.scheduler.rows)
    assert engine.adapters.in_use("gamma") == 0


def test_cancel_while_waiting(engine):
    seq, collector = make_sequence(engine, prompt_of(14, 10), adapter="alpha")
    engine.scheduler.submit(seq)
    engine.scheduler.cancel(seq.seq_id)
    engine.scheduler.step()
    assert collector.finish == "cancelled" and collector.tokens == []
    assert engine.adapters.in_use("alpha") == 0


def test_prompt_longer_than_the_context_is_refused(engine):
    seq, _ = make_sequence(engine, prompt_of(15, 96))
    with pytest.raises(LoragError, match="96 tokens"):
        engine.scheduler.submit(seq)
    engine.adapters.release(seq.adapter_slot)


def test_background_thread_serves_requests(arch_setup, reference):
    import torch
    from transformers import AutoModelForCausalLM

    from server.engine.engine import Engine, EngineConfig

    _, model_path, dirs = arch_setup
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    threaded = Engine.from_hf(hf, config=EngineConfig(max_rows=2, max_len=64, adapter_slots=1, max_rank=8),
                              device="cpu", dtype=torch.float32)
    try:
        threaded.adapters.load("beta", dirs["beta"])
        requests = [make_sequence(threaded, prompt_of(20 + i, 9), adapter="beta", max_tokens=8) for i in range(3)]
        for seq, _ in requests:
            threaded.scheduler.submit(seq)
        for _, collector in requests:
            assert collector.done.wait(60)
        for i, (_, collector) in enumerate(requests):
            assert collector.tokens == reference(prompt_of(20 + i, 9), "beta", 8)
    finally:
        threaded.close()


def test_one_group_of_whole_prompts_per_step(engine):
    """Prompts that do not fit the step's group wait for the next step's group instead of paying for a
    forward of their own; every request still gets the tokens it gets alone."""
    prompts = [prompt_of(20 + i, 12) for i in range(3)]
    expected = [_alone(engine, prompt, None) for prompt in prompts]
    scheduler = Scheduler(engine.model, engine.cache, engine.adapters,
                          decode=EagerDecode(engine.model, engine.cache, engine.adapters), prefill_chunk=16,
                          prefill_budget=30)  # two 12-token prompts fit a step's budget, three do not
    forwards = []
    forward = engine.model.forward

    def counting_forward(*args, **kwargs):
        forwards.append(kwargs.get("cached") == 0)  # a forward of prompts from their start
        return forward(*args, **kwargs)

    engine.model.forward = counting_forward
    try:
        requests = [make_sequence(engine, prompt, max_tokens=12) for prompt in prompts]
        for seq, _ in requests:
            scheduler.submit(seq)
        scheduler.step()
        assert forwards.count(True) == 1  # one prefill forward: the first two prompts together
        assert [seq.computed for seq, _ in requests] == [12, 12, 0]
        scheduler.step()
        assert requests[2][0].computed == 12
        run_until_done(scheduler, [collector for _, collector in requests])
    finally:
        del engine.model.forward
    assert [collector.tokens for _, collector in requests] == expected


def test_group_takes_the_oldest_prompt_and_those_closest_to_it_in_length(engine):
    """Padding a group to its longest prompt costs compute: the step's group is the oldest prompt and the
    prompts nearest its length that fit, not the next ones in arrival order."""
    lengths = [10, 30, 11, 29]
    prompts = [prompt_of(80 + i, n) for i, n in enumerate(lengths)]
    expected = [_alone(engine, prompt, None) for prompt in prompts]
    engine.cache.pool.clear_prefixes()  # every prompt starts from its first token
    scheduler = Scheduler(engine.model, engine.cache, engine.adapters,
                          decode=EagerDecode(engine.model, engine.cache, engine.adapters), prefill_chunk=32,
                          prefill_budget=64)  # 10 + 30 would fit padded (2 x 30) but pad 10 to 30
    requests = [make_sequence(engine, prompt, max_tokens=12) for prompt in prompts]
    for seq, _ in requests:
        scheduler.submit(seq)
    scheduler.step()
    assert [seq.computed for seq, _ in requests] == [10, 0, 11, 0]
    scheduler.step()
    assert [seq.computed for seq, _ in requests] == [10, 30, 11, 29]
    run_until_done(scheduler, [collector for _, collector in requests])
    assert [collector.tokens for _, collector in requests] == expected


def _counting_decode(engine):
    """An eager decode step that records the batch size of every call, and that record."""
    decode = EagerDecode(engine.model, engine.cache, engine.adapters)
    steps = []

    def counting_decode(*args):
        steps.append(len(args[0]))
        return decode(*args)

    return counting_decode, steps


def test_decoding_requests_ride_along_prompt_forwards(engine):
    """Chunked prefill mixed into decoding: while a long prompt is prefilled chunk by chunk, a running
    request gets one token per step inside those forwards (no decode step of its own), and both requests
    get exactly the tokens they get alone."""
    running_prompt, long_prompt = prompt_of(30, 14), prompt_of(31, 70)
    expected_running = _alone(engine, running_prompt, "alpha")
    expected_long = _alone(engine, long_prompt, "gamma")
    engine.cache.pool.clear_prefixes()
    counting_decode, decode_steps = _counting_decode(engine)
    scheduler = Scheduler(engine.model, engine.cache, engine.adapters, decode=counting_decode, prefill_chunk=9,
                          prefill_budget=9)
    running, running_out = make_sequence(engine, running_prompt, adapter="alpha", max_tokens=12)
    scheduler.submit(running)
    scheduler.step()  # its prompt (14 tokens: two chunks)
    scheduler.step()
    assert running.decoding and len(running_out.tokens) == 1
    long, long_out = make_sequence(engine, long_prompt, adapter="gamma", max_tokens=12)
    scheduler.submit(long)
    for chunk in range(1, 5):
        scheduler.step()
        assert long.computed == 9 * chunk  # one chunk of the long prompt per step ...
        assert len(running_out.tokens) == 1 + chunk  # ... and one token for the running request in it
    assert decode_steps == []  # every token so far came out of a prompt forward
    run_until_done(scheduler, [running_out, long_out])
    assert decode_steps  # once no prompt is pending, decode steps run on their own
    assert running_out.tokens == expected_running
    assert long_out.tokens == expected_long


def test_decode_after_prompts_when_mixing_is_off(engine):
    """mix_decode=False keeps the older order (prompts, then a decode step), with the same tokens."""
    prompts = [prompt_of(40, 20), prompt_of(41, 45)]
    expected = [_alone(engine, prompts[0], "beta", n=10), _alone(engine, prompts[1], None, n=10)]
    engine.cache.pool.clear_prefixes()
    counting_decode, decode_steps = _counting_decode(engine)
    scheduler = Scheduler(engine.model, engine.cache, engine.adapters, decode=counting_decode, prefill_chunk=16,
                          prefill_budget=16, mix_decode=False)
    first, first_out = make_sequence(engine, prompts[0], adapter="beta", max_tokens=10)
    scheduler.submit(first)
    scheduler.step()
    scheduler.step()  # the rest of the first prompt, then its decode step
    assert decode_steps == [1]
    second, second_out = make_sequence(engine, prompts[1], max_tokens=10)
    scheduler.submit(second)
    scheduler.step()  # a chunk of the second prompt, then a decode step for the first
    assert decode_steps == [1, 1] and 0 < second.computed < len(prompts[1])
    run_until_done(scheduler, [first_out, second_out])
    assert [first_out.tokens, second_out.tokens] == expected


def test_decode_step_never_writes_into_a_row_still_prefilling(engine):
    """With mixing off, a decode step covers rows 0..n-1; a row below a decoding one whose prompt is still being
    prefilled must read and write the scratch block, not its own first block (which holds its prompt's start)."""
    short, long_prompt = prompt_of(50, 10), prompt_of(51, 45)
    expected_short, expected_long = _alone(engine, short, "alpha"), _alone(engine, long_prompt, "gamma")
    engine.cache.pool.clear_prefixes()
    scheduler = Scheduler(engine.model, engine.cache, engine.adapters,
                          decode=EagerDecode(engine.model, engine.cache, engine.adapters), prefill_chunk=16,
                          prefill_budget=32, mix_decode=False)
    placeholder, _ = make_sequence(engine, prompt_of(52, 10), max_tokens=12)
    decoding, decoding_out = make_sequence(engine, short, adapter="alpha", max_tokens=12)
    scheduler.submit(placeholder)
    scheduler.submit(decoding)
    scheduler.step()  # both prefilled as one group, rows 0 and 1
    scheduler.cancel(placeholder.seq_id)
    scheduler.step()  # row 0 free again
    prefilling, prefilling_out = make_sequence(engine, long_prompt, adapter="gamma", max_tokens=12)
    scheduler.submit(prefilling)
    scheduler.step()
    assert prefilling.row == 0 < decoding.row and 0 < prefilling.computed < len(long_prompt)
    run_until_done(scheduler, [decoding_out, prefilling_out])
    assert decoding_out.tokens == expected_short
    assert prefilling_out.tokens == expected_long


def test_a_prefill_budget_or_chunk_under_one_token_is_refused(engine):
    # A budget of 0 would run no prompt forward, and with mixing on the decoding requests would wait forever.
    decode = EagerDecode(engine.model, engine.cache, engine.adapters)
    for chunk, budget in ((16, 0), (0, 32)):
        with pytest.raises(ValueError, match="prefill_chunk and prefill_budget must be >= 1"):
            Scheduler(engine.model, engine.cache, engine.adapters, decode=decode, prefill_chunk=chunk,
                      prefill_budget=budget)


# ---- decode steps launched ahead of the host ----------------------------------------------------------

def test_decode_ahead_gives_the_tokens_of_steps_read_one_by_one(engine):
    """Greedy decode steps launched before the host reads the step before (the default) give the same
    tokens and finish reasons as reading every step first, with requests stopping on a stop token while
    the next step is launched, ending on length, joining mid-flight and sampling; every block is back in
    the pool afterwards."""
    specs = decode_ahead_workload(engine)
    results = {}
    for ahead in (False, True):
        engine.cache.pool.clear_prefixes()
        decode = EagerDecode(engine.model, engine.cache, engine.adapters)
        from_device = []

        def counting(tokens, *rest, decode=decode, from_device=from_device):
            from_device.append(isinstance(tokens, torch.Tensor))
            return decode(tokens, *rest)

        scheduler = Scheduler(engine.model, engine.cache, engine.adapters, decode=counting, prefill_chunk=64,
                              prefill_budget=128, decode_ahead=ahead)
        results[ahead] = run_workload(engine, scheduler, specs)
        assert any(from_device) == ahead  # steps fed with the step before's picks, not read by the host
        assert engine.cache.pool.used == 0 and not scheduler.tables.any()
    assert results[True] == results[False]
    assert [finish for _, finish in results[True]].count("stop") == 2


def test_packed_and_padded_prompt_groups_give_the_same_tokens(engine):
    """Prompt groups run packed (the default: real tokens only) or laid out padded give the same tokens."""
    specs = decode_ahead_workload(engine, seed=120)
    results, packs = {}, []
    forward = engine.model.forward

    def recording_forward(*args, pack=None, **kwargs):
        packs.append(pack is not None)
        return forward(*args, pack=pack, **kwargs)

    engine.model.forward = recording_forward
    try:
        for packed in (True, False):
            engine.cache.pool.clear_prefixes()
            packs.clear()
            scheduler = Scheduler(engine.model, engine.cache, engine.adapters,
                                  decode=EagerDecode(engine.model, engine.cache, engine.adapters), prefill_chunk=64,
                                  prefill_budget=128, pack_prompts=packed)
            results[packed] = run_workload(engine, scheduler, specs)
            assert any(packs) == packed  # the four prompts submitted together went as one packed forward
    finally:
        del engine.model.forward
    assert results[True] == results[False]


def _ahead_scheduler(engine):
    """A scheduler running decode steps ahead, and a record of which steps took the step before's picks."""
    decode = EagerDecode(engine.model, engine.cache, engine.adapters)
    from_device = []

    def counting(tokens, *rest):
        from_device.append(isinstance(tokens, torch.Tensor))
        return decode(tokens, *rest)

    engine.cache.pool.clear_prefixes()
    return Scheduler(engine.model, engine.cache, engine.adapters, decode=counting, prefill_chunk=64,
                     prefill_budget=128), from_device


def test_a_full_engine_with_a_queue_still_decodes_ahead(engine, reference):
    """Six requests on four rows: while two wait for a row the running four keep decoding ahead (a waiting
    request with no row to take is no reason to read every step), and every request gets its tokens."""
    scheduler, from_device = _ahead_scheduler(engine)
    prompts = [prompt_of(130 + i, 10) for i in range(6)]
    requests = [make_sequence(engine, p, max_tokens=12) for p in prompts]
    for seq, _ in requests:
        scheduler.submit(seq)
    for _ in range(6):
        scheduler.step()
    assert scheduler._waiting and any(from_device)
    run_until_done(scheduler, [c for _, c in requests])
    for prompt, (_, collector) in zip(prompts, requests):
        assert collector.tokens == reference(prompt, None, 12)


def test_cancel_and_failure_with_a_step_in_flight(engine):
    """A cancel while a step runs ahead ends that request after the step is read; a failure with a step in
    flight drops it, frees every block, and the next request is served."""
    scheduler, _ = _ahead_scheduler(engine)
    requests = [make_sequence(engine, prompt_of(140 + i, 10), max_tokens=n) for i, n in enumerate([1, 2, 3, 30])]
    for seq, _ in requests:
        scheduler.submit(seq)
    for _ in range(5):
        scheduler.step()
    scheduler.cancel(requests[3][0].seq_id)
    run_until_done(scheduler, [c for _, c in requests])
    assert [(len(c.tokens), c.finish) for _, c in requests[:3]] == [(1, "length"), (2, "length"), (3, "length")]
    assert requests[3][1].finish == "cancelled" and 0 < len(requests[3][1].tokens) < 30
    seq, collector = make_sequence(engine, prompt_of(145, 10), max_tokens=30)
    scheduler.submit(seq)
    for _ in range(4):
        scheduler.step()
    assert scheduler._in_flight is not None
    scheduler._fail_all(RuntimeError("the device failed"))
    assert collector.finish == "cancelled" and engine.cache.pool.used == 0
    after, after_out = make_sequence(engine, prompt_of(146, 10), max_tokens=5)
    scheduler.submit(after)
    run_until_done(scheduler, [after_out])
    assert after_out.finish == "length" and len(after_out.tokens) == 5
