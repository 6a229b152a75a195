"""Rotary position tables from a HF config's rope settings (default and llama3 scaling only), and the rotation
itself: torch ops (CPU, compiled steps, reference) or one Triton kernel (CUDA)."""

import math

import torch

from core.errors import LoragError
from server.engine.lora_triton import triton

SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedModel(LoragError):
    """The engine cannot run this model; the server falls back to transformers + peft."""


def rope_parameters(config) -> dict:
    """The rope settings of ``config`` as one dict (transformers 5 ``rope_parameters`` or older fields)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def inverse_frequencies(config, head_dim: int) -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, as transformers computes them.

    Raises:
        UnsupportedModel: a rope type other than default/llama3, or partial rotary dimensions.
    """
    params = rope_parameters(config)
    rope_type = params.get("rope_type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(
            f"rope_scaling type {rope_type!r} of {getattr(config, 'name_or_path', 'the model')} is not supported "
            f"by the engine (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported by the engine")
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, length: int, *, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, head_dim), computed in float32 then cast like transformers does."""
    positions = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())  # (length, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, seq, heads, head_dim) with cos/sin (batch, seq, 1, head_dim), rotate-half layout.

    As transformers computes it; also the CPU path, the compiled decode step's (which fuses it) and the
    kernel's test oracle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_ptr, offset_ptr,
                     stride_xt, stride_xh, stride_ct, stride_ot, stride_oh, stride_vt, stride_vh, stride_cb,
                     stride_cs, stride_ch, HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr,
                     Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, KV_PAD: tl.constexpr, STORE: tl.constexpr):
        t = tl.program_id(0)
        h = tl.arange(0, H_PAD)
        d = tl.arange(0, HALF)
        mask = (h < HEADS)[:, None]
        at = t * stride_xt + h[:, None] * stride_xh + d[None, :]
        x1 = tl.load(x_ptr + at, mask=mask, other=0.0)
        x2 = tl.load(x_ptr + at + HALF, mask=mask, other=0.0)
        c1 = tl.load(cos_ptr + t * stride_ct + d)[None, :].to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_ct + HALF + d)[None, :].to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_ct + d)[None, :].to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_ct + HALF + d)[None, :].to(tl.float32)
        dtype = x1.dtype
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        # Rounded as apply_rope rounds: each product to x's dtype, then their sum (within one bf16 step of it).
        out1 = ((a1 * c1).to(dtype).to(tl.float32) + (-a2 * s1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((a2 * c2).to(dtype).to(tl.float32) + (a1 * s2).to(dtype).to(tl.float32)).to(dtype)
        to = t * stride_ot + h[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + to, out1, mask=mask)
        tl.store(out_ptr + to + HALF, out2, mask=mask)
        if STORE:  # the token's rotated k heads and its v heads into its cache slot (padding: the scratch block)
            slot = tl.load(block_ptr + t).to(tl.int64) * stride_cb + tl.load(offset_ptr + t).to(tl.int64) * stride_cs
            k_mask = mask & (h >= Q_HEADS)[:, None]
            k_at = slot + (h - Q_HEADS)[:, None] * stride_ch + d[None, :]
            tl.store(k_cache_ptr + k_at, out1, mask=k_mask)
            tl.store(k_cache_ptr + k_at + HALF, out2, mask=k_mask)
            j = tl.arange(0, KV_PAD)
            e = tl.arange(0, 2 * HALF)
            v_mask = (j < KV_HEADS)[:, None]
            v = tl.load(v_ptr + t * stride_vt + j[:, None] * stride_vh + e[None, :], mask=v_mask, other=0.0)
            tl.store(v_cache_ptr + slot + j[:, None] * stride_ch + e[None, :], v, mask=v_mask)


def rope_kernel(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, kv_heads: int = 0,
                store: tuple | None = None) -> torch.Tensor:
    """:func:`apply_rope` in one pass (a program per token, every head): the torch version's negation,
    concatenation, two broadcast products and sum are five passes over q and k, about 9% of a prompt
    forward at the 8B shape (benchmarks/RESULTS.md). ``x`` may be a view across heads (q and k out of the
    fused q/k/v output); returns a new contiguous (batch, seq, heads, head_dim) tensor.

    ``store`` = (v, cache_k, cache_v, write_block, write_offset): the same pass also writes each token's
    rotated k heads (the last ``kv_heads`` of x) and its v heads (v: (batch, seq, kv_heads, head_dim)) into
    the paged cache at (write_block, write_offset) (batch, seq), as attend_cache would write them.
    """
    batch, seq, heads, head_dim = x.shape
    tokens = batch * seq
    if x.stride(3) != 1 or x.stride(0) != seq * x.stride(1):  # tokens must be evenly spaced, head_dim dense
        x = x.contiguous()
    cos, sin = cos.reshape(tokens, head_dim).contiguous(), sin.reshape(tokens, head_dim).contiguous()
    out = torch.empty(batch, seq, heads, head_dim, dtype=x.dtype, device=x.device)
    if store is not None:
        if not 0 < kv_heads < heads:
            raise ValueError(f"rope_kernel(store=...): kv_heads {kv_heads} must be among x's {heads} heads")
        v, cache_k, cache_v, write_block, write_offset = store
        if v.stride(3) != 1 or v.stride(0) != seq * v.stride(1):
            v = v.contiguous()
        write_block, write_offset = write_block.reshape(-1).contiguous(), write_offset.reshape(-1).contiguous()
        cache_strides = (cache_k.stride(0), cache_k.stride(1), cache_k.stride(2))
        v_strides = (v.stride(1), v.stride(2))
    else:
        v = cache_k = cache_v = write_block = write_offset = out  # unused pointers
        cache_strides, v_strides, kv_heads = (0, 0, 0), (0, 0), max(kv_heads, 1)
    _rope_kernel[(tokens,)](x, cos, sin, out, v, cache_k, cache_v, write_block, write_offset, x.stride(1),
                            x.stride(2), cos.stride(0), heads * head_dim, head_dim, *v_strides, *cache_strides,
                            HEADS=heads, H_PAD=triton.next_power_of_2(heads), HALF=head_dim // 2,
                            Q_HEADS=heads - kv_heads, KV_HEADS=kv_heads, KV_PAD=triton.next_power_of_2(kv_heads),
                            STORE=store is not None, num_warps=4)
    return out
