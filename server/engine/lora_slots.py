"""Resident LoRA adapters in preallocated device slots, loaded and freed without recompiling.

Per layer, modules that read the same input form a group (q/k/v, o, gate/up, down). A group keeps
A as (slots * modules * r_max, in), laid out like a linear weight so the model can stack it under
the group's base weight (one GEMM yields base output and every slot's shrink), and B as
(slots * modules * r_max, out_total), block-diagonal over the modules and pre-multiplied by the
adapter's scaling. The model applies them per token slot with server/engine/lora_ops.py; a load
copies into these tensors in place, so captured graphs and compiled steps keep pointing at them.
"""

import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import Conflict, LoragError, NotFound
from adapters.peft_files import read_peft_files
from adapters.safetensors_flat import FlatTensors, NonFiniteWeights

log = logging.getLogger(__name__)

# group name -> the peft module names in it, in output order
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {module: group for group, modules in GROUPS.items() for module in modules}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


class UnsupportedAdapter(LoragError):
    """The adapter is valid for peft but not for the engine's fast path (the server falls back)."""


@dataclass
class _Group:
    a: torch.Tensor  # (slots * modules * r_max, in); may become a view into the model's stacked weight
    b: torch.Tensor  # (slots * modules * r_max, out_total), block-diagonal over the modules
    out_offsets: tuple[int, ...]  # column where each module's output starts in b


class AdapterSlots:
    """``num_slots`` resident adapters (slot numbers 1..num_slots; 0 = no adapter).

    ``load(name, path)`` copies a peft adapter dir into a free slot (``load_weights`` one already in
    memory); ``unload(name)`` frees it.
    Requests ``acquire`` a slot by adapter name and ``release`` it when done; an adapter in use
    cannot be unloaded or reloaded.
    """

    def __init__(self, *, layers: int, dims: dict[str, tuple[int, int]], num_slots: int, max_rank: int, dtype, device):
        if num_slots < 1 or max_rank < 1:
            raise LoragError(f"adapter slots need num_slots >= 1 and max_rank >= 1, got {num_slots} and {max_rank}")
        self.layers, self.dims = layers, dims
        self.num_slots, self.max_rank = num_slots, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self._groups: list[dict[str, _Group]] = []
        for _ in range(layers):
            by_group = {}
            for group, modules in GROUPS.items():
                in_features = dims[modules[0]][0]
                outs = [dims[m][1] for m in modules]
                width = num_slots * len(modules) * max_rank
                offsets = tuple(sum(outs[:i]) for i in range(len(outs)))
                by_group[group] = _Group(
                    a=torch.zeros(width, in_features, dtype=dtype, device=device),
                    b=torch.zeros(width, sum(outs), dtype=dtype, device=device),
                    out_offsets=offsets,
                )
            self._groups.append(by_group)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a slot's last user releases it
        self._by_name: dict[str, int] = {}
        self._users = [0] * (num_slots + 1)
        self._writes = [0] * (num_slots + 1)  # per slot: weight writes so far (see cache_salt)

    # ---- residency -------------------------------------------------------------------------------
    def resident(self) -> dict[str, int]:
        """Loaded adapter names and their slots."""
        with self._lock:
            return dict(self._by_name)

    def in_use(self, name: str) -> int:
        """How many running requests use adapter ``name`` (0 when not resident)."""
        with self._lock:
            slot = self._by_name.get(name)
            return 0 if slot is None else self._users[slot]

    def load(self, name: str, path: str | Path) -> int:
        """Copy the peft adapter in ``path`` into a slot under ``name``; returns the slot (1-based).

        Reloading a resident, idle name replaces its weights in the same slot.

        Raises:
            LoragError: the dir lacks adapter_config.json / adapter_model.safetensors, holds non-finite
                weights or does not fit the model.
            UnsupportedAdapter: DoRA, modules_to_save, biases, or modules outside q/k/v/o/gate/up/down.
            Conflict: all slots are taken, or ``name`` is resident and in use.
        """
        config, flat = read_peft_files(path, pinned=self.device.type == "cuda")
        return self.load_flat(name, config, flat, source=str(path))

    def load_flat(self, name: str, config: dict, flat: FlatTensors, *, source: str) -> int:
        """Load an adapter held as one safetensors buffer: moved to the device in one copy, checked for
        NaN/infinity there (one reduction per dtype run), then written into a slot.

        Raises as :meth:`load`; NonFiniteWeights (422) for NaN or infinite weights.
        """
        on_device = flat.to(self.device)
        bad = on_device.first_non_finite()
        if bad is not None:
            raise NonFiniteWeights(f"{source}: tensor {bad!r} has non-finite (NaN or infinite) weights")
        weights = peft_weights(config, on_device.views(), source=source, layers=self.layers, dims=self.dims,
                               max_rank=self.max_rank, check_finite=False)
        return self._store(name, weights, source=source)

    def load_weights(self, name: str, config: dict, tensors: dict[str, torch.Tensor], *, source: str = "memory") -> int:
        """Copy an adapter already in memory (its adapter_config.json as a dict and its safetensors
        ``tensors`` under peft's saved key names) into a slot under ``name``; returns the slot (1-based).

        ``source`` names where the adapter came from, in messages. Raises as :meth:`load`.
        """
        weights = peft_weights(config, tensors, source=source, layers=self.layers, dims=self.dims,
                               max_rank=self.max_rank)
        return self._store(name, weights, source=source)

    def _store(self, name: str, weights: dict, *, source: str) -> int:
        with self._lock:
            slot = self._by_name.get(name)
            if slot is not None and self._users[slot]:
                raise Conflict(f"adapter {name!r} is in use by {self._users[slot]} running request(s); reload it later")
            if slot is None:
                taken = set(self._by_name.values())
                free = [s for s in range(1, self.num_slots + 1) if s not in taken]
                if not free:
                    raise Conflict(
                        f"all {self.num_slots} adapter slots are taken ({', '.join(sorted(self._by_name))}); "
                        f"unload one before loading {name!r}"
                    )
                slot = free[0]
            try:
                self._write_slot(slot, weights)
            except BaseException:
                # A reload overwrites in place: the slot now holds neither version, so it must not stay
                # reachable under ``name``. (The next load into it writes or zeroes every row it owns.)
                self._by_name.pop(name, None)
                raise
            self._by_name[name] = slot
        log.info("adapter %s loaded into slot %d from %s", name, slot, source)
        return slot

    def unload(self, name: str, *, wait_s: float = 0.0) -> None:
        """Free the slot of ``name``, waiting up to ``wait_s`` seconds for running requests to release it
        (a cancelled request lets go of its slot at the engine's next step).

        Raises:
            NotFound: ``name`` is not resident.  Conflict: a running request still uses it after ``wait_s``.
        """
        deadline = time.monotonic() + wait_s
        with self._idle:
            while True:
                slot = self._by_name.get(name)
                if slot is None:
                    raise NotFound(f"adapter {name!r} is not loaded")
                remaining = deadline - time.monotonic()
                if not self._users[slot] or remaining <= 0:
                    break
                self._idle.wait(remaining)
            if self._users[slot]:
                raise Conflict(f"adapter {name!r} is in use by {self._users[slot]} running request(s); unload it later")
            del self._by_name[name]
            self._write_slot(slot, {})

    def acquire(self, name: str | None) -> int:
        """The slot of adapter ``name`` (0 for None), counted as used until :meth:`release`.

        Raises:
            NotFound: ``name`` is not resident.
        """
        if name is None:
            return 0
        with self._lock:
            slot = self._by_name.get(name)
            if slot is None:
                raise NotFound(f"adapter {name!r} is not loaded", hint="load it first (resident: "
                               f"{', '.join(sorted(self._by_name)) or 'none'})")
            self._users[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        if slot:
            with self._idle:
                self._users[slot] -= 1
                if not self._users[slot]:
                    self._idle.notify_all()

    # ---- weights for the forward ------------------------------------------------------------------
    def out_offsets(self, group: str) -> tuple[int, ...]:
        """Column where each of ``group``'s modules starts in its expand weight."""
        return self._groups[0][group].out_offsets

    def shrink_weight(self, layer: int, group: str) -> torch.Tensor:
        """A of ``group`` in ``layer``: (slots * modules * r_max, in)."""
        return self._groups[layer][group].a

    def expand_weight(self, layer: int, group: str) -> torch.Tensor:
        """B of ``group`` in ``layer``: (slots * modules * r_max, out_total), block-diagonal, scaled; slot
        loads write into this tensor in place, so a captured or compiled step may hold on to it."""
        return self._groups[layer][group].b

    def share_shrink_weight(self, layer: int, group: str, view: torch.Tensor) -> None:
        """Keep A in ``view`` (same shape and values, e.g. rows of the model's stacked weight) from now on."""
        g = self._groups[layer][group]
        if view.shape != g.a.shape:
            raise ValueError(f"layer {layer} {group}: shrink weight view {tuple(view.shape)} != {tuple(g.a.shape)}")
        view.copy_(g.a)
        g.a = view

    def _write_slot(self, slot: int, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Copy (A (r, in), B (out, r), scaling) per (layer, module) into ``slot``, B transposed and scaled on
        the way (one kernel each when the weights are already on the device); rows an adapter leaves
        unused (a missing module, a rank below r_max) are zeroed. B's blocks off its block diagonal are
        never written, so they stay zero."""
        self._writes[slot] += 1
        for layer, by_group in enumerate(self._groups):
            for group, g in by_group.items():
                modules = GROUPS[group]
                first = (slot - 1) * len(modules) * self.max_rank
                for j, module in enumerate(modules):
                    start = first + j * self.max_rank
                    out = slice(g.out_offsets[j], g.out_offsets[j] + self.dims[module][1])
                    a, b, scaling = weights.get((layer, module), (None, None, 0.0))
                    rank = 0 if a is None else a.shape[0]
                    if rank:
                        g.a[start : start + rank].copy_(a)
                        target = g.b[start : start + rank, out]
                        if b.device == target.device:
                            torch.mul(b.t(), scaling, out=target)  # rounds once, into the slot's dtype
                        else:
                            target.copy_((b.float() * scaling).t())
                    if rank < self.max_rank:
                        g.a[start + rank : start + self.max_rank].zero_()
                        g.b[start + rank : start + self.max_rank, out].zero_()

    def cache_salt(self, slot: int) -> bytes:
        """What a slot's keys/values depend on besides the tokens: its index and how often its weights were
        written. Prefix-cache keys carry it, so a reload never hits blocks computed with the old weights."""
        return b"base" if slot == 0 else f"slot{slot}.{self._writes[slot]}".encode()

    def nbytes(self) -> int:
        return sum(g.a.numel() * g.a.element_size() + g.b.numel() * g.b.element_size()
                   for by_group in self._groups for g in by_group.values())


def peft_weights(
    config: dict, tensors: dict[str, torch.Tensor], *, source: str, layers: int, dims: dict[str, tuple[int, int]],
    max_rank: int, check_finite: bool = True,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """A peft LoRA (config dict, tensors under peft's saved names) as {(layer, module): (A (r, in), B (out, r),
    scaling)}, the tensors as given (no copy); ``source`` names the adapter in messages.

    Raises:
        LoragError: shapes that do not fit the model, non-finite weights, rank > max_rank.
        UnsupportedAdapter: DoRA, modules_to_save, trained biases, or modules the engine does not adapt.
    """
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"{source}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise UnsupportedAdapter(f"{source}: DoRA adapters are not supported by the engine's fast path",
                                 hint='serve DoRA adapters with generation.engine = "transformers"')
    if config.get("modules_to_save"):
        raise UnsupportedAdapter(f"{source}: modules_to_save {config['modules_to_save']} is not supported by the engine")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapter(f"{source}: bias={config['bias']!r} is not supported by the engine (needs 'none')")
    if config.get("fan_in_fan_out"):
        raise UnsupportedAdapter(f"{source}: fan_in_fan_out adapters are not supported by the engine")

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None or match.group(3) not in MODULE_GROUP:
            raise UnsupportedAdapter(f"{source}: tensor {key!r} adapts a module the engine does not support "
                                     f"(supported: {', '.join(MODULE_GROUP)})")
        layer = int(match.group(1))
        if layer >= layers:
            raise LoragError(f"{source}: tensor {key!r} names layer {layer} but the model has {layers} layers")
        halves.setdefault((layer, match.group(3)), {})[match.group(4)] = tensor

    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise LoragError(f"{source}: layer {layer} {module} has lora_{''.join(pair)} but not both A and B")
        a, b = pair["A"], pair["B"]  # (r, in), (out, r)
        if not (a.is_floating_point() and b.is_floating_point()):
            raise LoragError(f"{source}: layer {layer} {module} holds {a.dtype}/{b.dtype} weights, not floating point")
        rank = a.shape[0]
        in_features, out_features = dims[module]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise LoragError(
                f"{source}: layer {layer} {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, expected "
                f"({rank}, {in_features}) and ({out_features}, {rank}): the adapter was trained for another base model"
            )
        if rank > max_rank:
            raise LoragError(f"{source}: rank {rank} exceeds adapters.max_rank={max_rank}",
                             hint="raise adapters.max_rank or train with a smaller r")
        if check_finite and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoragError(f"{source}: layer {layer} {module} has non-finite weights")
        name = f"model.layers.{layer}.{'self_attn' if module in GROUPS['qkv'] + GROUPS['o'] else 'mlp'}.{module}"
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        weights[(layer, module)] = (a, b, scaling)
    if not weights:
        raise LoragError(f"{source} holds no LoRA weights")
    return weights


def _pattern_value(patterns: dict, module_name: str, default):
    """peft's rank/alpha pattern lookup: a key matches the full module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if key == module_name or re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default
