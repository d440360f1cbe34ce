"""SFT step benchmark: `dpo-cli sft` against TRL 1.16's SFTTrainer, same model, data and settings, padded and packed.

Each row runs in its own subprocess. Both tools load the same base the same way (`load_base_model`, 4-bit NF4 by
default) with the same LoRA config, and read the same prompt/completion file (stories-happy's prompts and chosen
completions, seeded shuffle) front to back, the same examples in every step (checked: the multiset of token
sequences of each step must be equal across rows). The loss is on the completion tokens (both tools' default),
lr constant, grad clip 1.0. dpo-cli runs as a user's run does (`build_run`, `fit`), TRL through `SFTTrainer.train()`,
each with bench_train's step clock (worker_dpo_cli.StepClock, worker_trl's TrlStepClock). The rows:
- dpo-cli padded / packed: `--layout padded` / `--layout packed` (sequences end to end in rows, a block mask);
- trl padded: `SFTConfig(padding_free=False)`; trl padding-free: `padding_free=True`, a step's examples in one row
  without padding (TRL's packing of a batch; its dataset-level `packing=True` would change what a step holds). TRL
  refuses `max_length` there, so that row has none: stories-happy's sequences are all shorter than max_length
  (checked: every row's steps hold the same token sequences).
Tokens/s counts the real (non-padding) tokens of each step's sequences, the same for every row.

Run:
    python bench/bench_sft.py --threads 1                  # stories260K 4-bit, stories-happy, CPU
    python bench/bench_sft.py --threads 1 --write          # also append the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import benchlib  # noqa: E402
from train_inputs import STORIES_DATA, STORIES_MODEL, ordered_data, read_records  # noqa: E402
from train_summary import summarize  # noqa: E402
from train_workers import InOrder, Spec, WorkerResult, absolute_peak_mib, memory_window  # noqa: E402

ROWS = {"dpo-cli padded": ("dpo-cli", "padded"), "dpo-cli packed": ("dpo-cli", "packed")}
ROWS |= {"trl padded": ("trl", "padded"), "trl padding-free": ("trl", "packed")}
LOSS_RTOL = 1e-3
"""Each dpo-cli row's loss against the TRL row of its layout, at every step: the same examples, the same weights."""


def step_digest(sequences: list[list[int]]) -> str:
    """The multiset of a step's token sequences: the same examples in any order and any layout give the same."""
    digest = hashlib.sha1()
    for ids in sorted(tuple(s) for s in sequences):
        digest.update(json.dumps(ids).encode())
    return digest.hexdigest()[:16]


def run_dpo_cli_sft(spec: Spec) -> WorkerResult:
    import torch
    from rich.console import Console
    from worker_dpo_cli import StepClock, dpo_cli_recipe

    from dpo_cli.run.callbacks import MetricsLogger
    from dpo_cli.run.loop import fit
    from dpo_cli.run.setup import build_run

    device = torch.device(spec.device)
    started = time.perf_counter()
    recipe = dpo_cli_recipe(spec)
    recipe.training.objective = "sft"
    run = build_run(recipe, console=Console(file=sys.stderr, quiet=True))
    run.stream = InOrder(len(run.train_pairs), spec.batch_size)
    setup_seconds = time.perf_counter() - started
    rss_before = benchlib.current_rss_mib()
    clock = StepClock(spec, device, memory_window(spec))
    load = [os.getloadavg()[0]]
    try:
        fit(run, [MetricsLogger(), clock])
    finally:
        run.metrics_log.close()
    load.append(os.getloadavg()[0])
    digests, tokens = [], []
    for step in range(spec.total_steps):
        rows = [run.train_pairs[i] for i in run.stream.indices(step)]
        sequences = [list(r["prompt_ids"]) + list(r["chosen_ids"]) for r in rows]
        digests.append(step_digest(sequences))
        tokens.append(sum(map(len, sequences)))
    return WorkerResult(
        tool="dpo-cli", step_ends=clock.ends, cpu_ends=clock.cpu_ends, load_average=load, tokens_per_step=tokens,
        pairs_per_step=[spec.batch_size] * spec.total_steps, digests=digests, losses=clock.losses,
        trainable_params=sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        peak_step_mib=clock.memory.peak_mib, absolute_peak_mib=absolute_peak_mib(device),
        rss_before_training_mib=rss_before, setup_seconds=setup_seconds, layout=run.layout,
    )  # fmt: skip


def run_trl_sft(spec: Spec) -> WorkerResult:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from worker_trl import _trl_step_clock

    from dpo_cli.config import LoraSection, ModelSection
    from dpo_cli.model.load import load_base_model, load_tokenizer, lora_config

    device = torch.device(spec.device)
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model_path)
    section = ModelSection(
        path=spec.model_path, quantize=spec.quantize, compute_dtype=spec.compute_dtype,
        gradient_checkpointing=spec.gradient_checkpointing, device=spec.device,
    )  # fmt: skip
    model = load_base_model(section, device)
    args = SFTConfig(
        output_dir=spec.output_dir, report_to=[], use_cpu=spec.device == "cpu", bf16=model.dtype == torch.bfloat16,
        gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec.gradient_checkpointing else None,
        per_device_train_batch_size=spec.batch_size, learning_rate=spec.lr,
        # TRL refuses max_length with padding_free and no packing; the benchmark's sequences are all shorter
        max_length=None if spec.layout == "packed" else spec.max_length,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_steps=spec.total_steps,
        logging_steps=1, save_strategy="no", train_sampling_strategy="sequential", dataloader_num_workers=0,
        disable_tqdm=True, seed=spec.seed, padding_free=spec.layout == "packed",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(read_records(Path(spec.data_path))),
        processing_class=tokenizer, peft_config=lora_config(LoraSection(r=spec.lora_r, alpha=spec.lora_alpha)),
    )  # fmt: skip
    for param in trainer.model.parameters():  # TRL keeps a 4-bit base's LoRA in bfloat16; train float32 as dpo-cli
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    clock = _trl_step_clock(spec, device, memory_window(spec))
    trainer.add_callback(clock)
    setup_seconds = time.perf_counter() - started
    rss_before = benchlib.current_rss_mib()
    load = [os.getloadavg()[0]]
    trainer.train()
    load.append(os.getloadavg()[0])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][: spec.total_steps]
    digests, tokens = [], []
    for step in range(spec.total_steps):
        rows = range(step * spec.batch_size, (step + 1) * spec.batch_size)
        sequences = [list(trainer.train_dataset[i]["input_ids"]) for i in rows]
        digests.append(step_digest(sequences))
        tokens.append(sum(map(len, sequences)))
    return WorkerResult(
        tool="trl", step_ends=clock.ends, cpu_ends=clock.cpu_ends, load_average=load, tokens_per_step=tokens,
        pairs_per_step=[spec.batch_size] * spec.total_steps, digests=digests, losses=losses,
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        peak_step_mib=clock.memory.peak_mib, absolute_peak_mib=absolute_peak_mib(device),
        rss_before_training_mib=rss_before, setup_seconds=setup_seconds, layout=spec.layout,
    )  # fmt: skip


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row, alternating order; medians reported")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step (default 8)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="turn it off for both tools")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: torch's default)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per worker run (default 600)")
    parser.add_argument("--workdir", type=Path, help="where the data and runs go (default: a temp folder)")
    parser.add_argument("--write", nargs="?", const=benchlib.RESULTS, type=Path, help="append to bench/RESULTS.md")
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _worker(tool: str, spec_path: Path, result_path: Path) -> None:
    """One row's run, in its own process: quiet libraries, the threads asked for, the result as JSON."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = Spec(**json.loads(spec_path.read_text()))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    result = (run_dpo_cli_sft if tool == "dpo-cli" else run_trl_sft)(spec)
    result_path.write_text(json.dumps(asdict(result)))


def _run_row(label: str, spec: Spec, workdir: Path, run: int, timeout: int) -> WorkerResult:
    tool = ROWS[label][0]
    name = f"{label.replace(' ', '-')}-{run}"
    spec.output_dir = str(workdir / f"run-{name}")
    shutil.rmtree(spec.output_dir, ignore_errors=True)
    spec_path, result_path = workdir / f"spec-{name}.json", workdir / f"result-{name}.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env["DPO_CLI_CACHE"] = str(workdir / "cache")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(spec_path), str(result_path)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not result_path.exists():
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"{label}: the worker failed (exit {done.returncode}); its stderr is above")
    print(f"  {label:18s} {time.perf_counter() - started:4.0f}s")
    return WorkerResult(**json.loads(result_path.read_text()))


def _table(spec: Spec, by_label: dict[str, list[WorkerResult]]) -> tuple[str, list[str]]:
    """(the markdown table, loss gaps per dpo-cli row against TRL's row of its layout)."""
    summaries = {label: summarize(spec, results) for label, results in by_label.items()}
    header = ["row", "s/step", "CPU s/step", "examples/s", "tokens/s", "speed vs TRL (wall / CPU)", "peak step MiB"]
    rows, gaps = [], []
    for label, s in summaries.items():
        tool, layout = ROWS[label]
        trl = next((summaries[t] for t, (tt, tl) in ROWS.items() if tt == "trl" and tl == layout and t in summaries))
        ratio = "-"
        if tool == "dpo-cli":  # TRL's time over ours, for the TRL row of the same layout: above 1 is faster
            wall, cpu = trl.seconds_per_step / s.seconds_per_step, trl.cpu_seconds_per_step / s.cpu_seconds_per_step
            ratio = f"{wall:.2f}x / {cpu:.2f}x"
        peak = f"{s.peak_step_mib:.1f}" if s.peak_step_mib is not None else "-"
        rows.append([label, f"{s.seconds_per_step:.3f}", f"{s.cpu_seconds_per_step:.3f}", f"{s.pairs_per_second:.1f}",
                     f"{s.tokens_per_second:,.0f}", ratio, peak])  # fmt: skip
        if tool == "dpo-cli":
            trl_label = next(t for t, (tt, tl) in ROWS.items() if tt == "trl" and tl == layout)
            ours, theirs = by_label[label][0].losses, by_label[trl_label][0].losses
            gap = max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True))
            gaps.append(f"{label} vs {trl_label}: largest relative loss gap {gap:.1e} over {len(ours)} steps")
    return benchlib.format_table(header, rows), gaps


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        _worker(*args.worker[:1], Path(args.worker[1]), Path(args.worker[2]))
        return
    device = benchlib.resolve_device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-bench-sft-"))
    workdir.mkdir(parents=True, exist_ok=True)
    examples = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in read_records(STORIES_DATA)]
    needed = (args.warmup + args.steps + 2) * args.batch_size
    data_path = ordered_data(examples, needed, args.seed, workdir / "ordered.jsonl")
    spec_of = {
        label: Spec(
            model_path=str(STORIES_MODEL),
            data_path=str(data_path),
            device=device.type,
            quantize=True,
            compute_dtype="auto",
            gradient_checkpointing=not args.no_gradient_checkpointing,
            batch_size=args.batch_size,
            max_length=args.max_length,
            lora_r=16,
            lora_alpha=32,
            lr=args.lr,
            beta=0.1,
            warmup=args.warmup,
            steps=args.steps,
            seed=args.seed,
            trl_lora_fp32=True,
            threads=args.threads,
            output_dir="",
            layout=layout,
        )  # fmt: skip
        for label, (_, layout) in ROWS.items()
    }
    machine = benchlib.machine_description(device, args.threads)
    print(f"SFT step benchmark on {device.type}: {machine}; work folder {workdir}")
    by_label: dict[str, list[WorkerResult]] = {label: [] for label in ROWS}
    for run in range(args.repeats):
        for label in list(ROWS) if run % 2 == 0 else reversed(list(ROWS)):
            by_label[label].append(_run_row(label, spec_of[label], workdir, run, args.timeout))
    digests = {label: results[0].digests for label, results in by_label.items()}
    if len({tuple(d) for d in digests.values()}) != 1:
        raise SystemExit(f"the rows did not see the same examples at every step: {digests}")
    spec = spec_of["dpo-cli padded"]
    table, gaps = _table(spec, by_label)
    loads = [x for results in by_label.values() for r in results for x in r.load_average]
    tokens = by_label["dpo-cli padded"][0].tokens_per_step[spec.warmup : spec.warmup + spec.steps]
    settings = (
        f"stories260K 4-bit NF4, float32 compute; LoRA r=16 alpha=32 all-linear; prompt/completion from "
        f"stories-happy (chosen), batch {spec.batch_size} examples, max_length {spec.max_length}, mean "
        f"{statistics.mean(tokens) / spec.batch_size:.0f} tokens per sequence; loss on the completion; lr {spec.lr:g} "
        f"constant, AdamW, grad clip 1.0; gradient checkpointing {'on' if spec.gradient_checkpointing else 'off'}; "
        f"{spec.warmup} warmup + {spec.steps} timed steps, {args.repeats} run(s) per row (median)"
    )
    print(f"\nsettings: {settings}\n1-min load average {min(loads):.1f}-{max(loads):.1f}\n\n{table}\n")
    print("\n".join(gaps))
    if args.write:
        command = benchlib.command_line("bench/bench_sft.py", sys.argv[1:] if argv is None else argv)
        block = (
            f"### {benchlib.today()}: `{command}`\n\n- machine: {machine}; {benchlib.library_versions()}; 1-min load "
            f"average {min(loads):.1f}-{max(loads):.1f} during the runs\n- code: {benchlib.code_version(REPO)}\n"
            f"- settings: {settings}\n- losses: " + "; ".join(gaps) + "\n- every row saw the same examples at every "
            "step (checked); peak step = peak of torch CPU allocations during one profiled step after timing\n\n"
            f"{table}\n"
        )
        section = f"SFT step vs TRL SFTTrainer ({'CUDA' if device.type == 'cuda' else 'CPU'})"
        benchlib.write_section_block(args.write, section, block)
        print(f"appended to section '{section}' of {args.write}")


if __name__ == "__main__":
    main()
