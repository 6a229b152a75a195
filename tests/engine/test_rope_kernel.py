"""The rotary-embedding kernel against apply_rope (the torch version transformers computes), on q and k heads
taken as a view out of a fused q/k/v output. On CPU the kernel runs in Triton's interpreter."""

import pytest
import torch

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
    elif DEVICE == "cuda":  # each product rounded to bf16, then the sum: the torch ops' values exactly
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    else:  # Triton's CPU interpreter converts to bf16 by its own rounding: within one bf16 step
        torch.testing.assert_close(got, expected, atol=2**-6, rtol=2**-7)
