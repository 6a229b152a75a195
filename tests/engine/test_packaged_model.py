"""The multi-adapter engine on CPU with the real packaged model (SmolLM2-135M-Instruct: Llama with grouped-query
attention and tied embeddings), picked by the factory: streamed answers equal transformers + peft greedy."""

import asyncio

import pytest
import torch

from core.prompt import ChatMessage, build_prompt
from core.records import Chunk, Passage
from server.generation.protocol import GenerationRequest, SamplingParams
from server.settings import AdapterSettings, GenerationSettings
from tests.engine.conftest import build_adapter
from tests.peft_reference import greedy_tokens, load_peft_model

pytestmark = pytest.mark.slow

PASSAGES = (
    Passage(Chunk(id="c1", tenant="acme", document_id="d1", source="returns-and-warranty.txt", page=1, start=0,
                  end=90, text="Every Kestrel Tide buoy comes with a three-year limited warranty."), score=0.9),
)
MESSAGES = (ChatMessage("user", "How long is the warranty on a Kestrel Tide buoy?"),)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def served(packaged_model_path, tmp_path_factory, one_torch_thread):
    """(engine generator with adapter 'acme' resident, peft reference model holding the same adapter)."""
    from transformers import AutoModelForCausalLM

    from server.generation.engine_generator import EngineGenerator
    from server.generation.factory import load_generator

    adapter = build_adapter(packaged_model_path, tmp_path_factory.mktemp("packaged-lora") / "acme", seed=7, r=4,
                            lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    settings = GenerationSettings(model="packaged", models_dir=packaged_model_path.parent, device="cpu",
                                  engine="engine", fallback="error", max_batch_size=2, max_context_tokens=512)
    generator = load_generator(settings, adapters=AdapterSettings(max_resident=1, max_rank=8))
    assert isinstance(generator, EngineGenerator)
    generator.adapters.load("acme", adapter)
    base = AutoModelForCausalLM.from_pretrained(packaged_model_path, dtype=torch.float32).eval()
    yield generator, load_peft_model(base, {"acme": adapter})
    asyncio.run(generator.close())


def _stream(generator, adapter):
    async def run():
        request = GenerationRequest(MESSAGES, PASSAGES, SamplingParams(max_tokens=MAX_TOKENS), adapter=adapter)
        stream = await generator.start(request)
        return [delta async for delta in stream.deltas]

    return asyncio.run(run())


def test_engine_streams_what_transformers_and_peft_generate(served):
    generator, reference = served
    tokenizer = generator.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos in generator.stop_token_ids
    prompt = build_prompt(MESSAGES, PASSAGES, tokenizer=tokenizer).token_ids

    answers = {}
    for adapter in (None, "acme"):
        ids = greedy_tokens(reference, list(prompt), adapter, MAX_TOKENS, eos=eos)
        deltas = _stream(generator, adapter)
        text = "".join(d.text for d in deltas)
        assert text == tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
        assert sum(d.tokens for d in deltas) == len(ids)
        assert deltas[-1].finish_reason == ("length" if len(ids) == MAX_TOKENS else "stop")
        answers[adapter] = ids
    assert answers[None] != answers["acme"]  # the adapter is applied
    assert tokenizer.decode(answers[None]).strip()


def test_packed_prompts_decoded_ahead_and_prefix_rests_match_transformers(packaged_model_path, one_torch_thread):
    """The real model through the engine's own scheduler: two RAG prompts of different lengths prefilled as one
    packed group, their greedy steps run ahead of the host, then two more whose shared opening (the system
    prompt) comes from the prefix cache and whose rests are prefilled together after it. Every answer equals
    transformers' greedy tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.engine import Engine, EngineConfig
    from tests.engine.conftest import make_sequence, run_until_done

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path)
    hf = AutoModelForCausalLM.from_pretrained(packaged_model_path, dtype=torch.float32).eval()
    engine = Engine.from_hf(hf, config=EngineConfig(max_rows=2, max_len=512, adapter_slots=1, max_rank=8),
                            device="cpu", dtype=torch.float32, start=False)
    questions = ["How long is the warranty on a Kestrel Tide buoy?", "Does the warranty cover ice damage?",
                 "What does the warranty cover?", "Who pays for return shipping?"]
    prompts = [build_prompt((ChatMessage("user", q),), PASSAGES, tokenizer=tokenizer).token_ids for q in questions]
    assert len({len(p) for p in prompts[:2]}) == 2  # different lengths: the group has padding to leave out
    scheduler, forwards = engine.scheduler, []
    forward = engine.model.forward

    def recording_forward(*args, **kwargs):
        forwards.append((kwargs.get("pack") is not None, kwargs.get("cached")))
        return forward(*args, **kwargs)

    engine.model.forward = recording_forward
    answers = []
    for pair in (prompts[:2], prompts[2:]):
        requests = [make_sequence(engine, list(p), max_tokens=12) for p in pair]
        for seq, _ in requests:
            scheduler.submit(seq)
        run_until_done(scheduler, [c for _, c in requests])
        answers += [c.tokens for _, c in requests]
        if pair is prompts[2:]:
            assert requests[0][0].cached == requests[1][0].cached > 0  # the system prompt, from the cache
    assert (True, 0) in forwards  # the first pair: one packed forward from the prompts' start
    assert any(packed and cached for packed, cached in forwards)  # the second: rests after the cached prefix
    for prompt, tokens in zip(prompts, answers):
        with torch.no_grad():
            expected = hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                   do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == expected
