"""Llama / Qwen2 forward pass over the engine's KV cache, with per-row LoRA from adapter slots.

Qwen2 is Llama with biases on q/k/v. Weights come from a transformers model loaded with
``from_pretrained``; q/k/v and gate/up are fused into one matrix each (fewer kernels per step).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.engine.kv_cache import PagedKVCache
from server.engine.lora_ops import expand_, expand_add, kernels_available, shrink, silu_mul_lora
from server.engine.lora_slots import GROUPS, AdapterSlots
from server.engine.lora_triton import lora_shrink_expand_, silu_mul
from server.engine.paged_attention import CacheAccess, attend_cache, cache_access, mixed_access
from server.engine.rope import UnsupportedModel, apply_rope, inverse_frequencies, rope_kernel, rope_tables
from server.engine.segments import Segments

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rms_eps: float
    max_positions: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def lora_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every module an adapter may target."""
        return {
            "q_proj": (self.hidden, self.q_dim), "k_proj": (self.hidden, self.kv_dim),
            "v_proj": (self.hidden, self.kv_dim), "o_proj": (self.q_dim, self.hidden),
            "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }


@dataclass(frozen=True)
class DecodeRows:
    """Decode rows that ride along a prompt forward (chunked prefill mixed into decoding): one new token per
    row, after the prompts' tokens. Their GEMMs share the prompts' (nearly free: a prompt forward is
    compute-bound, a decode step reads every weight for a few rows); only attention is their own."""

    tokens: torch.Tensor  # (rows,) long
    positions: torch.Tensor  # (rows,) long
    block_tables: torch.Tensor  # (rows, max_blocks) int32


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # (q_dim + 2 * kv_dim, hidden)
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # (2 * intermediate, hidden)
    down: torch.Tensor
    # group -> (base weight with the adapters' A stacked under it, bias padded to match); see stack_adapters
    stacked: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


def check_supported(config) -> None:
    """Raise UnsupportedModel unless the engine can run ``config`` exactly as transformers would."""
    model_type = getattr(config, "model_type", None)
    name = getattr(config, "name_or_path", "") or "the model"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"{name}: architecture {model_type!r} is not supported by the engine "
                               f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModel(f"{name}: mlp_bias=True is not supported by the engine")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"{name}: hidden_act {config.hidden_act!r} is not supported by the engine (needs silu)")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UnsupportedModel(f"{name}: sliding-window attention is not supported by the engine")


class EngineModel:
    """The decoder: ``forward`` runs any number of new tokens for a contiguous range of cache rows."""

    def __init__(self, shape: ModelShape, *, embed, layers: list[LayerWeights], norm, lm_head, inv_freq,
                 cache_len: int, dtype, device):
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head
        self.cos, self.sin = rope_tables(inv_freq, cache_len, dtype=dtype, device=device)
        self._compiled_layer = None  # see compile_decode

    @classmethod
    def from_hf(cls, hf_model, *, cache_len: int, dtype, device) -> "EngineModel":
        """Take the weights of a transformers Llama/Qwen2 causal LM.

        Raises:
            UnsupportedModel: another architecture or an unsupported rope/bias/activation setting.
        """
        config = hf_model.config
        check_supported(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = ModelShape(
            vocab_size=config.vocab_size, hidden=config.hidden_size, layers=config.num_hidden_layers,
            heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=head_dim,
            intermediate=config.intermediate_size, rms_eps=config.rms_norm_eps,
            max_positions=config.max_position_embeddings,
        )
        if torch.device(device).type == "cuda" and head_dim & (head_dim - 1):
            raise UnsupportedModel(f"{config.name_or_path}: head_dim {head_dim} is not a power of two, which the "
                                   f"engine's CUDA kernels (rotary, paged attention) need")
        inv_freq = inverse_frequencies(config, head_dim)

        def take(t):
            return None if t is None else t.detach().to(device=device, dtype=dtype).contiguous()

        layers = []
        for block in hf_model.model.layers:
            attn, mlp = block.self_attn, block.mlp
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            if attn.o_proj.bias is not None:
                raise UnsupportedModel(f"{config.name_or_path}: a bias on o_proj is not supported by the engine")
            layers.append(LayerWeights(
                input_norm=take(block.input_layernorm.weight),
                qkv=take(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
                qkv_bias=None if biases[0] is None else take(torch.cat(biases)),
                o=take(attn.o_proj.weight),
                post_norm=take(block.post_attention_layernorm.weight),
                gate_up=take(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                down=take(mlp.down_proj.weight),
            ))
        embed = take(hf_model.model.embed_tokens.weight)
        head = hf_model.lm_head.weight
        lm_head = embed if head.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr() else take(head)
        return cls(shape, embed=embed, layers=layers, norm=take(hf_model.model.norm.weight), lm_head=lm_head,
                   inv_freq=inv_freq, cache_len=cache_len, dtype=dtype, device=device)

    def stack_adapters(self, adapters: AdapterSlots) -> None:
        """Stack every group's adapter A under its base weight, so a mixed batch gets base output and all
        slots' shrink from one GEMM; the base weight and the slots' A become views of the stack."""
        for i, w in enumerate(self.layers):
            for group in ("qkv", "o", "gate_up", "down"):
                base = getattr(w, group)
                a = adapters.shrink_weight(i, group)
                stacked = torch.cat([base, a])
                bias = None
                if group == "qkv" and w.qkv_bias is not None:
                    bias = torch.cat([w.qkv_bias, w.qkv_bias.new_zeros(a.shape[0])])
                setattr(w, group, stacked[: base.shape[0]])
                adapters.share_shrink_weight(i, group, stacked[base.shape[0] :])
                w.stacked[group] = (stacked, bias)

    def compile_decode(self) -> None:
        """Run decode steps' layers through torch.compile (fused elementwise work, fewer kernels per step).

        One compiled graph serves every layer: the layer gets its weights, cache and adapter tensors as
        arguments, never a layer number. Shapes are static, so each (batch, adapters on/off) pair compiles
        once, on its first call; adapter loads copy into the slot tensors, which stay graph inputs.
        """
        import torch._dynamo

        config = torch._dynamo.config
        # Dynamo counts compiles per code object, across engines of the process; the default limit (8)
        # would silently send later batch sizes back to eager.
        config.recompile_limit = max(config.recompile_limit, 256)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
        self._compiled_layer = torch.compile(decoder_layer, dynamic=False)
        # A step of a few rows reads every weight for a few tokens. Inductor's coordinate-descent tuning turns
        # its matrix-vector products into reductions fused with the norms and adds around them, which read
        # the weights faster than the library's GEMV (one request at the 8B shape on an H200: 179 -> 211
        # tok/s, benchmarks/engine_paged_bench.py). Its longer compile is spent on those buckets only.
        self._compiled_small = torch.compile(_few_rows_layer, dynamic=False,
                                             options={"coordinate_descent_tuning": True})

    @property
    def compiled(self) -> bool:
        return self._compiled_layer is not None

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        *,
        cache: PagedKVCache,
        block_tables: torch.Tensor,
        adapters: AdapterSlots | None,
        segments: Segments | None = None,
        logits_at: int | torch.Tensor | None = -1,
        cached: int | None = None,
        compiled: bool = False,
        decode: DecodeRows | None = None,
        pack: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for ``tokens`` (batch, seq) at ``positions`` (batch, seq; -1 = padding) of the sequences
        whose cache blocks are ``block_tables`` (batch, max_blocks) int32.

        Keys/values of the new tokens are written to their blocks first; each token attends to its
        sequence's positions <= its own. ``cached`` says every row's tokens start at that position (padding
        after them): 0, prompts' starts, attend to the new keys only (causal, no cache read); more, to the
        rows' first cached + seq positions, causal aligned to the end (no mask tensor). None: positions as
        they come (decode steps; the masked gathering reference for rows continuing from different places).
        ``segments`` groups the flattened (batch * seq) tokens by adapter slot (None: base model only).
        ``compiled`` runs the layers through the compiled layer (see compile_decode; meant for decode
        steps, whose shapes repeat). Returns float32 (batch, vocab) for token index ``logits_at`` (an
        int, or a (batch,) tensor with one index per row), or (batch, seq, vocab) when it is None.

        ``pack`` (the flat indices of the real tokens of the (batch, seq) layout, ascending) runs only those
        tokens, as one flat row: no GEMM, LoRA or norm works on padding; attention lays them out again.
        ``decode`` adds decode rows to the forward: the prompts and their tokens then run as one flat row
        too, followed by one token per decode row. Either way ``segments`` is laid out as that row (see
        segments.segment_mixed), and the logits are the prompts' rows followed by one row per decode row:
        (batch + rows, vocab).
        """
        s = self.shape
        kernel = kernels_available(self.embed)
        common = dict(block_size=cache.block_size, kernel=kernel, group=s.heads // s.kv_heads, dtype=self.dtype)
        if decode is None:
            access = cache_access(positions, block_tables, cached=cached, pack=pack, **common)
        else:
            access = mixed_access(positions, block_tables, decode.positions, decode.block_tables, cached=cached,
                                  pack=pack, **common)
        if pack is not None or decode is not None:
            tokens, positions, logits_at = _one_row(tokens, positions, logits_at, pack, decode)
        batch, seq = tokens.shape
        x = F.embedding(tokens, self.embed)  # (batch, seq, hidden)
        at = positions.clamp(min=0)
        cos, sin = self.cos[at].unsqueeze(2), self.sin[at].unsqueeze(2)  # (batch, seq, 1, head_dim)
        layer = decoder_layer
        if compiled:
            if self._compiled_layer is None:
                raise RuntimeError("forward(compiled=True) needs compile_decode() first")
            layer = self._compiled_small if batch * seq <= FEW_ROWS else self._compiled_layer
        on = adapters is not None and segments is not None
        # Decode steps take every slot's shrink from the stacked base GEMM (one GEMM, nothing to gather);
        # longer inputs run the segmented shrink, whose cost follows the tokens' own slots only.
        stacked = on and seq == 1 and all(self.layers[0].stacked.get(g) for g in GROUPS)
        out_offsets = {g: list(adapters.out_offsets(g)) for g in GROUPS} if on else {}
        for i, w in enumerate(self.layers):
            lora = None
            if on:
                lora = LayerLoRA(
                    meta=segments.meta, blocks=segments.blocks, block_m=segments.block_m, rank=adapters.max_rank,
                    stacked=stacked, shrink={g: adapters.shrink_weight(i, g) for g in GROUPS},
                    expand={g: adapters.expand_weight(i, g) for g in GROUPS}, out_offsets=out_offsets)
            x = layer(x, w, lora, shape=s, cos=cos, sin=sin, access=access, cache_k=cache.k[i], cache_v=cache.v[i])
        if isinstance(logits_at, torch.Tensor):
            x = x[torch.arange(batch, device=x.device), logits_at]
        elif logits_at is not None:
            x = x[:, logits_at]
        return F.linear(_rms_norm(x, self.norm, s.rms_eps), self.lm_head).float()


def _one_row(tokens: torch.Tensor, positions: torch.Tensor, logits_at, pack: torch.Tensor | None,
             decode: DecodeRows | None):
    """The prompts' (batch, seq) tokens and positions as one flat row (only those at ``pack`` when given), then
    the decode rows' tokens; ``logits_at`` (per prompt row) as indices into that row, then each decode row's."""
    if logits_at is None:
        raise ValueError("a packed or mixed forward returns logits at chosen tokens only: give logits_at")
    prompts, width = tokens.shape
    at = torch.arange(prompts, device=tokens.device) * width + (logits_at % width)
    tokens, positions = tokens.reshape(-1), positions.reshape(-1)
    if pack is not None:  # the packed index of that token (of the row's last real token, if it is padding)
        at = torch.searchsorted(pack, at, right=True) - 1
        tokens, positions = tokens[pack], positions[pack]
    if decode is not None:
        at = torch.cat([at, len(tokens) + torch.arange(len(decode.tokens), device=tokens.device)])
        tokens, positions = torch.cat([tokens, decode.tokens]), torch.cat([positions, decode.positions])
    return tokens[None], positions[None], at


@dataclass(frozen=True)
class LayerLoRA:
    """One layer's adapters as plain tensors and ints (a compiled layer must see no layer number).

    ``meta``/``blocks``/``block_m`` are a :class:`Segments` plan over the layer's (tokens, features)
    rows; ``stacked`` says every slot's shrink comes out of the stacked base GEMM (decode steps).
    """

    meta: torch.Tensor
    blocks: int
    block_m: int
    rank: int
    stacked: bool
    shrink: dict[str, torch.Tensor]  # group -> A (slots * modules * r_max, in)
    expand: dict[str, torch.Tensor]  # group -> B (slots * modules * r_max, out), block-diagonal, scaled
    out_offsets: dict[str, list[int]]

    @property
    def segments(self) -> Segments:
        return Segments(meta=self.meta, blocks=self.blocks, block_m=self.block_m)

    def width(self, group: str) -> int:
        return len(GROUPS[group]) * self.rank


def _lora_inputs(group: str, x: torch.Tensor, w: LayerWeights, lora: LayerLoRA):
    """The group's base output and each token's h = x @ A_slot^T: (y, h, h_col0, h_slot_stride, out).

    Decode steps take every slot's h from the stacked GEMM (y's columns past ``out``, slot by slot);
    prompts run the segmented shrink, whose cost follows the tokens' own slots only.
    """
    weight = getattr(w, group)
    out = weight.shape[0]
    if lora.stacked:
        stacked, stacked_bias = w.stacked[group]
        y = F.linear(x, stacked, stacked_bias)  # (tokens, out + slots * width): base output, then every slot's h
        return y, y, out, lora.width(group), out
    y = F.linear(x, weight, w.qkv_bias if group == "qkv" else None)
    return y, shrink(x, lora.shrink[group], lora.segments, width=lora.width(group)), 0, 0, out


def _fused_prompt_lora(group: str, x: torch.Tensor, w: LayerWeights, lora: LayerLoRA,
                       residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """Prompts on CUDA: the base output with each token's LoRA added by one kernel that does the shrink
    and the expand (plus ``residual`` when given). None where that kernel does not run: decode steps (h
    comes from the stacked GEMM), compiled steps (the custom ops are the way in) and the CPU."""
    if lora.stacked or not kernels_available(x) or torch.compiler.is_compiling():
        return None
    y = F.linear(x, getattr(w, group), w.qkv_bias if group == "qkv" else None)
    return lora_shrink_expand_(x, lora.shrink[group], y, lora.expand[group], lora.segments, rank=lora.rank,
                               width=lora.width(group), out_offsets=tuple(lora.out_offsets[group]),
                               residual=residual)


def _project(group: str, x: torch.Tensor, w: LayerWeights, lora: LayerLoRA | None) -> torch.Tensor:
    """The group's linear (base + LoRA of each token's slot) on x (tokens, in)."""
    if lora is None:
        return F.linear(x, getattr(w, group), w.qkv_bias if group == "qkv" else None)
    fused = _fused_prompt_lora(group, x, w, lora)
    if fused is not None:
        return fused
    y, h, h_col0, h_slot_stride, out = _lora_inputs(group, x, w, lora)
    expand_(y, h, lora.expand[group], lora.segments, rank=lora.rank, width=lora.width(group),
            out_offsets=tuple(lora.out_offsets[group]), h_col0=h_col0, h_slot_stride=h_slot_stride)
    return y[:, :out]


def _project_add(group: str, x: torch.Tensor, residual: torch.Tensor, w: LayerWeights,
                 lora: LayerLoRA | None) -> torch.Tensor:
    """residual + the group's linear on x, the LoRA added in the same pass (o and down: one module each)."""
    if lora is None:
        return residual + F.linear(x, getattr(w, group))
    fused = _fused_prompt_lora(group, x, w, lora, residual=residual)
    if fused is not None:
        return fused
    y, h, h_col0, h_slot_stride, _ = _lora_inputs(group, x, w, lora)
    return expand_add(residual, y, h, lora.expand[group], lora.segments, rank=lora.rank, width=lora.width(group),
                      h_col0=h_col0, h_slot_stride=h_slot_stride)


def _mlp_activation(x: torch.Tensor, w: LayerWeights, lora: LayerLoRA | None, *, intermediate: int) -> torch.Tensor:
    """silu(gate) * up of x (tokens, hidden), LoRA included, in one kernel over the gate/up output.

    Without adapters, a compiled step (which fuses this itself) and the CPU use the plain ops.
    """
    if lora is None:
        if kernels_available(x) and not torch.compiler.is_compiling():
            return silu_mul(F.linear(x, w.gate_up))
        gate, up = F.linear(x, w.gate_up).split([intermediate, intermediate], dim=-1)
        return F.silu(gate) * up
    y, h, h_col0, h_slot_stride, _ = _lora_inputs("gate_up", x, w, lora)
    return silu_mul_lora(y, h, lora.expand["gate_up"], lora.segments, rank=lora.rank, intermediate=intermediate,
                         h_col0=h_col0, h_slot_stride=h_slot_stride)


def decoder_layer(x: torch.Tensor, w: LayerWeights, lora: LayerLoRA | None, *, shape: ModelShape,
                  cos, sin, access: CacheAccess, cache_k, cache_v) -> torch.Tensor:
    """One decoder block on x (batch, seq, hidden); writes the new keys/values into this layer's paged
    cache_k/cache_v where ``access`` says and attends as it says.

    Everything it touches comes in as arguments, so torch.compile builds one graph for all layers.
    """
    s = shape
    batch, seq = x.shape[0], x.shape[1]
    h = _rms_norm(x, w.input_norm, s.rms_eps).view(batch * seq, s.hidden)
    qkv = _project("qkv", h, w, lora).view(batch, seq, s.heads + 2 * s.kv_heads, s.head_dim)
    v = qkv[:, :, s.heads + s.kv_heads :]
    stored = kernels_available(x) and not torch.compiler.is_compiling()
    if stored:  # one kernel rotates q and k and writes k and v into the cache
        qk = rope_kernel(qkv[:, :, : s.heads + s.kv_heads], cos, sin, kv_heads=s.kv_heads,
                         store=(v, cache_k, cache_v, access.write_block, access.write_offset))
    else:
        qk = apply_rope(qkv[:, :, : s.heads + s.kv_heads], cos, sin)  # q and k heads in one pass
    q, k = qk[:, :, : s.heads], qk[:, :, s.heads :]
    attn = attend_cache(q, k, v, cache_k, cache_v, access, stored=stored).reshape(batch * seq, s.q_dim)
    x = _project_add("o", attn, x.view(batch * seq, s.hidden), w, lora).view(batch, seq, s.hidden)
    h = _rms_norm(x, w.post_norm, s.rms_eps).view(batch * seq, s.hidden)
    act = _mlp_activation(h, w, lora, intermediate=s.intermediate)
    return _project_add("down", act, x.view(batch * seq, s.hidden), w, lora).view(batch, seq, s.hidden)


FEW_ROWS = 8  # compiled decode steps of up to this many rows use the tuned layer (see compile_decode)


def _few_rows_layer(*args, **kwargs) -> torch.Tensor:
    """decoder_layer under its own code object, so its tuned compile has a cache of its own."""
    return decoder_layer(*args, **kwargs)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda:  # one fused kernel; rounds once where transformers rounds twice (bf16 output either way)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # In float32 then back, exactly as transformers' Llama/Qwen2 RMSNorm does.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
