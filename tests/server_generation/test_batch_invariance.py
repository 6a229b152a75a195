"""A greedy answer does not depend on what else is in the batch: alone, or mixed with other tenants' requests
on other adapters and with the base model, it is the same text. Adapters are loaded the way the server loads
them (AdapterHost.load_adapter with a HostAdapter), with the lora_dropout training writes into their config."""

import asyncio
import json

import pytest

from adapters.host import HostAdapter
from core.prompt import ChatMessage
from server.generation.protocol import GenerationRequest, SamplingParams
from tests.engine.conftest import build_adapter

QUESTIONS = (
    "How long is the warranty on a Kestrel Tide buoy?",
    "What does a dissolved oxygen sensor measure?",
    "Name three colours.",
)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _host_adapter(key: str, path) -> HostAdapter:
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    return HostAdapter(key=key, path=path, peft_config=config, tensors=load_file(str(path / "adapter_model.safetensors")))


def _requests(max_tokens: int) -> list[GenerationRequest]:
    return [
        GenerationRequest((ChatMessage("user", question),), (), SamplingParams(max_tokens=max_tokens), adapter=adapter)
        for question in QUESTIONS for adapter in (None, "acme", "beta")
    ]


async def _answer(generator, request: GenerationRequest) -> str:
    stream = await generator.start(request)
    return "".join([delta.text async for delta in stream.deltas])


async def _alone_then_mixed(generator, requests) -> tuple[list[str], list[str]]:
    alone = [await _answer(generator, request) for request in requests]
    mixed = await asyncio.gather(*(_answer(generator, request) for request in requests))
    return alone, list(mixed)


def test_adapters_loaded_next_to_others_do_not_drop_activations(tiny_llama_path, tmp_path, one_torch_thread):
    from server.generation.transformers_generator import TransformersGenerator

    # A high lora_dropout makes a dropout left switched on change nearly every answer of the random model.
    adapters = {name: build_adapter(tiny_llama_path, tmp_path / name, seed=seed, r=4, lora_alpha=8,
                                    target_modules=TARGETS, lora_dropout=0.5)
                for name, seed in (("acme", 7), ("beta", 8))}

    async def scenario():
        generator = TransformersGenerator.from_pretrained(str(tiny_llama_path), device="cpu")
        try:
            for name, path in adapters.items():
                await asyncio.to_thread(generator.load_adapter, name, _host_adapter(name, path))
            requests = _requests(16)
            alone, mixed = await _alone_then_mixed(generator, requests)
            again = [await _answer(generator, request) for request in requests]
            return alone, mixed, again, generator.stats
        finally:
            await generator.close()

    alone, mixed, again, stats = asyncio.run(scenario())
    assert max(stats.batch_sizes) > 1  # the mixed requests did share batches
    assert again == alone
    assert mixed == alone
    assert alone[1] != alone[0] and alone[2] != alone[0]  # both adapters change the answer


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", "engine"])
def test_packaged_model_answers_alike_alone_and_in_a_mixed_batch(engine, packaged_model_path, tmp_path_factory,
                                                                 one_torch_thread):
    from server.generation.factory import load_generator
    from server.settings import AdapterSettings, GenerationSettings

    root = tmp_path_factory.mktemp(f"packaged-adapters-{engine}")
    adapters = {name: build_adapter(packaged_model_path, root / name, seed=seed, r=4, lora_alpha=8,
                                    target_modules=TARGETS, lora_dropout=0.05)
                for name, seed in (("acme", 7), ("beta", 8))}
    settings = GenerationSettings(model="packaged", models_dir=packaged_model_path.parent, device="cpu",
                                  engine=engine, fallback="error", max_batch_size=9, max_context_tokens=512)

    async def scenario():
        generator = load_generator(settings, adapters=AdapterSettings(max_resident=2, max_rank=8))
        try:
            assert generator.name.startswith(engine)
            for name, path in adapters.items():
                await asyncio.to_thread(generator.load_adapter, name, _host_adapter(name, path))
            return await _alone_then_mixed(generator, _requests(20))
        finally:
            await generator.close()

    alone, mixed = asyncio.run(scenario())
    assert mixed == alone
    assert all(text.strip() for text in alone[::3])  # the base model answers every question
    assert len(set(alone[:3])) > 1  # the adapters are applied
