"""Picks the generator the server runs from the ``generation`` settings: the multi-adapter engine for Llama/Qwen2,
transformers + peft for other models, falling back loudly to extractive when no model loads."""

import logging

from core.errors import LoragError
from server.generation.extractive import ExtractiveGenerator
from server.generation.protocol import Generator

log = logging.getLogger(__name__)

FALLBACKS = ("extractive", "error")
ENGINES = ("auto", "engine", "transformers")


def load_generator(settings, *, embedder=None, adapters=None) -> Generator:
    """The generator for ``settings`` (server.settings.GenerationSettings or any object with its fields).

    ``settings.model`` None gives the extractive generator. ``settings.engine`` picks how a model runs:
    "engine" the multi-adapter engine (Llama/Qwen2; any other architecture falls back to transformers + peft,
    logged), "transformers" transformers + peft, "auto" the engine on CUDA and transformers elsewhere.
    ``adapters`` (server.settings.AdapterSettings; defaults when None) sizes the engine's adapter slots.
    A model that cannot be loaded gives the extractive generator when ``settings.fallback`` is "extractive",
    else the error. ``embedder`` (optional) lets the extractive generator score sentences by meaning.

    Raises:
        LoragError: the model cannot be loaded and ``settings.fallback`` is "error", or the fallback is unknown.
    """
    if settings.fallback not in FALLBACKS:
        raise LoragError(f"generation.fallback is {settings.fallback!r}; expected one of {', '.join(FALLBACKS)}")
    engine = settings.engine
    if engine not in ENGINES:
        raise LoragError(f"generation.engine is {engine!r}; expected one of {', '.join(ENGINES)}")
    if not settings.model:
        log.warning(
            "generation.model is not set: answers will be EXTRACTIVE (quoted sentences from the documents, no "
            "generative model). Set generation.model to a hub id or a local model directory to generate answers."
        )
        return ExtractiveGenerator(embedder=embedder)
    try:
        return _load_model(settings, engine=engine, adapters=adapters)
    except Exception as error:  # noqa: BLE001 - any load failure has the same fix and the same fallback
        reason = str(error) if isinstance(error, LoragError) else f"{type(error).__name__}: {error}"
        if settings.fallback == "error":
            if isinstance(error, LoragError):
                raise
            raise LoragError(f"cannot load generation model {settings.model!r}: {reason}") from error
        log.error(
            "could not load generation model %r (%s). Falling back to EXTRACTIVE answers (quoted sentences, no "
            "generative model). To fix: point generation.model at a local directory holding the model and "
            "tokenizer (save_pretrained output), or set generation.fallback = \"error\" to refuse to start.",
            settings.model,
            reason,
        )
        return ExtractiveGenerator(embedder=embedder)


def _load_model(settings, *, engine: str, adapters) -> Generator:
    """The engine when ``engine`` asks for it and it runs the model, else transformers + peft."""
    import torch  # torch/transformers only when a model is configured

    from server.generation.transformers_generator import TransformersGenerator

    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if engine == "auto" and device.type != "cuda":
        log.info("generation.engine is auto on %s: serving with transformers + peft (the multi-adapter engine "
                 "is used on CUDA; set generation.engine = \"engine\" to use it here)", device)
    elif engine in ("auto", "engine"):
        from server.generation.engine_generator import load_engine_generator

        generator = load_engine_generator(settings, adapters=adapters)  # None: architecture unsupported, logged
        if generator is not None:
            return generator
    return TransformersGenerator.from_pretrained(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        max_batch_size=settings.max_batch_size,
        max_context_tokens=settings.max_context_tokens,
    )
