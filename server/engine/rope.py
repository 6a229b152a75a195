"""Rotary position tables from a HF config's rope settings (default and llama3 scaling only)."""

import math

import torch

from core.errors import LoragError

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
    """Rotate ``x`` (batch, seq, heads, head_dim) with cos/sin (batch, seq, 1, head_dim), rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
