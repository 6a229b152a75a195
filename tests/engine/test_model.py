"""The engine's own forward against transformers: logits, chunked cache use, rope settings, refusals."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.engine.kv_cache import PagedKVCache
from server.engine.model import EngineModel
from server.engine.rope import UnsupportedModel, inverse_frequencies


def _engine_model(path):
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    s = hf.config
    cache = PagedKVCache(layers=s.num_hidden_layers, num_blocks=9, block_size=8, kv_heads=s.num_key_value_heads,
                         head_dim=s.hidden_size // s.num_attention_heads, max_len=32, rows=2, dtype=torch.float32,
                         device="cpu")
    return hf, EngineModel.from_hf(hf, cache_len=cache.max_len, dtype=torch.float32, device="cpu"), cache


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_match_transformers_whole_and_in_chunks(arch, request):
    hf, model, cache = _engine_model(request.getfixturevalue(f"tiny_{arch}_path"))
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits[0]
    run = dict(cache=cache, adapters=None, logits_at=None)
    # Blocks out of order and not contiguous: the chunk after the first 10 tokens reads them back through its table.
    one, other = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32), torch.tensor([[1, 8, 3, 0]], dtype=torch.int32)
    whole = model.forward(ids, torch.arange(24)[None], block_tables=other, cached=0, **run)[0]
    first = model.forward(ids[:, :10], torch.arange(10)[None], block_tables=one, cached=0, **run)[0]
    rest = model.forward(ids[:, 10:], torch.arange(10, 24)[None], block_tables=one, **run)[0]
    torch.testing.assert_close(whole, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([first, rest]), expected, rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16384, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(inverse_frequencies(config, 16), expected)


def test_unsupported_rope_type_is_refused():
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096,
                         rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(UnsupportedModel, match="'linear'"):
        inverse_frequencies(config, 16)


def test_other_architecture_is_refused_and_factory_falls_back(tmp_path, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    from server.generation.engine_generator import load_engine_generator
    from server.settings import ServerSettings
    from tests.model_factory import build_tokenizer

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512)).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    settings = ServerSettings(data_dir=tmp_path, generation={"model": str(path), "device": "cpu"})
    with caplog.at_level("WARNING"):
        assert load_engine_generator(settings.generation) is None
    assert "architecture 'gpt2' is not supported" in caplog.text
    assert "falling back to transformers + peft" in caplog.text


def test_head_dim_the_cuda_kernels_cannot_take_is_refused_on_cuda():
    """The rotary and paged-attention kernels tile head_dim as a power of two: a model with head_dim 24 is refused
    for CUDA before any weight moves (the server then serves it with transformers), and accepted on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from server.engine.model import EngineModel

    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    hf = LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModel, match="head_dim 24 is not a power of two"):
        EngineModel.from_hf(hf, cache_len=64, dtype=torch.float32, device="cuda")
    assert EngineModel.from_hf(hf, cache_len=64, dtype=torch.float32, device="cpu").shape.head_dim == 24


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_prompts_give_the_logits_of_the_padded_layout(arch, request):
    """Two prompts of 9 and 16 tokens, padded to 16: run packed (the 25 real tokens only, one flat row) they
    give the padded forward's logits at each prompt's last token, fresh and after 8 cached tokens."""
    from server.engine.model import _one_row

    hf, model, cache = _engine_model(request.getfixturevalue(f"tiny_{arch}_path"))
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    lengths = [9, 16]
    tables = torch.tensor([[5, 2, 7, 0], [1, 8, 3, 0]], dtype=torch.int32)
    for start in (0, 8):  # fresh, then the rest after 8 cached tokens (written by the fresh run)
        tokens = ids[:, start : start + 16].clone()
        positions = torch.stack([torch.arange(start, start + 16)] * 2)
        positions[0, lengths[0]:] = -1
        tokens[0, lengths[0]:] = 0
        pack = torch.cat([torch.arange(lengths[0]), 16 + torch.arange(lengths[1])])
        last = torch.tensor([n - 1 for n in lengths])
        run = dict(cache=cache, block_tables=tables, adapters=None, logits_at=last, cached=start)
        padded = model.forward(tokens, positions, **run)
        packed = model.forward(tokens, positions, pack=pack, **run)
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
        flat_tokens, _, at = _one_row(tokens, positions, last, pack, None)
        assert flat_tokens.shape == (1, 25) and at.tolist() == [8, 24]
