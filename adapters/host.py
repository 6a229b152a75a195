"""What a generator must offer to serve hot-swapped adapters (``AdapterHost``), and what it is given.

TransformersGenerator (peft) and server.generation.engine_generator.EngineGenerator (its slots) satisfy it directly.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from adapters.manifest import model_fingerprint

if TYPE_CHECKING:  # the module imports torch; this one stays light
    from adapters.safetensors_flat import FlatTensors


@dataclass(frozen=True)
class ServedModel:
    """The served base model as adapters are checked against it."""

    name: str  # the model id or path the server was started with
    fingerprint: str  # adapters.manifest.model_fingerprint of its config
    linear: dict[str, tuple[int, int]]  # module path -> (in_features, out_features) of every adaptable Linear
    device: str = "cpu"
    max_adapters: int | None = None  # adapters the generator can hold at once; None: no limit of its own
    dora: bool = True  # whether DoRA adapters can be served (the multi-adapter engine runs plain LoRA only)
    checks_finite: bool = False  # load_adapter refuses NaN/infinite weights itself (on the device, cheaply)
    # Other names of these weights an adapter's base_model_name_or_path may give: the served name
    # (server.served_model_name, often the hub id of a local copy) and adapters.base_model_aliases.
    aliases: tuple[str, ...] = ()

    @classmethod
    def of_module(cls, model, *, name: str) -> "ServedModel":
        """Read ``model`` (a transformers model, possibly with peft LoRA layers injected)."""
        import torch

        linear = {}
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".lora_" not in path:
                linear[path.removesuffix(".base_layer")] = (module.in_features, module.out_features)
        device = str(next(model.parameters()).device)
        return cls(name=name, fingerprint=model_fingerprint(model.config), linear=linear, device=device)


@dataclass
class HostAdapter:
    """One adapter version in host memory: its peft config and CPU tensors (peft's saved key names),
    checked to be finite unless the generator does that itself (ServedModel.checks_finite). ``flat``,
    when set, is the buffer the tensors are views of, so a device loader can move them in one copy."""

    key: str
    path: Path
    peft_config: dict
    tensors: dict = field(repr=False)
    nbytes: int = 0
    flat: "FlatTensors | None" = field(default=None, repr=False)


@runtime_checkable
class AdapterHost(Protocol):
    """A generator that adapters can be put on and taken off while it serves.

    ``load_adapter`` and ``unload_adapter`` block (call them from a worker thread) and must not disturb
    requests already running; a request names a loaded adapter by its key in GenerationRequest.adapter.
    """

    def served_model(self) -> ServedModel: ...

    def load_adapter(self, key: str, adapter: HostAdapter) -> None: ...

    def unload_adapter(self, key: str) -> None: ...

    def resident_keys(self) -> set[str]: ...
