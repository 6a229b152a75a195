"""The paged decode kernel against the torch reference (which gathers each row's blocks), rows of different
lengths over shuffled, shared and partly filled blocks. On CPU the kernel runs in Triton's interpreter."""

import pytest
import torch

from server.engine.paged_attention import attend_cache, cache_access, paged_decode

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (14, 2, 64), (8, 8, 32)],
                         ids=["group2", "group7", "no-group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
@pytest.mark.parametrize("block_n", [32, None], ids=["tile32", "default-tile"])
@pytest.mark.parametrize("splits", [1, 3, None], ids=["one-program-a-row", "3-way-split", "default-split"])
def test_decode_kernel_matches_gathering_reference(heads, kv_heads, head_dim, dtype, block_n, splits):
    gen = torch.Generator().manual_seed(heads + head_dim)
    block_size, num_blocks, max_blocks = 4, 40, 12
    cache_k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    cache_v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    # Row 0: one token (scratch-like); row 1: 3 blocks and a token, shuffled; row 2 shares row 1's first two
    # blocks (a cached prefix), 46 tokens in all (two 32-token tiles); row 3: exactly two full blocks.
    tables = torch.zeros(4, max_blocks, dtype=torch.int32)
    tables[1, :4] = torch.tensor([17, 3, 29, 8])
    tables[2, :2] = tables[1, :2]
    tables[2, 2:12] = torch.tensor([30, 31, 1, 2, 4, 5, 6, 7, 9, 10])
    tables[3, :2] = torch.tensor([11, 12])
    positions = torch.tensor([[0], [12], [45], [7]])
    q = torch.randn(4, 1, heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_new = torch.randn(4, 1, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v_new = torch.randn(4, 1, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)

    def run(kernel):
        ck, cv = cache_k.clone(), cache_v.clone()
        access = cache_access(positions.to(DEVICE), tables.to(DEVICE), block_size=block_size,
                              kernel=kernel, group=heads // kv_heads, dtype=dtype)
        if kernel:  # the kernel path is the one decode steps on CUDA take; here it is forced on any device
            ck[access.write_block, access.write_offset] = k_new
            cv[access.write_block, access.write_offset] = v_new
            return paged_decode(q[:, 0], ck, cv, access.block_tables, access.lengths, block_n=block_n,
                                splits=splits)[:, None], ck
        return attend_cache(q, k_new, v_new, ck, cv, access), ck

    got, got_cache = run(kernel=True)
    expected, expected_cache = run(kernel=False)
    assert torch.equal(got_cache, expected_cache)  # both wrote the new token at the same block and offset
    tolerance = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, expected, **tolerance)


def test_reference_reads_only_the_rows_own_blocks():
    """A row's output depends on its table's blocks only: poisoning every other block changes nothing."""
    gen = torch.Generator().manual_seed(0)
    block_size, kv_heads, head_dim = 4, 2, 8
    cache_k = torch.randn(10, block_size, kv_heads, head_dim, generator=gen)
    cache_v = torch.randn(10, block_size, kv_heads, head_dim, generator=gen)
    tables = torch.tensor([[6, 2, 0]], dtype=torch.int32)
    positions = torch.tensor([[6]])  # 7 tokens: block 6 whole, block 2 up to offset 2
    q, k, v = (torch.randn(1, 1, n, head_dim, generator=gen) for n in (4, kv_heads, kv_heads))
    access = cache_access(positions, tables, block_size=block_size, kernel=False, group=2,
                          dtype=torch.float32)
    clean = attend_cache(q, k, v, cache_k.clone(), cache_v.clone(), access)
    poisoned_k, poisoned_v = cache_k.clone(), cache_v.clone()
    for block in (0, 1, 3, 4, 5, 7, 8, 9):
        poisoned_k[block], poisoned_v[block] = 1e4, -1e4
    poisoned_k[2, 3], poisoned_v[2, 3] = 1e4, -1e4  # past the row's length in its own last block
    torch.testing.assert_close(attend_cache(q, k, v, poisoned_k, poisoned_v, access), clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32])
def test_rows_after_the_same_cached_prefix_attend_as_the_masked_reference(dtype):
    """Prompt rests that all start after 6 cached tokens, padded to 7 tokens (the padding runs past the rows'
    3-block tables), attend, causal aligned to the end and without a mask tensor, exactly as the masked
    gathering reference does at their real tokens."""
    gen = torch.Generator().manual_seed(1)
    block_size, heads, kv_heads, head_dim, cached, seq = 4, 4, 2, 16, 6, 7
    cache_k = torch.randn(12, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    cache_v = torch.randn(12, block_size, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    tables = torch.tensor([[5, 2, 9], [3, 11, 4]], dtype=torch.int32, device=DEVICE)
    lengths = [6, 4]  # rest tokens: positions 6..11 and 6..9, then padding
    positions = torch.tensor([[cached + i if i < n else -1 for i in range(seq)] for n in lengths], device=DEVICE)
    q = torch.randn(2, seq, heads, head_dim, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(2, seq, kv_heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    common = dict(block_size=block_size, kernel=False, group=heads // kv_heads, dtype=dtype)
    after = cache_access(positions, tables, cached=cached, **common)
    reference = cache_access(positions, tables, **common)
    assert after.mode == "after" and reference.mode == "gather"
    out = attend_cache(q, k, v, cache_k.clone(), cache_v.clone(), after)
    expected = attend_cache(q, k, v, cache_k.clone(), cache_v.clone(), reference)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(out[row, :n], expected[row, :n])
