"""EngineGenerator through the Generator protocol: prompt building, streamed text, stops, cancellation."""

import asyncio
import time

import pytest

from core.errors import LoragError, NotFound
from core.records import Chunk, Passage
from core.prompt import ChatMessage
from server.generation.protocol import GenerationRequest, Generator, SamplingParams
from core.prompt import build_prompt

PASSAGES = (
    Passage(Chunk(id="c1", tenant="acme", document_id="d1", source="warranty.md", page=1, start=0, end=60,
                  text="The warranty covers manufacturing defects for two years."), score=0.9),
    Passage(Chunk(id="c2", tenant="acme", document_id="d2", source="refunds.md", page=2, start=0, end=60,
                  text="Refunds are issued within fourteen days."), score=0.5),
)
MESSAGES = (ChatMessage("user", "How long does the warranty last?"),)


@pytest.fixture(scope="module")
def generator(arch_setup):
    from server.engine.engine import EngineConfig
    from server.generation.engine_generator import EngineGenerator

    _, model_path, dirs = arch_setup
    built = EngineGenerator.from_pretrained(
        str(model_path), config=EngineConfig(max_rows=2, max_len=768, adapter_slots=1, max_rank=8), device="cpu")
    built.adapters.load("beta", dirs["beta"])
    yield built
    asyncio.run(built.close())


def _collect(generator, request):
    async def run():
        stream = await generator.start(request)
        return stream.prompt, [delta async for delta in stream.deltas]

    return asyncio.run(run())


def _expected(generator, reference, adapter, max_tokens):
    prompt = build_prompt(MESSAGES, PASSAGES, tokenizer=generator.tokenizer)
    eos = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = reference(prompt.token_ids, adapter, max_tokens, eos=eos)
    return prompt, ids, generator.tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)


@pytest.mark.parametrize("adapter", [None, "beta"])
def test_streamed_text_matches_transformers(generator, reference, adapter):
    assert isinstance(generator, Generator)
    prompt, ids, text = _expected(generator, reference, adapter, 20)
    request = GenerationRequest(MESSAGES, PASSAGES, SamplingParams(max_tokens=20), adapter=adapter, request_id="r1")
    info, deltas = _collect(generator, request)
    assert info.prompt_tokens == len(prompt.token_ids)
    assert info.passages_used == PASSAGES
    assert "".join(d.text for d in deltas) == text
    assert sum(d.tokens for d in deltas) == len(ids)
    assert deltas[-1].finish_reason == ("length" if len(ids) == 20 else "stop")
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_stop_string_cuts_the_answer(generator, reference):
    _, _, text = _expected(generator, reference, None, 20)
    stop = text[4:7]
    request = GenerationRequest(MESSAGES, PASSAGES, SamplingParams(max_tokens=20, stop=(stop,)))
    _, deltas = _collect(generator, request)
    assert "".join(d.text for d in deltas) == text[: text.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    _wait_idle(generator)


def test_seeded_sampling_is_reproducible(generator):
    request = GenerationRequest(MESSAGES, PASSAGES, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7))
    first = "".join(d.text for d in _collect(generator, request)[1])
    second = "".join(d.text for d in _collect(generator, request)[1])
    assert first == second


def test_disconnect_frees_row_and_adapter(generator):
    async def run():
        stream = await generator.start(GenerationRequest(MESSAGES, PASSAGES, SamplingParams(max_tokens=300),
                                                          adapter="beta"))
        async for _ in stream.deltas:
            break  # the client goes away after the first delta
        await stream.deltas.aclose()

    asyncio.run(run())
    _wait_idle(generator)
    assert generator.adapters.in_use("beta") == 0


def test_unknown_adapter_and_oversized_max_tokens_are_refused(generator):
    with pytest.raises(NotFound, match="'nope' is not loaded"):
        _collect(generator, GenerationRequest(MESSAGES, PASSAGES, adapter="nope"))
    with pytest.raises(LoragError, match="max_tokens=5000"):
        _collect(generator, GenerationRequest(MESSAGES, PASSAGES, SamplingParams(max_tokens=5000)))


def _wait_idle(generator, timeout=30.0):
    deadline = time.monotonic() + timeout
    while generator.engine.scheduler.busy:
        assert time.monotonic() < deadline, "engine still holds a request"
        time.sleep(0.05)
    assert not any(generator.engine.scheduler.rows)




def test_logprobs_follow_the_tokens_generated(generator, reference):
    _, ids, text = _expected(generator, reference, None, 12)
    request = GenerationRequest(MESSAGES, PASSAGES, SamplingParams(max_tokens=12, logprobs=True, top_logprobs=2))
    _, deltas = _collect(generator, request)
    assert "".join(d.text for d in deltas) == text  # asking for logprobs changes nothing else
    entries = [entry for delta in deltas for entry in delta.logprobs]
    eos = generator.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(entries) == len([t for t in ids if t != eos])
    for entry in entries:  # greedy: the chosen token is the most likely of the distribution reported
        assert entry.logprob <= 0 and len(entry.top) == 2 and (entry.token, entry.logprob) == entry.top[0]
    plain = _collect(generator, GenerationRequest(MESSAGES, PASSAGES, SamplingParams(max_tokens=12)))[1]
    assert all(not d.logprobs for d in plain)
