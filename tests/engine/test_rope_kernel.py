"""The rotary-embedding kernel against apply_rope (the torch version transformers computes), on q and k heads
taken as a view out of a fused q/k/v output. On CPU the kernel runs in Triton's interpreter."""

import pytest
import torch

from server.engine.paged_attention import cache_access
from server.engine.rope import apply_rope, inverse_frequencies, rope_kernel, rope_tables

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (14, 2, 64), (8, 8, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_equals_apply_rope(heads, kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(heads * head_dim)
    batch, seq, length = 3, 7, 64
    config = type("Config", (), {"rope_theta": 10000.0, "rope_scaling": None})()
    cos, sin = rope_tables(inverse_frequencies(config, head_dim), length, dtype=dtype, device=DEVICE)
    positions = torch.randint(0, length, (batch, seq), generator=gen).to(DEVICE)
    qkv = torch.randn(batch, seq, heads + 2 * kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    x = qkv[:, :, : heads + kv_heads]  # q and k heads, a view with the fused output's strides
    at_cos, at_sin = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)
    expected = apply_rope(x, at_cos, at_sin)
    got = rope_kernel(x, at_cos, at_sin)
    assert got.shape == expected.shape and got.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    else:  # each product rounded to bf16, then the sum, as the torch ops do: within one bf16 step of them
        torch.testing.assert_close(got, expected, atol=2**-6, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_stores_k_and_v_where_attend_cache_would(dtype):
    """With ``store`` the kernel also writes each token's rotated k heads and its v heads into the paged cache
    slot (block, offset) of the token, padding into the scratch block, exactly as attend_cache's writes do."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_size, num_blocks = 6, 2, 16, 4, 12
    batch, seq = 2, 5
    config = type("Config", (), {"rope_theta": 10000.0, "rope_scaling": None})()
    cos, sin = rope_tables(inverse_frequencies(config, head_dim), 32, dtype=dtype, device=DEVICE)
    positions = torch.tensor([[0, 1, 2, 3, 4], [9, 10, 11, -1, -1]], device=DEVICE)  # row 1: two padding tokens
    tables = torch.tensor([[3, 7, 0, 0], [5, 1, 9, 0]], dtype=torch.int32, device=DEVICE)
    access = cache_access(positions, tables, block_size=block_size, kernel=False, group=3, dtype=dtype)
    qkv = torch.randn(batch, seq, heads + 2 * kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    at = positions.clamp(min=0)
    at_cos, at_sin = cos[at].unsqueeze(2), sin[at].unsqueeze(2)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v = qkv[:, :, heads + kv_heads :]

    expected_k, expected_v = cache[0].clone(), cache[1].clone()
    rotated = apply_rope(qkv[:, :, : heads + kv_heads], at_cos, at_sin)
    expected_k[access.write_block, access.write_offset] = rotated[:, :, heads:]
    expected_v[access.write_block, access.write_offset] = v
    got_k, got_v = cache[0].clone(), cache[1].clone()
    got = rope_kernel(qkv[:, :, : heads + kv_heads], at_cos, at_sin, kv_heads=kv_heads,
                      store=(v, got_k, got_v, access.write_block, access.write_offset))

    close = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2**-6, rtol=2**-7)
    torch.testing.assert_close(got, rotated, **close)
    real = positions >= 0
    blocks, offsets = access.write_block[real], access.write_offset[real]
    torch.testing.assert_close(got_k[blocks, offsets], expected_k[blocks, offsets], **close)
    assert torch.equal(got_v[blocks, offsets], expected_v[blocks, offsets])  # v is copied, not computed
    untouched = torch.ones(num_blocks, block_size, dtype=torch.bool, device=DEVICE)
    untouched[access.write_block.reshape(-1), access.write_offset.reshape(-1)] = False
    assert torch.equal(got_k[untouched], cache[0][untouched]) and torch.equal(got_v[untouched], cache[1][untouched])
