"""Attention over the paged KV cache: each query reads only its own sequence's live keys and values.

Four ways in, chosen per forward (see :func:`cache_access`):
- fresh prompts (positions 0..n-1): causal attention over the new keys only, no cache read;
- prompts that all continue after the same number of cached tokens (the rest after a shared prefix, the
  next chunk of a long prompt): the rows' first cached + new positions gathered, then causal attention
  aligned to the end (flash-capable: no mask tensor);
- decode steps on CUDA: a Triton kernel that walks each row's block table up to the row's length
  (one program per (row, kv head); the query heads sharing a kv head read its keys once);
- everything else (rows continuing from different positions, CPU decode): the torch reference, which
  gathers the rows' blocks into contiguous keys and runs SDPA with a mask. It is also the test oracle.
A forward that carries prompts and decode rows together (see :func:`mixed_access`) attends each part its
own way: the tokens share every GEMM of the layer, only attention is per part.

benchmarks/paged_attention_bench.py times the kernel against the gathering reference and against what the
contiguous cache did (SDPA over every row's whole allocation), and against PyTorch's FlexAttention and varlen
attention.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from server.engine.lora_triton import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr, part_ptr, lse_ptr, stride_qb,
                             stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh, scale,
                             GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                             BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(len_ptr + row)
        # This program's share of the row: whole tiles, so only the row's last tile is partial.
        share = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        first = split * share
        last = tl.minimum(first + share, length)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        g_mask = g < GROUP
        heads = kv_head * GROUP + g
        q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)
        m_i = tl.zeros([G_PAD], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([G_PAD], dtype=tl.float32)
        acc = tl.zeros([G_PAD, D], dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634  # exp2 below
        for start in range(first, last, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            t_mask = t < last
            block = tl.load(table_ptr + row * stride_tb + t // BS, mask=t_mask, other=0).to(tl.int64)
            offset = block * stride_kb + (t % BS) * stride_kt + kv_head * stride_kh
            k = tl.load(k_ptr + offset[:, None] + d[None, :], mask=t_mask[:, None], other=0.0)
            v = tl.load(v_ptr + offset[:, None] + d[None, :], mask=t_mask[:, None], other=0.0)
            if IEEE:  # float32 caches: exact products, as the torch reference computes them
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (G_PAD, BLOCK_N)
            else:
                s = tl.dot(q, tl.trans(k)).to(tl.float32) * qk_scale
            s = tl.where(t_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        else:
            # Partial result (normalised over this share) and its log2-sum-exp2; an empty share (past the
            # row's length) writes zeros and -inf, which the combine weighs zero.
            empty = l_i == 0
            out = acc / tl.where(empty, 1.0, l_i)[:, None]
            lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
            at = (row * GROUP * tl.num_programs(1) + heads) * SPLITS + split  # (rows, heads, SPLITS) layout
            tl.store(part_ptr + at[:, None] * D + d[None, :], out, mask=g_mask[:, None])
            tl.store(lse_ptr + at, lse, mask=g_mask)

    @triton.jit
    def _combine_splits_kernel(part_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, HEADS: tl.constexpr,
                               D: tl.constexpr, SPLITS: tl.constexpr, S_PAD: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        j = tl.arange(0, S_PAD)
        j_mask = j < SPLITS
        d = tl.arange(0, D)
        at = (row * HEADS + head) * SPLITS
        lse = tl.load(lse_ptr + at + j, mask=j_mask, other=float("-inf"))
        weight = tl.math.exp2(lse - tl.max(lse, 0))
        parts = tl.load(part_ptr + (at + j)[:, None] * D + d[None, :], mask=j_mask[:, None], other=0.0)
        out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
        tl.store(out_ptr + row * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def decode_splits(rows: int, kv_heads: int) -> int:
    """How many programs share each (row, kv head): enough that a small batch still gives the GPU about 256
    programs (one per (row, kv head) leaves a lone row's step on 8 of an H200's 132 multiprocessors), and one
    once there are more than 128 (row, kv head) pairs, where the batch fills the GPU by itself."""
    pairs = rows * kv_heads
    return min(16, triton.next_power_of_2(max(1, 256 // pairs)))


def paged_decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, block_tables: torch.Tensor,
                 lengths: torch.Tensor, *, block_n: int | None = None, num_warps: int | None = None,
                 splits: int | None = None) -> torch.Tensor:
    """One query token per row: q (rows, heads, head_dim) against the first ``lengths[row]`` cached tokens of
    the row's blocks; cache (num_blocks, block_size, kv_heads, head_dim). Returns (rows, heads, head_dim).

    ``splits`` programs share each (row, kv head), each over a contiguous share of the row's tokens, and a
    second kernel weighs their partial results by their softmax sums (flash-decoding); default
    :func:`decode_splits`. ``block_n`` tokens per tile and ``num_warps`` default to what
    benchmarks/paged_attention_bench.py measured fastest at the 8B shape: 64 and 4 from 64 rows up (4.2-4.3
    TB/s); split rows take 32-token tiles so that short rows still spread over their programs.
    """
    rows, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = cache_k.shape
    splits = splits or decode_splits(rows, kv_heads)
    block_n = block_n or (32 if splits > 1 else 64)
    num_warps = num_warps or 4
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    if splits > 1:
        part = torch.empty(rows, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(rows, heads, splits, dtype=torch.float32, device=q.device)
    else:
        part = lse = out  # unused by the single-split kernel
    _paged_decode_kernel[(rows, kv_heads, splits)](
        q, cache_k, cache_v, block_tables, lengths, out, part, lse, q.stride(0), q.stride(1), cache_k.stride(0),
        cache_k.stride(1), cache_k.stride(2), block_tables.stride(0), out.stride(0), out.stride(1), head_dim**-0.5,
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), D=head_dim, BS=block_size, BLOCK_N=block_n,
        SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=num_warps,
    )
    if splits > 1:
        _combine_splits_kernel[(rows, heads)](part, lse, out, out.stride(0), out.stride(1), HEADS=heads, D=head_dim,
                                              SPLITS=splits, S_PAD=triton.next_power_of_2(splits), num_warps=4)
    return out


@torch.library.custom_op("lorag::paged_decode", mutates_args=())
def paged_decode_op(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    return paged_decode(q, cache_k, cache_v, block_tables, lengths)


@paged_decode_op.register_fake
def _(q, cache_k, cache_v, block_tables, lengths):
    return torch.empty_like(q)


@dataclass(frozen=True)
class CacheAccess:
    """Where one forward's new tokens go in the paged cache and how its queries read it.

    ``write_block``/``write_offset`` (batch, seq): the cache position of each new token (padding and idle
    rows: the scratch block). ``mode``: "fresh" (causal over the new tokens), "after" (keys at ``read_slots``
    (batch, cached + seq), causal aligned to the end: ``mask`` is that causal bias), "kernel" (decode kernel
    over ``block_tables``/``lengths``), "gather" (reference: keys at ``read_slots`` (batch, length) under the
    additive ``mask`` (batch, 1, group * seq, length)), "packed" (one flat row of the real tokens of a (batch,
    seq) layout, at its flat indices ``pack``: attention lays them out again and reads as ``parts[0]`` says)
    or "mixed" (one flat row of tokens: first the prompts, read as ``parts[0]`` says, then one token per
    decode row, read as ``parts[1]`` says).
    """

    mode: str
    write_block: torch.Tensor
    write_offset: torch.Tensor
    block_tables: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    read_slots: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    parts: tuple["CacheAccess", ...] | None = None
    pack: torch.Tensor | None = None


def cache_access(positions: torch.Tensor, block_tables: torch.Tensor, *, block_size: int, kernel: bool, group: int,
                 dtype, cached: int | None = None, pack: torch.Tensor | None = None) -> CacheAccess:
    """The :class:`CacheAccess` of tokens at ``positions`` (batch, seq; -1 = padding) of rows whose blocks are
    ``block_tables`` (batch, max_blocks) int32 (idle rows: all scratch, position 0). ``cached``: every row's
    tokens start at this position (that many tokens of the row in the cache already), padding after them; 0:
    prompts from their start, attending to their new keys only (None: positions as they come).
    ``pack``: the forward runs only the tokens at these flat indices of the (batch, seq) layout, as one row."""
    if pack is not None:
        laid_out = cache_access(positions, block_tables, block_size=block_size, kernel=kernel, group=group,
                                dtype=dtype, cached=cached)
        return CacheAccess("packed", laid_out.write_block.reshape(1, -1)[:, pack],
                           laid_out.write_offset.reshape(1, -1)[:, pack], parts=(laid_out,), pack=pack)
    real = positions >= 0
    at = positions.clamp(min=0)
    table = block_tables.long()
    write_block = torch.where(real, table.gather(1, at // block_size), 0)
    write_offset = torch.where(real, at % block_size, 0)
    if cached == 0:
        return CacheAccess("fresh", write_block, write_offset)
    if kernel and positions.shape[1] == 1:
        return CacheAccess("kernel", write_block, write_offset, block_tables=block_tables,
                           lengths=(at[:, 0] + 1).to(torch.int32))
    if cached is not None and positions.shape[1] > 1:
        seq = positions.shape[1]
        t = torch.arange(cached + seq, device=positions.device)
        # A padded row may reach past its table; those keys are seen by padding queries only (query i sees
        # keys up to cached + i), so any block will do there.
        blocks = (t // block_size).clamp(max=table.shape[1] - 1)
        return CacheAccess("after", write_block, write_offset, read_slots=table[:, blocks] * block_size + t % block_size,
                           mask=causal_lower_right(seq, cached + seq))
    length = block_tables.shape[1] * block_size
    t = torch.arange(length, device=positions.device)
    read_slots = table[:, t // block_size] * block_size + t % block_size  # (batch, length)
    # Padding queries see token 0 only, so their (ignored) outputs stay finite.
    visible = (t <= at[..., None]) & (real[..., None] | (t == 0))  # (batch, seq, length)
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
    batch, seq, _ = visible.shape
    mask = bias[:, None, None].expand(batch, 1, group, seq, length).reshape(batch, 1, group * seq, length)
    return CacheAccess("gather", write_block, write_offset, read_slots=read_slots, mask=mask)


def mixed_access(prompt_positions: torch.Tensor, prompt_tables: torch.Tensor, decode_positions: torch.Tensor,
                 decode_tables: torch.Tensor, *, block_size: int, kernel: bool, group: int,
                 dtype, cached: int | None = None, pack: torch.Tensor | None = None) -> CacheAccess:
    """The :class:`CacheAccess` of one flat row of tokens: prompts at ``prompt_positions`` (batch, seq; -1 =
    padding) with their ``prompt_tables``, then one new token per decode row at ``decode_positions`` (rows,)
    with ``decode_tables`` (rows, max_blocks). Each part reads the cache as it would in a forward of its own."""
    common = dict(block_size=block_size, kernel=kernel, group=group, dtype=dtype)
    prompts = cache_access(prompt_positions, prompt_tables, cached=cached, pack=pack, **common)
    decode = cache_access(decode_positions[:, None], decode_tables, **common)
    write_block = torch.cat([prompts.write_block.reshape(1, -1), decode.write_block.reshape(1, -1)], dim=1)
    write_offset = torch.cat([prompts.write_offset.reshape(1, -1), decode.write_offset.reshape(1, -1)], dim=1)
    return CacheAccess("mixed", write_block, write_offset, parts=(prompts, decode))


def attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                 access: CacheAccess, *, stored: bool = False) -> torch.Tensor:
    """Write the new k/v (batch, seq, kv_heads, head_dim) into the cache (unless ``stored``: the rotary kernel
    wrote them), then attend q (batch, seq, heads, head_dim) as ``access`` says. Returns (batch, seq, heads,
    head_dim)."""
    if not stored:
        # Index the whole cache tensor (not a view of it): a compiled graph then scatters in place.
        cache_k[access.write_block, access.write_offset] = k
        cache_v[access.write_block, access.write_offset] = v
    return _read(q, k, v, cache_k, cache_v, access)


def _read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
          access: CacheAccess) -> torch.Tensor:
    """Attention of q over what ``access`` says it sees (the new k/v are in the cache already)."""
    if access.mode == "mixed":
        prompts, decode = access.parts
        batch, seq = prompts.write_block.shape
        split, heads, head_dim = batch * seq, q.shape[2], q.shape[3]

        def prompt_part(t):
            return t[0, :split].reshape(batch, seq, t.shape[2], head_dim)

        def decode_part(t):
            return t[0, split:, None]  # (rows, 1, heads, head_dim)

        out_prompts = _read(prompt_part(q), prompt_part(k), prompt_part(v), cache_k, cache_v, prompts)
        out_decode = _read(decode_part(q), decode_part(k), decode_part(v), cache_k, cache_v, decode)
        return torch.cat([out_prompts.reshape(1, split, heads, head_dim),
                          out_decode.reshape(1, -1, heads, head_dim)], dim=1)
    if access.mode == "packed":
        (laid_out,) = access.parts
        batch, seq = laid_out.write_block.shape

        def lay_out(t):  # (1, n, h, d) -> (batch, seq, h, d), zeros where the layout has padding
            spread = t.new_zeros(batch * seq, t.shape[2], t.shape[3])
            spread[access.pack] = t[0]
            return spread.view(batch, seq, t.shape[2], t.shape[3])

        # Only fresh prompts attend to their new keys directly; the other modes read them back from the cache.
        k, v = (lay_out(k), lay_out(v)) if laid_out.mode == "fresh" else (k, v)
        out = _read(lay_out(q), k, v, cache_k, cache_v, laid_out)
        return out.reshape(batch * seq, q.shape[2], q.shape[3])[access.pack][None]
    if access.mode == "fresh":
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        ).transpose(1, 2)
    if access.mode == "kernel":
        op = paged_decode_op if torch.compiler.is_compiling() else paged_decode
        return op(q[:, 0], cache_k, cache_v, access.block_tables, access.lengths)[:, None]
    kv_heads, head_dim = cache_k.shape[2], cache_k.shape[3]
    if access.mode == "after":
        keys = cache_k.view(-1, kv_heads, head_dim)[access.read_slots]  # (batch, cached + seq, kv_heads, d)
        values = cache_v.view(-1, kv_heads, head_dim)[access.read_slots]
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=access.mask, enable_gqa=True
        ).transpose(1, 2)
    keys = cache_k.view(-1, kv_heads, head_dim)[access.read_slots].transpose(1, 2)  # (batch, kv_heads, length, d)
    values = cache_v.view(-1, kv_heads, head_dim)[access.read_slots].transpose(1, 2)
    return grouped_attention(q, keys, values, access.mask)


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention without repeating keys.

    q (batch, seq, heads, head_dim); keys/values (batch, kv_heads, length, head_dim). The query heads
    that share a kv head are folded into the query-length axis: (batch, kv_heads, group * seq, head_dim).
    Returns (batch, seq, heads, head_dim).
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    q = q.transpose(1, 2).reshape(batch, kv_heads, group * seq, head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.reshape(batch, heads, seq, head_dim).transpose(1, 2)
