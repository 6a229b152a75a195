"""Builds small random-init causal LMs of real architectures, with an offline tokenizer and chat template.

Everything is written with ``save_pretrained`` so code under test loads it through the same
``from_pretrained(path)`` call that users hit with hub models. Also used by benchmarks to make
real-size shapes (e.g. Qwen2.5-0.5B) without downloading weights.
"""

from pathlib import Path

# ChatML, as Qwen2 instruct models use it, so the prompt format under test is a real one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_TRAINING_TEXT = """\
lorag answers questions from an organisation's own documents and cites the passages it used.
The warranty covers manufacturing defects for two years from the date of purchase.
Refunds are issued within fourteen days when the product is returned unused.
The quarterly report shows revenue growth of twelve percent and stable operating margins.
Passages are numbered [1] [2] [3] and answers cite them. The documents do not contain the answer.
user assistant system question answer context source page
""" + " ".join(str(n) for n in range(200))


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a fixed text: deterministic and offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(
    path: Path,
    *,
    architecture: str = "llama",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_positions: int = 4096,
    seed: int = 0,
    dtype=None,
    tokenizer=None,
) -> Path:
    """Save a random-init ``architecture`` ("llama" or "qwen2") model and its tokenizer to ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    tokenizer = tokenizer or build_tokenizer()
    vocab_size = vocab_size or len(tokenizer)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[architecture]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False
    )
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def copy_without_chat_template(model_path: Path, dest: Path) -> Path:
    """A copy of the model directory whose tokenizer has no chat template (a base model, not an instruct one)."""
    import json
    import shutil

    shutil.copytree(model_path, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return dest


# Real model shapes for GPU benchmarks (weights random; speed and memory depend only on shapes).
QWEN25_05B = dict(
    architecture="qwen2", hidden_size=896, layers=24, heads=14, kv_heads=2,
    intermediate_size=4864, vocab_size=151936, max_positions=32768,
)
LLAMA3_8B = dict(
    architecture="llama", hidden_size=4096, layers=32, heads=32, kv_heads=8,
    intermediate_size=14336, vocab_size=128256, max_positions=8192,
)
