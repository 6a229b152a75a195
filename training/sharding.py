"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for adapter training.

Under ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` every decoder layer and the
remaining root parameters (embeddings, final norm, lm_head) are sharded across the processes: the frozen
base and the adapter alike, so a base that no single device holds can still be trained. lorag applies
``fully_shard`` itself instead of through ``Accelerator.prepare``: accelerate only enables FSDP on
accelerators, while the same calls work on CPU with gloo, so the two-process CPU tests run the very code
path a GPU run uses.

Sharded adapter weights and optimizer state are gathered into full tensors for checkpoints and the saved
adapter (collectives: every process calls these functions, only the main process writes), and a full
checkpoint is cut back into each process's shard on ``--resume``.
"""

import logging
import os

from core.errors import LoragError

log = logging.getLogger(__name__)

FSDP_VERSION = "2"


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``distributed_type: FSDP`` in the accelerate config).

    Raises:
        LoragError: the config asks for FSDP1, which lorag does not drive.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != FSDP_VERSION:
        raise LoragError(
            f"the accelerate config asks for FSDP version {version}; lorag trains with FSDP2 (fully_shard)",
            hint="Set fsdp_config.fsdp_version: 2 (see configs/accelerate/fsdp.yaml)",
        )
    return True


def reshard_after_forward() -> bool:
    """``fsdp_reshard_after_forward`` from the accelerate config (default True: least memory, one more all-gather)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no")


def load_on_main_only() -> bool:
    """``fsdp_cpu_ram_efficient_loading`` (accelerate's default): only the main process reads the base weights."""
    return os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "true").lower() not in ("false", "0", "no")


def shard(loss_module, *, device, bf16: bool) -> None:
    """Apply FSDP2 in place: each decoder layer is one unit, the loss module (embeddings, norm, lm_head) the root.

    The root must be the module whose ``forward`` the loop calls (:class:`training.loss.CausalLMLoss`), so
    its parameters are gathered for the lm_head chunks it runs. Parameters move to ``device`` shard by shard.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise LoragError("FSDP needs a process group", hint="Start with `accelerate launch` or `torchrun`")
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    # bf16: the frozen base is bf16 and the adapter fp32; gathering both as bf16 matches the autocast compute,
    # and gradients are reduced in fp32 so the adapter update is not rounded across processes.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    options = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": reshard_after_forward()}
    causal_lm = loss_module.causal_lm
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise LoragError(f"FSDP: {type(decoder).__name__} has no .layers to shard")

    # fsdp_cpu_ram_efficient_loading: only the main process read the weights; the others built the model on the
    # meta device and get their shards from it after sharding, so host memory holds one copy of the base, not
    # one per process (8 x 140 GB for a 70B in bf16 would not fit a host).
    # A model that is on the meta device everywhere (a benchmark's random-weight model) stays there for the
    # caller to initialise shard by shard.
    meta_here = any(param.is_meta for param in loss_module.parameters())
    main = dist.get_rank() == 0
    flags = torch.tensor([float(meta_here), float(meta_here and main)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    from_main = bool(flags[0].item()) and not bool(flags[1].item())
    full_state = loss_module.state_dict() if from_main and main else {}
    buffers = _non_persistent_buffers(loss_module) if from_main and main else {}
    kept_buffers = {name: buffer.detach().clone() for name, buffer in buffers.items()}

    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(loss_module, **{**options, "reshard_after_forward": False})  # the root is needed again at once

    if from_main:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        loss_module.to_empty(device=device)
        set_model_state_dict(loss_module, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Buffers outside the state dict (rotary inverse frequencies) are not part of that broadcast.
        for name, buffer in _non_persistent_buffers(loss_module).items():
            if main:
                buffer.copy_(kept_buffers[name])
            dist.broadcast(buffer, src=0)
    log.info("FSDP2: %d decoder layers and the root sharded across %d processes%s", len(layers), world,
             " (weights sent from the main process)" if from_main else "")


def _non_persistent_buffers(module) -> dict:
    return {
        f"{prefix}.{name}" if prefix else name: sub._buffers[name]
        for prefix, sub in module.named_modules()
        for name in sub._non_persistent_buffers_set
        if sub._buffers.get(name) is not None
    }


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def adapter_parameters(peft_model) -> dict:
    """The adapter's parameters under the keys of a peft adapter file (``...lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    trainable = {name: param for name, param in peft_model.named_parameters() if param.requires_grad}
    return get_peft_model_state_dict(peft_model, state_dict=trainable)


def full_tensor(param):
    """``param`` whole, detached, on the CPU; gathers a sharded one (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    value = param.detach()
    if isinstance(value, DTensor):
        value = value.full_tensor()
    return value.to("cpu").contiguous()


def gather_adapter(peft_model) -> dict:
    """Full adapter tensors on the CPU, peft-keyed. Collective when sharded: every process must call it."""
    return {key: full_tensor(param) for key, param in adapter_parameters(peft_model).items()}  # same order everywhere


def load_adapter(peft_model, tensors: dict, *, source: str) -> None:
    """Copy full adapter tensors into the live (sharded or plain) adapter parameters; no communication.

    Raises:
        LoragError: keys or shapes that do not fit the adapter.
    """
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = adapter_parameters(peft_model)
    unexpected = sorted(set(tensors) - set(targets))
    missing = sorted(set(targets) - set(tensors))
    if unexpected or missing:
        raise LoragError(f"adapter weights {source!r} do not fit the model: unexpected {unexpected[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for key, param in targets.items():
            full = tensors[key]
            if tuple(full.shape) != tuple(param.shape):
                raise LoragError(f"adapter weights {source!r}: {key} has shape {tuple(full.shape)}, the model {tuple(param.shape)}")
            if isinstance(param, DTensor):
                # Every process holds the full tensor already: keep the local shard without a scatter.
                local = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(local.to_local())
            else:
                param.copy_(full)


def optimizer_state(root, optimizer) -> dict:
    """The optimizer's state with full tensors on the CPU (collective when sharded; complete on the main process)."""
    if not is_sharded(root):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(root, optimizer, state: dict) -> None:
    """Restore :func:`optimizer_state`'s output; a sharded model takes each process's shard of it."""
    if not is_sharded(root):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
