"""Several processes, one run: ranks, who writes, collectives, and the data-parallel wrapper, in one place.

`torchrun` (or `accelerate launch`, or any launcher that sets the standard torch.distributed variables: WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts one process per device. Each loads the 4-bit base on its own
device, trains the same LoRA adapter on its share of every global batch, and DistributedDataParallel averages the
adapter's gradients. Without WORLD_SIZE (or with 1) nothing here starts a process group and every helper is the
single-process identity, so a plain `dpo-cli train` runs exactly as it always did.

The rest of the run asks only: `is_main_process()` (rank 0 alone writes files and draws the progress bar),
`average_metrics` (per-pair means over every rank's pairs), `sum_over_ranks` (a NaN on one rank stops every rank
at the same step: the loss is checked summed over ranks), `my_micro_batches` (this rank's share of a step),
`main_process_first` (the data cache is built once, then read by all) and
`wrap_policy` (the forward DDP must see: see `PolicyForward`). When a peer dies, its collectives fail here and become
one line (`PeerFailed`); the launcher then ends the job with the failed rank's own message.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator

import torch

from dpo_cli.errors import UserError
from dpo_cli.run import interrupts

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
"""How long a rank waits in a collective for a peer that is alive but busy: long enough for rank 0 to prepare a large
data set while the others wait at a barrier. A dead peer does not take this long: its connection closes (gloo raises
at once) and the launcher stops the job when it sees the exit."""


class PeerFailed(UserError):
    """Another process of the job failed, so this one cannot go on; the launcher shows that process's message."""

    exit_code = 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """Launched as one of several processes (torchrun --nproc-per-node N, N > 1, or several nodes)."""
    return world_size() > 1


def refuse_several_processes(command: str) -> None:
    """Only `train` runs data-parallel: another command under a launcher would do the same work in every process."""
    if is_distributed():
        raise UserError(
            f"dpo-cli {command} runs as one process, and WORLD_SIZE={world_size()} says a launcher (torchrun, "
            f"accelerate) started {world_size()}; run `dpo-cli {command} ...` directly"
        )


def is_main_process() -> bool:
    return rank() == 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def device_for(requested: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (cuda:LOCAL_RANK) when the run is on CUDA, else `requested`."""
    if not is_distributed() or requested.type != "cuda":
        return requested
    if local_rank() >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK={local_rank()} but this machine shows {torch.cuda.device_count()} CUDA GPU(s); start at most "
            "that many processes per node (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", local_rank())


def start(device: torch.device) -> None:
    """Join the job's process group (nccl on CUDA, gloo on CPU); nothing for a single process or if joined already.

    The process keeps the group until it exits: joining again after leaving, in one process (a test running two
    commands), hung in torchrun's rendezvous when tried, so a command never leaves the group early."""
    if not is_distributed() or _initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if device.type == "cuda" else {}
    try:
        torch.distributed.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **options)
        atexit.register(stop)
    except (ValueError, torch.distributed.DistError) as error:
        raise UserError(
            f"cannot join the torch.distributed job (WORLD_SIZE={world_size()}, RANK={rank()}): {error}; "
            "start dpo-cli with torchrun or accelerate launch, which set MASTER_ADDR and MASTER_PORT"
        ) from None


_ended_together = False


def ended_together() -> None:
    """Every rank finished the run (past its last barrier): the group can be left cleanly at exit."""
    global _ended_together
    _ended_together = True


def stop() -> None:
    """Leave the process group when the process exits, if the run ended on every rank. After a failure or an
    interrupt a peer may be gone or inside a collective, and tearing the group down (NCCL's) could wait for it;
    the process's exit frees it anyway."""
    if _initialized() and _ended_together:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def peer_failures_as_user_error() -> Iterator[None]:
    """A collective that fails because another rank died becomes `PeerFailed`: one line, no traceback.

    Gloo raises as soon as the dead peer's connection closes; the launcher (torchrun) has by then seen that
    peer's exit and stops every other rank, so the job ends within seconds with the dead rank's own message."""
    if not _initialized():
        yield
        return
    try:
        yield
    except (torch.distributed.DistError, RuntimeError) as error:
        if not isinstance(error, torch.distributed.DistError) and not _is_collective_failure(error):
            raise
        if interrupts.received():  # Ctrl-C reached every process and a peer ended first: this one was interrupted
            raise KeyboardInterrupt from None
        raise PeerFailed(_peer_failure(error)) from None


def _is_collective_failure(error: RuntimeError) -> bool:
    # DDP's reducer re-raises gloo's transport errors as plain RuntimeErrors from inside backward.
    text = str(error)
    return any(
        word in text for word in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "ProcessGroup")
    )


def _peer_failure(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [error.__class__.__name__])[0][:200]
    return (
        f"rank {rank()}: another process of this {world_size()}-process job stopped ({first}); its own error "
        "message above says why. Fix that and rerun, with --resume to continue from the last checkpoint"
    )


def barrier() -> None:
    if _initialized():
        with peer_failures_as_user_error():
            torch.distributed.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (building a cache), the others after it (reading what it built)."""
    if not _initialized():
        yield
        return
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over every rank (float64); the values themselves for a single process."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if _initialized():
        if torch.distributed.get_backend() == "nccl":
            tensor = tensor.cuda()
        with peer_failures_as_user_error():
            torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def average_metrics(sums: dict[str, float], count: int) -> dict[str, float]:
    """Per-pair means from per-pair sums; with several ranks, of every rank's pairs (sums and counts all-reduced)."""
    keys = list(sums)
    *totals, total_count = sum_over_ranks([sums[key] for key in keys] + [float(count)])
    return {key: value / max(total_count, 1) for key, value in zip(keys, totals, strict=True)}


def my_share(pairs):
    """This rank's pairs of a data set every rank scores (evaluation), or their rows of a (num_pairs, ...) tensor:
    every world_size-th one from its rank. The metrics, summed over ranks, then count each pair once."""
    if not is_distributed():
        return pairs
    if hasattr(pairs, "select") and not isinstance(pairs, torch.Tensor):  # a datasets.Dataset: a view, no copy
        return pairs.select(range(rank(), len(pairs), world_size()))
    return pairs[rank() :: world_size()]


def my_micro_batches(first: int, per_rank: int) -> list[int]:
    """The stream positions of this rank's `per_rank` micro-batches of a step that starts at position `first`.

    A step takes `per_rank * world_size` consecutive micro-batches of the stream; rank r takes every world_size-th
    one from `first + r`. So the step sees the same pairs in any world size, and one process takes them all."""
    return [first + i * world_size() + rank() for i in range(per_rank)]


class PolicyForward(torch.nn.Module):
    """The policy's log-probs of a batch as a module's forward, so DistributedDataParallel sees it run.

    dpo/scoring computes log-probs by calling the backbone and the LM head directly (fused, chunked): called that
    way, a DDP wrapper's forward never runs, its reducer is never armed, and each rank silently keeps its own
    gradients. Wrapping this module instead routes exactly that computation through DDP's forward. `model` is
    registered as a submodule so DDP finds the adapter's parameters; `compute(batch, with_sum_sq)` is the plain
    policy pass."""

    def __init__(self, model: torch.nn.Module, compute):
        super().__init__()
        self.model = model
        self._compute = compute

    def forward(self, batch, with_sum_sq: bool = False):
        return self._compute(batch, with_sum_sq)


def wrap_policy(model: torch.nn.Module, compute, device: torch.device):
    """`compute` wrapped for data-parallel training: a callable like it whose gradients are averaged over ranks.

    Only the adapter's parameters are synchronized: the frozen (4-bit) base weights and the buffers are loaded
    identically by every rank, so they are neither broadcast at construction nor at each forward (which also keeps
    DDP away from bitsandbytes' packed uint8 weights)."""
    from torch.nn.parallel import DistributedDataParallel

    module = PolicyForward(model, compute)
    frozen = [name for name, param in module.named_parameters() if not param.requires_grad]
    buffers = [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen + buffers)
    with peer_failures_as_user_error():
        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=False,
        )
