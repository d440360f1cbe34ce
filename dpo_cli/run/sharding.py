"""Sharding the 4-bit base over the processes of a torchrun job (`--sharding fsdp`): FSDP2, in one place.

Data parallelism (`ddp`, run/distributed.py) keeps a whole copy of the model in every process. With `fsdp`, torch's
own FSDP2 (`torch.distributed.fsdp.fully_shard`) splits every decoder layer, and the backbone's remaining weights
(embeddings, final norm), into one slice per process: a layer's weights are gathered just before it runs and freed
just after, and the adapter's gradients are reduce-scattered, so each process keeps 1/world_size of the base, of the
LoRA weights, of their gradients and of the optimizer state. The 4-bit weights can be sliced because they are stored
in the compute dtype (`bnb_4bit_quant_storage`, FSDP-QLoRA's trick; model/load.py), and bitsandbytes finds each
layer's quantization state on the module again after FSDP swaps the parameter.

Why the backbone is the root: dpo/scoring calls the backbone directly and reads the LM head's weight directly (the
fused log-probs never build the logits), so every forward (policy, reference with adapters off, evaluation) runs
through the backbone's FSDP hooks without any wrapper. The LM head is not sharded: it stays whole in every process
(frozen, identical everywhere; with tied embeddings it keeps the whole embedding matrix, whose sharded copy serves
the backbone).

Everything FSDP changes for the rest of the run is here: `shard` (the wrapping), `full_tensor` / `full_adapter_state`
/ `full_optimizer_state` (the whole adapter and optimizer state, gathered for a checkpoint that any world size and
either sharding can resume), `load_adapter_state` / `load_optimizer_state` (a full state sliced back in),
`local_part` (this process's slice, for checks each process runs on what it holds), `gradient_sync_paused` (one
reduction per step, as DDP's `no_sync`) and `eval_batches` (every process runs as many forwards in evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dpo_cli.errors import UserError
from dpo_cli.run import distributed

MIN_BITSANDBYTES = (0, 43, 0)
"""The first bitsandbytes whose 4-bit weights can be stored in a float dtype (`bnb_4bit_quant_storage`)."""


def check_sharding(sharding: str, quantize: bool, from_adapter: str | None = None) -> None:
    """Refuses `--sharding fsdp` where it cannot work, in one line, before any model is loaded."""
    if sharding != "fsdp":
        return
    if from_adapter:  # its reference pass switches PEFT adapters, which flips requires_grad on sharded parameters
        raise UserError(
            "--sharding fsdp with --from-adapter: not supported yet (the frozen reference adapter has not been "
            "tested sharded); use --sharding ddp, or run without --from-adapter"
        )
    if not distributed.is_distributed():
        raise UserError(
            "--sharding fsdp: shards the model over the processes of a launcher, and this is one process (no "
            "WORLD_SIZE > 1); start it with torchrun --nproc-per-node N (see README: Multi-GPU and multi-node), or "
            "drop --sharding"
        )
    if quantize:
        _check_bitsandbytes()


def _check_bitsandbytes(version: str | None = None) -> None:
    if version is None:
        from importlib.metadata import version as installed

        version = installed("bitsandbytes")
    numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())
    if numbers < MIN_BITSANDBYTES:
        needed = ".".join(map(str, MIN_BITSANDBYTES))
        raise UserError(
            f"--sharding fsdp: bitsandbytes {version} cannot store 4-bit weights in a float dtype, which sharding "
            f"needs; pip install 'bitsandbytes>={needed}', or use --sharding ddp"
        )


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def decoder_layers(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The backbone's decoder layers, each to be its own FSDP unit; one line when they cannot be found."""
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UserError(
            f"--sharding fsdp: {type(backbone).__name__} keeps no decoder layers in `.layers`, so dpo-cli cannot "
            "tell how to shard it; use --sharding ddp for this model"
        )
    return layers


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shards `model` (a PEFT model) in place over this job's processes: each decoder layer, then the backbone.
    Returns the backbone, the root FSDP unit. The optimizer must be built after this (the parameters are new)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dpo_cli.model.load import backbone_and_head

    backbone, _ = backbone_and_head(model)
    layers = decoder_layers(backbone)
    outside = [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and not any(param is p for p in backbone.parameters())
    ]
    if outside:
        raise UserError(
            f"--sharding fsdp: the adapter trains {outside[0]}, outside the decoder layers (the LM head stays whole "
            "in every process); drop it from lora.target_modules or use --sharding ddp"
        )
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    with distributed.peer_failures_as_user_error():
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
    return backbone


@contextlib.contextmanager
def gradient_sync_paused(module: torch.nn.Module) -> Iterator[None]:
    """Gradients accumulate in each process, unreduced (DDP's `no_sync`; for FSDP, whole LoRA gradients, small)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        with module.no_sync():
            yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor. Sharded, this is a collective: every process calls it."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        with distributed.peer_failures_as_user_error():
            return tensor.full_tensor()
    return tensor


def is_sharded_parameter(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of a sharded tensor; the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: whole value on the CPU} of the trainable (LoRA) parameters. Every process calls it."""
    return {name: full_tensor(param.detach()).cpu() for name, param in model.named_parameters() if param.requires_grad}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies whole values (keyed like `full_adapter_state`) into the trainable parameters, each process its slice."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            value = state[name].to(param.device, param.dtype)
            if isinstance(param, DTensor):  # every process holds the whole value: take this one's slice, no traffic
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(value.to_local())
            else:
                param.copy_(value)


def load_peft_adapter_state(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
    """Loads an adapter file's tensors (keyed as PEFT saves them) into a sharded model; the keys it does not fit."""
    from peft import get_peft_model_state_dict

    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    by_saved_key = get_peft_model_state_dict(model, state_dict=trainable)  # PEFT's own renaming, kept by identity
    name_of = {id(param): name for name, param in trainable.items()}
    unexpected = [key for key in saved if key not in by_saved_key]
    missing = [key for key in by_saved_key if key not in saved]
    if unexpected or missing:
        return unexpected or missing
    load_adapter_state(model, {name_of[id(by_saved_key[key])]: value for key, value in saved.items()})
    return []


def _options(model: torch.nn.Module):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Sharded, the slices are gathered onto the main process's CPU (the others get nothing); else nothing moves.
    return StateDictOptions(full_state_dict=True, cpu_offload=is_sharded(model))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state, whole and keyed by parameter name, so any world size and either sharding can load it.
    Every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with distributed.peer_failures_as_user_error():
        return get_optimizer_state_dict(model, optimizer, options=_options(model))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads `full_optimizer_state`'s dict into `optimizer` (built over `model`'s trainable parameters), each
    process keeping its slice. (torch's set_optimizer_state_dict needs an optimizer that has stepped already.)
    A KeyError or ValueError says the state is not of this adapter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    ours = [param for group in optimizer.param_groups for param in group["params"]]
    index = {id(param): i for i, param in enumerate(ours)}

    def placed(param: torch.nn.Parameter, value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value  # AdamW's step count
        value = value.to(local_part(param).device)
        if isinstance(param, DTensor):
            return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        return value

    loaded = {
        index[id(params[name])]: {key: placed(params[name], value) for key, value in values.items()}
        for name, values in state["state"].items()
    }
    groups = [
        {**group, "params": [index[id(params[name])] for name in group["params"]]} for group in state["param_groups"]
    ]
    optimizer.load_state_dict({"state": loaded, "param_groups": groups})


def eval_batches(model: torch.nn.Module, num_pairs: int, batch_size: int) -> int:
    """The batches each process scores when the processes split `num_pairs` eval pairs (distributed.my_share):
    sharded, every process must run that many forwards (the largest share's), since each gathers weights from all
    of them; 0 (no minimum) otherwise."""
    if not is_sharded(model):
        return 0
    largest_share = -(-num_pairs // distributed.world_size())
    return -(-largest_share // batch_size)
