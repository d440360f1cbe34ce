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

`start` joins the job: each process checks in at the job's TCPStore (`rendezvous_store`) in short polls from Python,
so a peer that never comes is one line after $DPO_CLI_RENDEZVOUS_TIMEOUT seconds and Ctrl-C/SIGTERM end the wait
(torch's own start waits in C++, where signal handlers never run, for the collectives' 2-hour timeout). A launcher
variable that is not a number or out of range is one line naming it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import time
from collections.abc import Iterator

import torch

from dpo_cli.errors import UserError
from dpo_cli.run import interrupts

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
"""How long a rank waits in a collective for a peer that is alive but busy: long enough for rank 0 to prepare a large
data set while the others wait at a barrier. A dead peer does not take this long: its connection closes (gloo raises
at once) and the launcher stops the job when it sees the exit."""
RENDEZVOUS_TIMEOUT_VARIABLE = "DPO_CLI_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0
"""Seconds a process waits at the start for every process of the job to arrive. Peers a launcher started arrive
within seconds (loading nothing first); one that never comes is a stray WORLD_SIZE, or a node that was not started,
and 2 hours (the collectives' timeout) would be a hang."""
POLL_SECONDS = 0.1
"""How often the rendezvous looks for its peers: each look returns to Python, where Ctrl-C and SIGTERM are handled."""
STORE_ANSWER_SECONDS = 5
"""How long a connection to a store that listens may take to be answered (a TCPStore answers in milliseconds)."""
"""How often the rendezvous looks for its peers: each look returns to Python, where Ctrl-C and SIGTERM are handled."""


class PeerFailed(UserError):
    """Another process of the job failed, so this one cannot go on; the launcher shows that process's message."""

    exit_code = 1


def _launcher_count(name: str, default: int, minimum: int) -> int:
    """A whole number the launcher set in `name` (or `default` without it), or one line naming the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UserError(
            f"{name}={text[:40]!r} is not a whole number >= {minimum}; a launcher (torchrun, accelerate) sets it, "
            f"so unset it to run one process, or start dpo-cli with the launcher"
        )
    return value


def world_size() -> int:
    return _launcher_count("WORLD_SIZE", 1, 1)


def rank() -> int:
    value, size = _launcher_count("RANK", 0, 0), world_size()
    if value >= size:
        raise UserError(
            f"RANK={value} but WORLD_SIZE={size}: a rank is 0 to WORLD_SIZE-1; unset RANK and WORLD_SIZE to run one "
            "process, or start dpo-cli with a launcher (torchrun, accelerate), which sets both"
        )
    return value


def local_rank() -> int:
    value, size = _launcher_count("LOCAL_RANK", 0, 0), world_size()
    if value >= size:
        raise UserError(
            f"LOCAL_RANK={value} but WORLD_SIZE={size}: a process's rank on its machine is below the job's size; "
            "unset LOCAL_RANK to run one process, or start dpo-cli with a launcher (torchrun, accelerate)"
        )
    return value


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

    Every process first checks in at the job's store (`rendezvous_store`), so a peer that never comes is one line
    after $DPO_CLI_RENDEZVOUS_TIMEOUT seconds rather than a wait on the collectives' 2-hour timeout, and Ctrl-C or
    SIGTERM ends the wait (exit 130). The process keeps the group until it exits: joining again after leaving, in one
    process (a test running two commands), hung in torchrun's rendezvous when tried, so a command never leaves the
    group early."""
    if not is_distributed() or _initialized():
        return
    local_rank()  # a value out of range is one line now, not later on a GPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = {"device_id": device} if device.type == "cuda" else {}
    store = rendezvous_store(rendezvous_timeout())
    try:
        torch.distributed.init_process_group(
            backend,
            store=torch.distributed.PrefixStore("default_pg", store),  # as torch's own env:// start names its keys
            rank=rank(),
            world_size=world_size(),
            timeout=COLLECTIVE_TIMEOUT,
            **options,
        )
        atexit.register(stop)
    except (ValueError, torch.distributed.DistError) as error:
        raise UserError(
            f"cannot join the torch.distributed job (WORLD_SIZE={world_size()}, RANK={rank()}): {_first_line(error)}; "
            "start dpo-cli with torchrun or accelerate launch, which set MASTER_ADDR and MASTER_PORT"
        ) from None


def rendezvous_timeout() -> float:
    """$DPO_CLI_RENDEZVOUS_TIMEOUT in seconds (default 300), or one line naming it."""
    text = os.environ.get(RENDEZVOUS_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_RENDEZVOUS_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UserError(f"{RENDEZVOUS_TIMEOUT_VARIABLE}={text[:40]!r} is not a number of seconds > 0; e.g. 300")
    return seconds


def _master_address() -> tuple[str, int]:
    host, port_text = os.environ.get("MASTER_ADDR", "").strip(), os.environ.get("MASTER_PORT", "").strip()
    if not host or not port_text:
        missing = " and ".join(name for name, value in (("MASTER_ADDR", host), ("MASTER_PORT", port_text)) if not value)
        raise UserError(
            f"WORLD_SIZE={world_size()} says this is one of several processes, but {missing} is not set; start "
            "dpo-cli with torchrun or accelerate launch, which set them, or unset WORLD_SIZE to run one process"
        )
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 < port < 2**16:
        raise UserError(f"MASTER_PORT={port_text[:40]!r} is not a TCP port (1 to 65535); set it to a free port")
    return host, port


def rendezvous_store(timeout: float):
    """The job's TCPStore, once every rank has checked in there; one line naming the ranks that did not come within
    `timeout` seconds. Each wait is short and in Python, so Ctrl-C and SIGTERM end it (interrupts.py)."""
    host, port = _master_address()
    me, size = rank(), world_size()
    deadline = time.monotonic() + timeout
    store = _connect(host, port, me, size, deadline, timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's agent store outlives a restarted job
    keys = [f"dpo-cli/rendezvous/{attempt}/rank-{r}" for r in range(size)]
    try:
        store.set(keys[me], "here")
        while missing := [r for r, key in enumerate(keys) if not store.check([key])]:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"rank {me}: {_ranks(missing)} of this WORLD_SIZE={size} job never came to {host}:{port} within "
                    f"{timeout:g} s; start every process (torchrun --nproc-per-node, --nnodes), or unset WORLD_SIZE "
                    f"and RANK to run one process (${RENDEZVOUS_TIMEOUT_VARIABLE} sets the wait)"
                )
            time.sleep(POLL_SECONDS)
    except torch.distributed.DistError as error:  # the store's host (rank 0, or torchrun's agent) went away
        raise PeerFailed(_peer_failure(error)) from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    return store


def _connect(host: str, port: int, me: int, size: int, deadline: float, timeout: float):
    """rank 0 opens the store at host:port (unless torchrun's agent holds it); the others connect, retrying in
    one-second tries until `deadline`."""
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and me == 0:
        try:
            # wait_for_workers=False: the peers are awaited in rendezvous_store, where a signal can end the wait
            return TCPStore(host, port, size, True, COLLECTIVE_TIMEOUT, wait_for_workers=False, multi_tenant=True)
        except torch.distributed.DistError as error:
            raise UserError(
                f"rank 0 cannot open the job's store at port {port} ({_first_line(error)}); set MASTER_PORT to a free "
                "port"
            ) from None
    while not _accepts_connections(host, port):
        if time.monotonic() >= deadline:
            raise UserError(
                f"rank {me}: nothing answered at {host}:{port} (the job's store, kept by rank 0 or the launcher) "
                f"within {timeout:g} s; check MASTER_ADDR and MASTER_PORT, and that rank 0 started "
                f"(${RENDEZVOUS_TIMEOUT_VARIABLE} sets the wait)"
            )
        time.sleep(POLL_SECONDS)
    try:  # a store that listens answers at once; a short timeout keeps this blocking call short
        return TCPStore(host, port, size, False, datetime.timedelta(seconds=STORE_ANSWER_SECONDS))
    except torch.distributed.DistError as error:
        raise UserError(
            f"rank {me}: {host}:{port} answers but is not the job's store ({_first_line(error)}); check MASTER_ADDR "
            "and MASTER_PORT"
        ) from None


def _accepts_connections(host: str, port: int) -> bool:
    """Whether something listens at host:port, asked in Python: TCPStore's own retries would each log a C++
    stack trace, and would block for their whole timeout where a signal cannot end them."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _ranks(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:8])) + (f" and {len(numbers) - 8} more" if len(numbers) > 8 else "")
    return f"rank {shown}" if len(numbers) == 1 else f"ranks {shown}"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [error.__class__.__name__])[0][:200]


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
    first = _first_line(error)
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
