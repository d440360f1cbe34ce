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

Loading: only the main process (rank 0) loads the base, into host memory (`LOAD_DEVICE`, quantized there); the others
build it on the meta device and take rank 0's quantization states (`load_base`), so no process but rank 0 ever holds
the whole base, and none holds it on its accelerator: `shard` puts each process's slice of every weight on its own
device, one decoder layer at a time (rank 0's device holds that one layer whole while fully_shard slices it). The
reference log-probs precomputed before training are scored after sharding, every process a share of the pairs,
while rank 0 alone reads and writes the reference cache (`led_by_main_process`).

Everything FSDP changes for the rest of the run is here: `shard` (the wrapping), `full_tensor` / `full_adapter_state`
/ `full_optimizer_state` (the whole adapter and optimizer state, gathered for a checkpoint that any world size and
either sharding can resume), `load_adapter_state` / `load_optimizer_state` (a full state sliced back in),
`local_part` (this process's slice, for checks each process runs on what it holds), `gradient_sync_paused` (one
reduction per step, as DDP's `no_sync`) and `eval_batches` (every process runs as many forwards in evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from dpo_cli.errors import UserError
from dpo_cli.run import distributed

MIN_BITSANDBYTES = (0, 43, 0)
"""The first bitsandbytes whose 4-bit weights can be stored in a float dtype (`bnb_4bit_quant_storage`)."""


def check_sharding(sharding: str, quantize: bool) -> None:
    """Refuses `--sharding fsdp` where it cannot work, in one line, before any model is loaded."""
    if sharding != "fsdp":
        return
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


LOAD_DEVICE = torch.device("cpu")
"""Where the main process loads (and quantizes) the whole base under fsdp: host memory, not its accelerator, so a
base larger than one card can be sharded over several (bitsandbytes quantizes on the CPU)."""


def load_base(config, device: torch.device, trust_remote_code: bool = False) -> torch.nn.Module:
    """The base to shard, held whole by the main process only, in host memory (`LOAD_DEVICE`): it loads it (4-bit,
    stored in the compute dtype of `device`); every other process builds the same modules on the meta device without
    reading a weight, and takes the main process's quantization states (absmax and the like, about 1/32 of the 4-bit
    weights), so that its 4-bit layers are those of the main process. `shard` then puts each process's slice of
    every weight on its own `device`; no process ever holds the whole base there."""
    from dpo_cli.model.load import load_base_model

    main = distributed.is_main_process()
    model = load_base_model(
        config, device, trust_remote_code, shardable=True, skeleton=not main, load_device=LOAD_DEVICE
    )
    if config.quantize:
        with distributed.peer_failures_as_user_error():
            _share_quantization_states(model, device)
    return model


def _share_quantization_states(model: torch.nn.Module, device: torch.device) -> None:
    """Gives every 4-bit layer of a skeleton (load_base) the main process's packed weight shape and quantization
    state. bitsandbytes reads the state from the module again once FSDP has swapped the weight for its own."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Linear4bit, Params4bit

    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    main = distributed.is_main_process()
    weights = [(tuple(layer.weight.shape), layer.weight.dtype) if main else None for layer in layers]
    weights = _broadcast_objects(weights)
    states = _broadcast_tensor_dicts(
        [layer.weight.quant_state.as_dict(packed=True) for layer in layers] if main else None, device
    )
    if main:  # its states go to the device the layers will run on (QuantState.to moves them in place)
        for layer in layers:
            layer.weight.quant_state.to(device)
            layer.quant_state = layer.weight.quant_state  # where bitsandbytes finds it once FSDP swaps the weight
        return
    for layer, (shape, dtype), state in zip(layers, weights, states, strict=True):
        quant_state = QuantState.from_dict(state, device=device)
        layer.weight = Params4bit(
            torch.empty(shape, dtype=dtype, device="meta"),
            requires_grad=False,
            quant_state=quant_state,
            blocksize=quant_state.blocksize,
            compress_statistics=quant_state.nested,
            quant_type=quant_state.quant_type,
            quant_storage=dtype,
            module=layer,
            bnb_quantized=True,
        )
        layer.quant_state = quant_state


def led_by_main_process(
    lead: Callable[[Callable[[str, int], torch.Tensor]], tuple[torch.Tensor | None, ...]],
    score_share: Callable[[str], torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor | None, ...]:
    """`lead(score)` run by the main process alone (it reads and writes the reference cache), every process scoring
    beside it on the sharded model: each `score(name, num_rows)` the main process calls has every process score its
    share of split `name` (`score_share(name)`: its distributed.my_share rows, in as many sharded forwards as the
    others) and returns the split's whole (num_rows, ...) values in the split's order. `lead` returns CPU tensors or
    None; every process gets them."""
    main = distributed.is_main_process()
    with distributed.peer_failures_as_user_error():
        if main:

            def score(name: str, num_rows: int) -> torch.Tensor:
                _broadcast_objects([name, num_rows])
                return _gathered_rows(score_share(name), num_rows, device)

            values = lead(score)
            _broadcast_objects([None, 0])  # the others stop following
        else:
            while (asked := _broadcast_objects(None))[0] is not None:
                _gathered_rows(score_share(asked[0]), asked[1], device)
            values = None
        shared = _broadcast_tensor_dicts(
            None if values is None else [{} if value is None else {"value": value} for value in values], device
        )
    return tuple(part["value"].cpu() if part else None for part in shared)  # where the reference keeps them


def _gathered_rows(share: torch.Tensor, num_rows: int, device: torch.device) -> torch.Tensor:
    """The whole (num_rows, ...) tensor on the CPU from each process's `share`, its rows rank::world_size (my_share)."""
    import torch.distributed as dist

    size = distributed.world_size()
    largest = -(-num_rows // size)
    padded = torch.zeros((largest, *share.shape[1:]), dtype=share.dtype, device=device)
    padded[: len(share)] = share.to(device)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    whole = torch.empty((num_rows, *share.shape[1:]), dtype=share.dtype)
    for rank, part in enumerate(parts):
        rows = len(range(rank, num_rows, size))
        whole[rank::size] = part[:rows].cpu()
    return whole


def _broadcast_objects(values: list):
    """The main process's list of small plain values (shapes, dtypes, names), in every process."""
    import torch.distributed as dist

    holder = [values]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _broadcast_tensor_dicts(dicts: list[dict[str, torch.Tensor]] | None, device: torch.device) -> list[dict]:
    """The main process's list of {name: tensor}, in every process on `device`: the names, shapes and dtypes as
    plain values, then each tensor by a broadcast of its own (no tensor is pickled)."""
    import torch.distributed as dist

    layout = _broadcast_objects(
        None if dicts is None else [{key: (tuple(v.shape), v.dtype) for key, v in d.items()} for d in dicts]
    )
    received = []
    for index, shapes in enumerate(layout):
        values = {}
        for key, (shape, dtype) in shapes.items():
            value = dicts[index][key].to(device).contiguous() if dicts is not None else None
            if value is None:
                value = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(value, src=0)
            values[key] = value
        received.append(values)
    return received


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shards `model` (a PEFT model; whole in the main process, a skeleton in the others: load_base) in place
    over this job's processes: each decoder layer, then the backbone; after each, every process receives from the
    main process its slice of the weights just sharded (and, last, the whole of what stays unsharded: the LM head,
    buffers).
    Returns the backbone, the root FSDP unit. The optimizer must be built after this (the parameters are new)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

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
        for layer in layers:  # one at a time, so that rank 0 frees each layer's whole weights once they are sent
            _shard_from_main_process(layer, _names(layer), lambda layer=layer: fully_shard(layer, mesh=mesh), device)
        rest = {name for name, tensor in _named_tensors(model) if not isinstance(tensor, DTensor)}
        _shard_from_main_process(model, rest, lambda: fully_shard(backbone, mesh=mesh), device)
    return backbone


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, in the same order in every process (the model's own). A tied weight comes under
    each of its names: sharding the backbone unties its copy from the LM head's."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _names(module: torch.nn.Module) -> set[str]:
    return {name for name, _ in _named_tensors(module)}


def _shard_from_main_process(root: torch.nn.Module, names: set[str], wrap: Callable[[], None], device) -> None:
    """`wrap()` (fully_shard of part of `root`), then the tensors of `root` called `names` filled from the main
    process's whole values: in the others, which hold them on the meta device until then, a sharded one gets its
    slice and anything else the whole value. One tensor is broadcast at a time, so the other processes never hold
    more than one whole weight, and the main process holds the whole of what `wrap` shards only until it is sent."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    main = distributed.is_main_process()
    whole = {name: tensor for name, tensor in _named_tensors(root) if name in names} if main else None
    wrap()
    if not main:  # storage for its slices and its own copy of the rest, filled below
        for module in root.modules():
            own = [*module._parameters.values(), *module._buffers.values()]
            if any(t is not None and local_part(t).device.type == "meta" for t in own):
                module.to_empty(device=device, recurse=False)
    with torch.no_grad():
        for name, tensor in _named_tensors(root):
            if name not in names:
                continue
            if whole is not None:  # loaded into host memory (LOAD_DEVICE): sent from `device`, as collectives need
                value = whole.pop(name).detach().to(device)
                value = value if value.is_contiguous() else value.contiguous()
            else:
                value = torch.empty(tensor.shape, dtype=tensor.dtype, device=local_part(tensor).device)
            dist.broadcast(value, src=0)
            if whole is not None:
                continue  # its own values: the slice fully_shard kept, or the tensor itself
            if isinstance(tensor, DTensor):
                value = distribute_tensor(value, tensor.device_mesh, tensor.placements, src_data_rank=None)
                tensor.to_local().copy_(value.to_local())
            else:
                tensor.copy_(value)
    if main:
        _move_unsharded(root, device)


def _move_unsharded(root: torch.nn.Module, device: torch.device) -> None:
    """The main process's own copy of what `root` keeps unsharded (the LM head, buffers outside the backbone) moved
    from host memory to `device` (fully_shard moved what it shards). In place (`.data`), so tied weights stay tied."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for module in root.modules():
            for param in module._parameters.values():
                if param is not None and not isinstance(param, DTensor) and param.device != device:
                    param.data = param.data.to(device)
            for key, buffer in module._buffers.items():
                if buffer is not None and buffer.device != device:
                    module._buffers[key] = buffer.to(device)


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
