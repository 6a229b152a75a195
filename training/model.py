"""The model side of fine-tuning: load the base (bf16/fp32 or 4-bit NF4), attach a LoRA/DoRA adapter, pick the optimizer."""

import logging
import os

from core.errors import LoragError
from training.settings import TrainingSettings

log = logging.getLogger(__name__)


def use_bf16(precision: str) -> bool:
    """bf16 weights and autocast: on CUDA devices that support it (``auto``), or when asked for."""
    import torch

    if precision == "fp32":
        return False
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise LoragError("precision 'bf16' needs a CUDA GPU with bf16 support", hint="Use --precision fp32 or auto")
    return supported


def require_cuda_for(method: str) -> None:
    """QLoRA's 4-bit kernels (bitsandbytes) need CUDA: say so before loading anything.

    Raises:
        LoragError: ``method`` is qlora and no CUDA device is visible.
    """
    import torch

    if method == "qlora" and not torch.cuda.is_available():
        raise LoragError(
            "--method qlora needs a CUDA GPU (bitsandbytes 4-bit NF4 kernels) and none is visible",
            hint="Use --method lora or --method dora on this machine",
        )


def load_tokenizer(base_model: str):
    """The base model's tokenizer, which must have a chat template (prompts are rendered with it).

    Raises:
        LoragError: a local path that does not exist, a tokenizer that cannot load, or no chat template.
    """
    from transformers import AutoTokenizer

    from core.prompt import require_chat_template

    if os.sep in base_model and not os.path.exists(base_model):  # else transformers calls it a bad repo id
        raise LoragError(f"base model directory {base_model!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as error:
        raise LoragError(f"cannot load the tokenizer of base model {base_model!r}: {error}") from error
    require_chat_template(tokenizer, model=base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(base_model: str, settings: TrainingSettings, *, device_index: int | None = None, sharded: bool = False,
                    weights: bool = True):
    """The frozen base model, in bf16 where supported (fp32 otherwise) or 4-bit NF4 for QLoRA.

    ``sharded``: the model will be split by FSDP. QLoRA then stores its packed 4-bit weights in bf16 tensors,
    which FSDP can shard (bitsandbytes' default uint8 storage cannot be sharded).
    ``weights=False``: the architecture only, on the meta device (no memory); FSDP fills in this process's
    shards from the main process (:func:`training.sharding.shard`). Not for QLoRA, which quantizes real weights.

    Raises:
        LoragError: QLoRA without CUDA, or the model cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    require_cuda_for(settings.method)
    kwargs = {"dtype": torch.bfloat16 if use_bf16(settings.precision) else torch.float32, "attn_implementation": "sdpa"}
    if settings.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16 if sharded else torch.uint8,
        )
        kwargs["dtype"] = torch.bfloat16
        kwargs["device_map"] = {"": device_index or 0}
    try:
        if weights or settings.method == "qlora":
            model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
        else:
            from transformers import AutoConfig

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model), **kwargs)
    except (OSError, ValueError) as error:
        raise LoragError(f"cannot load base model {base_model!r}: {error}") from error
    freeze_base(model, gradient_checkpointing=settings.gradient_checkpointing)
    return model


def freeze_base(model, *, gradient_checkpointing: bool) -> None:
    """Ready a base model for adapter training: no KV cache, every base weight frozen, and optionally
    gradient checkpointing (its inputs made to require grad, which frozen embeddings would not)."""
    model.config.use_cache = False
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Frozen embeddings give checkpointed blocks no input that requires grad; adapters still need one.
        model.enable_input_require_grads()


def compile_layers(model) -> int:
    """``torch.compile`` every decoder layer of ``model`` (plain or peft); returns how many.

    Regional compilation: the layers share one code path, so one graph is compiled and reused, which
    keeps compile time to seconds, and gradient checkpointing still wraps each (compiled) layer. Small
    models spend most of a step launching kernels; fusing the norm, rotary, LoRA and MLP element-wise
    work is what removes that.
    """
    get_base = getattr(model, "get_base_model", None)
    causal_lm = get_base() if callable(get_base) else model
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise LoragError(f"--compile: {type(decoder).__name__} has no .layers to compile", hint="Run without --compile")
    for layer in layers:
        layer.compile()
    return len(layers)


def lora_config(settings: TrainingSettings):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_module_list,
        use_rslora=settings.rslora,
        use_dora=settings.method == "dora",
        bias="none",
    )


def attach_adapter(model, settings: TrainingSettings):
    """Wrap ``model`` in a PeftModel with a fresh adapter (trainable parameters in fp32).

    Raises:
        LoragError: a target module name matches nothing in the model.
    """
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, lora_config(settings))
    except ValueError as error:
        raise LoragError(f"--target-modules {settings.target_modules!r} does not fit the base model: {error}") from error
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("adapter: %s rank %d, %d trainable of %d parameters", settings.method, settings.rank, trainable, total)
    return peft_model


def build_optimizer(parameters, settings: TrainingSettings, *, sharded: bool = False):
    """AdamW; for QLoRA the paged 8-bit AdamW of bitsandbytes (optimizer state pages out under pressure).

    Sharded (FSDP) parameters are DTensors, which bitsandbytes' optimizers do not handle: QLoRA under FSDP
    uses torch's AdamW, whose state is sharded along with the adapter anyway.
    """
    import torch

    parameters = [p for p in parameters if p.requires_grad]
    if settings.method == "qlora" and not sharded:
        import bitsandbytes

        return bitsandbytes.optim.PagedAdamW8bit(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    fused = torch.cuda.is_available() and all(p.is_cuda for p in parameters)
    return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused or None)
