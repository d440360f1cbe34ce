"""What bench_train.py's workers share: the settings they read (`Spec`), the result they write (`WorkerResult`) and
the helpers both use. Each tool runs in a worker process of its own: worker_dpo_cli.py, worker_trl.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import benchlib


@dataclass
class Spec:
    """Everything a worker needs; written as JSON by the parent, so both tools read the very same settings."""

    model_path: str
    data_path: str
    device: str
    quantize: bool
    compute_dtype: str
    gradient_checkpointing: bool
    batch_size: int
    max_length: int
    lora_r: int
    lora_alpha: int
    lr: float
    beta: float
    warmup: int
    steps: int
    seed: int
    trl_lora_fp32: bool
    threads: int
    output_dir: str
    profile_path: str = ""  # CPU: write the profiled step's operator table here
    layout: str = "auto"  # dpo-cli only: data.layout (auto, padded, packed, shared-prompt)
    precompute_ref: bool = False  # dpo-cli only: dpo.precompute_ref (the steps then run only the policy)
    compile: bool = False  # dpo-cli only: model.compile (torch.compile of each decoder layer)

    @property
    def total_steps(self) -> int:
        # CPU: one more step after the timed ones, run under the profiler for the memory figure.
        return self.warmup + self.steps + (1 if self.device == "cpu" else 0)


@dataclass
class WorkerResult:
    tool: str
    step_ends: list[float]  # perf_counter at the end of each optimizer step
    cpu_ends: list[float]  # process_time (CPU seconds of all the worker's threads) at the same moments
    load_average: list[float]  # 1-minute load average of the machine before and after the steps
    tokens_per_step: list[int]
    pairs_per_step: list[int]
    digests: list[str]  # of the token ids each step saw, to check both tools did the same work
    losses: list[float]
    trainable_params: int
    peak_step_mib: float | None
    absolute_peak_mib: float  # CUDA: max_memory_allocated; CPU: peak RSS of the worker
    rss_before_training_mib: float  # RSS once the model, adapter and data are loaded, before the first step
    setup_seconds: float
    notes: list[str] = field(default_factory=list)
    layout: str = ""  # dpo-cli: the layout the run resolved `Spec.layout` to; TRL: empty
    auto_layout: str = ""  # dpo-cli: the layout `auto` (the default) resolves to for this model


def batch_digest(input_ids, attention_mask) -> tuple[str, int]:
    """(digest of the real token ids row by row, number of real tokens) of a collated batch."""
    import torch

    digest = hashlib.sha1()
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        digest.update(ids[mask.bool()].to(torch.int64).cpu().numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16], int(attention_mask.sum())


class InOrder:
    """A `DataStream` stand-in that reads the pairs front to back, as TRL's sequential sampler does."""

    def __init__(self, num_pairs: int, batch_size: int):
        self.num_pairs, self.batch_size = num_pairs, batch_size

    @property
    def per_epoch(self) -> int:
        return self.num_pairs // self.batch_size

    def indices(self, micro_batch: int) -> list[int]:
        start = micro_batch * self.batch_size
        if start + self.batch_size > self.num_pairs:
            raise RuntimeError("the benchmark data file is too short for the requested steps")
        return list(range(start, start + self.batch_size))


def memory_window(spec: Spec) -> tuple[int, int]:
    """[first, last] step (0-based) whose memory is measured: the timed steps on CUDA, the extra step on CPU."""
    if spec.device == "cpu":
        return spec.total_steps - 1, spec.total_steps - 1
    return spec.warmup, spec.warmup + spec.steps - 1


def write_profile(spec: Spec, memory: benchlib.PeakMemory) -> None:
    table = memory.op_table() if spec.profile_path else None
    if table:
        Path(spec.profile_path).write_text(table)


def absolute_peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / benchlib.MIB
    return benchlib.max_rss_mib()


def worker_main(tool: str, spec_path: Path, result_path: Path) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = Spec(**json.loads(spec_path.read_text()))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    # Each worker imports only its own tool's modules, so neither's memory figures carry the other's imports.
    if tool == "dpo-cli":
        from worker_dpo_cli import run_dpo_cli as run_tool
    else:
        from worker_trl import run_trl as run_tool
    result = run_tool(spec)
    result_path.write_text(json.dumps(asdict(result)))
