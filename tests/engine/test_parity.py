"""Greedy tokens of the engine equal transformers + peft, for every row of a mixed-adapter batch."""

import pytest

from tests.engine.conftest import make_sequence, prompt_of, run_until_done

ROWS = [("alpha", 12), ("beta", 30), ("gamma", 7), (None, 19)]


@pytest.mark.slow  # first peft generate of the session (~5 s on a loaded 2-core machine)
def test_mixed_adapter_batch_matches_peft_per_row(engine, reference):
    requests = [make_sequence(engine, prompt_of(i, length), adapter=adapter) for i, (adapter, length) in enumerate(ROWS)]
    for seq, _ in requests:
        engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [c for _, c in requests])

    outputs = []
    for (seq, collector), (adapter, _) in zip(requests, ROWS):
        expected = reference(seq.prompt, adapter, 16)
        assert collector.tokens == expected, f"row with adapter {adapter}"
        assert collector.finish == "length"
        outputs.append(collector.tokens)
    # the adapters really change the answer, so the parity above is not parity of the base model
    base_outputs = [reference(seq.prompt, None, 16) for seq, _ in requests[:3]]
    assert all(out != base for out, base in zip(outputs[:3], base_outputs))
    assert engine.adapters.in_use("alpha") == 0 and not any(engine.scheduler.rows)


def test_same_adapter_in_several_rows(engine, reference):
    prompts = [prompt_of(40 + i, 9 + 5 * i) for i in range(3)]
    requests = [make_sequence(engine, p, adapter="beta") for p in prompts]
    for seq, _ in requests:
        engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [c for _, c in requests])
    for prompt, (_, collector) in zip(prompts, requests):
        assert collector.tokens == reference(prompt, "beta", 16)
