"""load_generator: extractive without a model, loud fallback or a clear error when the model cannot load."""

import asyncio
import logging

import pytest
import torch

from core.errors import LoragError
from server.generation.extractive import ExtractiveGenerator
from server.generation.factory import load_generator
from server.settings import GenerationSettings
from server.generation.transformers_generator import TransformersGenerator
from tests.model_factory import copy_without_chat_template


def test_no_model_gives_extractive_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="server.generation.factory"):
        generator = load_generator(GenerationSettings(model=None))

    assert isinstance(generator, ExtractiveGenerator)
    assert any(r.levelno == logging.WARNING and "EXTRACTIVE" in r.getMessage() for r in caplog.records)


def test_missing_model_falls_back_to_extractive_with_an_error_log_naming_the_fix(tmp_path, caplog):
    missing = tmp_path / "no-such-model"
    with caplog.at_level(logging.ERROR, logger="server.generation.factory"):
        generator = load_generator(GenerationSettings(model=str(missing), fallback="extractive"))

    assert isinstance(generator, ExtractiveGenerator)
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert str(missing) in record.getMessage() and "generation.model" in record.getMessage()


def test_missing_model_raises_in_error_mode(tmp_path):
    with pytest.raises(LoragError, match="no-such-model"):
        load_generator(GenerationSettings(model=str(tmp_path / "no-such-model"), fallback="error"))


def test_a_loadable_model_gives_the_transformers_generator(tiny_llama_path):
    settings = GenerationSettings(model=str(tiny_llama_path), device="cpu", max_batch_size=2, max_context_tokens=512)
    generator = load_generator(settings)
    try:
        assert isinstance(generator, TransformersGenerator)
        assert generator.name == f"transformers:{tiny_llama_path}"
        assert generator.max_context_tokens == 512 and generator.max_batch_size == 2
        assert next(generator.model.parameters()).dtype == torch.float32  # "auto" on the CPU
    finally:
        asyncio.run(generator.close())


def test_a_tokenizer_without_chat_template_is_refused_by_name(tiny_llama_path, tmp_path):
    base = copy_without_chat_template(tiny_llama_path, tmp_path / "base-model")
    with pytest.raises(LoragError, match="no chat template"):
        load_generator(GenerationSettings(model=str(base), device="cpu", fallback="error"))
    assert isinstance(load_generator(GenerationSettings(model=str(base), device="cpu", fallback="extractive")),
                      ExtractiveGenerator)
