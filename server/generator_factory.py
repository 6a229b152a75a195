"""Picks the generator the server runs from the ``generation`` settings, falling back loudly to extractive."""

import logging

from retrieval.errors import LoragError
from server.extractive_generator import ExtractiveGenerator
from server.generation import Generator

log = logging.getLogger(__name__)

FALLBACKS = ("extractive", "error")


def load_generator(settings, *, embedder=None) -> Generator:
    """The generator for ``settings`` (server.settings.GenerationSettings or any object with its fields).

    ``settings.model`` None gives the extractive generator. A model that cannot be loaded gives
    the extractive generator when ``settings.fallback`` is "extractive", else the error.
    ``embedder`` (optional) lets the extractive generator score sentences by meaning.

    Raises:
        LoragError: the model cannot be loaded and ``settings.fallback`` is "error", or the fallback is unknown.
    """
    if settings.fallback not in FALLBACKS:
        raise LoragError(f"generation.fallback is {settings.fallback!r}; expected one of {', '.join(FALLBACKS)}")
    if not settings.model:
        log.warning(
            "generation.model is not set: answers will be EXTRACTIVE (quoted sentences from the documents, no "
            "generative model). Set generation.model to a hub id or a local model directory to generate answers."
        )
        return ExtractiveGenerator(embedder=embedder)
    from server.transformers_generator import TransformersGenerator  # torch/transformers only when needed

    try:
        return TransformersGenerator.from_pretrained(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            max_batch_size=settings.max_batch_size,
            max_context_tokens=settings.max_context_tokens,
        )
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
