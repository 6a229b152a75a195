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
