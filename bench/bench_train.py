"""Training-step benchmark: a dpo-cli run against TRL 1.16's DPOTrainer, same model, data and settings.

Each tool runs in its own subprocess (clean memory numbers, no shared caches): it loads the same base model the same
way (`dpo_cli.model.load.load_base_model`, 4-bit NF4 by default), adds the same LoRA adapter (`lora_config`), reads the
same preference file in the same order (a seeded shuffle written once by the parent, read sequentially by both), and
runs `--warmup` + `--steps` optimizer steps with the same batch size, max_length, learning rate, beta, constant
schedule, grad clipping and gradient checkpointing setting. dpo-cli runs as a user's run does (`build_run`, then
`fit`), TRL through `DPOTrainer.train()`, each with a callback that stamps the end of each optimizer step, so both
times include collation, reference and policy passes, backward, clipping and the optimizer. Throughput is measured
from the end of the last warmup step to the end of the last timed step.

Tokens are counted the same way for both: the non-padding tokens of the concatenated chosen + rejected rows of each
step. The parent checks that both tools saw exactly the same token ids at every step and stops if not.

Peak memory (see benchlib): on CUDA, the peak of torch allocations above the level at the start of the timed steps;
on CPU, the peak of torch CPU allocations during one extra step run under the profiler (after timing), plus the
worker's peak RSS for reference (it includes each library's import cost, which differs between the tools).

The parts: train_inputs.py (data and models), train_workers.py (the two workers), train_summary.py (figures, table).

`--layouts` gives one dpo-cli row per batch layout (each its own worker, every one checked to see the same token ids);
every dpo-cli row's loss is checked against TRL's at each step (`--loss-rtol`, `--later-loss-rtol`), after the
table prints, and a gap ends the run with exit 1 and one line naming the row and step.

Run:
    make bench                                              # compare_trl.py --preset cpu: stories260K 4-bit, HH
    python bench/bench_train.py                             # stories260K 4-bit, stories-happy pairs, CPU
    python bench/bench_train.py --model tiny --data tiny    # the built-in tiny model, no ../shared needed
    python bench/bench_train.py --model synthetic --data hh-synthetic --max-length 512 --batch-size 2
    python bench/bench_train.py --write                     # also append the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
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
from train_inputs import drop_long_prompts, ordered_data, resolve_model, source_records  # noqa: E402
from train_summary import Summary, check_same_work, loss_disagreements, max_loss_gaps, render, summarize  # noqa: E402
from train_workers import Spec, WorkerResult, worker_main  # noqa: E402

TOOLS = ("dpo-cli", "trl")
LAYOUTS = ("auto", "padded", "packed", "shared-prompt")
LOSS_RTOL = 1e-4
"""How far apart dpo-cli's and TRL's step-1 losses may be (relative). Step 1 runs from the same weights; with LoRA's
B at zero its loss is log 2 whatever the pairs, so later steps are checked too (train_summary.loss_disagreements)."""
LATER_LOSS_RTOL = 1e-3
"""The bound for every later step: measured gaps are 1e-6 on the tiny model and ~1e-4 on stories260K with HH at
512 tokens, where dpo-cli's layouts agree with each other to ~1e-5; a wrong pair, mask or gradient is far larger."""


def run_worker(tool: str, spec_path: Path, result_path: Path, label: str, timeout: int) -> WorkerResult:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(spec_path), str(result_path)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{label}: the worker ran past --timeout {timeout}s; use fewer --steps") from None
    if done.returncode != 0 or not result_path.exists():
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"{label}: the worker failed (exit {done.returncode}); its stderr is above")
    result = WorkerResult(**json.loads(result_path.read_text()))
    print(f"  {label:22s} {time.perf_counter() - started:4.0f}s (setup {result.setup_seconds:.0f}s)")
    return result


def _add_synthetic_model_args(parser: argparse.ArgumentParser) -> None:
    synthetic = parser.add_argument_group("--model synthetic (a random Llama built on the spot)")
    synthetic.add_argument("--hidden", type=int, default=512)
    synthetic.add_argument("--layers", type=int, default=4)
    synthetic.add_argument("--vocab", type=int, default=32000)
    synthetic.add_argument("--heads", type=int, default=0, help="0: hidden / 64")
    synthetic.add_argument("--kv-heads", type=int, default=0, help="0: heads / 4")
    synthetic.add_argument("--intermediate", type=int, default=0, help="0: 4 x hidden")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="stories260K", help="stories260K (default), tiny, synthetic, or a folder")
    parser.add_argument("--data", default="stories", help="stories (default), tiny, hh-synthetic, or a .jsonl file")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool, alternating order; medians reported")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (default 4)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept of prompt+completion (default 128)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="turn it off for both tools")
    parser.add_argument("--no-quantize", action="store_true", help="a plain base instead of 4-bit NF4, for both")
    parser.add_argument("--compute-dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, ...")
    parser.add_argument(
        "--trl-lora-dtype",
        default="float32",
        choices=("float32", "trl"),
        help="float32 (default): cast TRL's LoRA weights back to float32 like dpo-cli's; trl: keep TRL's bfloat16",
    )
    parser.add_argument("--tools", default=",".join(TOOLS), help="which of dpo-cli,trl to run")
    parser.add_argument(
        "--layouts",
        default="auto",
        help="dpo-cli batch layouts, one row each: a comma list of auto, padded, packed, shared-prompt (default auto)",
    )
    parser.add_argument(
        "--precompute-ref",
        action="store_true",
        help="dpo-cli: dpo.precompute_ref (reference scored once in setup, steps run only the policy)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="dpo-cli: model.compile (torch.compile of each decoder layer); the warmup steps pay the compile",
    )
    parser.add_argument(
        "--loss-rtol",
        type=float,
        default=LOSS_RTOL,
        help=f"fail when a dpo-cli row's step-1 loss differs from TRL's by more than this, relative (default "
        f"{LOSS_RTOL:g})",
    )
    parser.add_argument(
        "--later-loss-rtol",
        type=float,
        default=LATER_LOSS_RTOL,
        help=f"the same bound for every later step's loss (default {LATER_LOSS_RTOL:g})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per worker (0: torch's default). 1 is far steadier on a machine shared with other "
        "work: with more threads than free cores, OpenMP barriers wait on descheduled threads",
    )
    _add_synthetic_model_args(parser)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CPU: write each run's profiled step as an operator table (profile-TOOL-RUN.txt in the work folder)",
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds per worker run (default 600)")
    parser.add_argument("--workdir", type=Path, help="where the model, data and runs go (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the summaries and raw results as JSON here")
    parser.add_argument(
        "--write",
        nargs="?",
        const=benchlib.RESULTS,
        type=Path,
        help="append the table to the 'Training step vs TRL' section of a markdown file (default bench/RESULTS.md)",
    )
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.layouts = [name.strip() for name in args.layouts.split(",") if name.strip()]
    for name in args.layouts:
        if name not in LAYOUTS:
            parser.error(f"--layouts: unknown {name!r}; choose from {', '.join(LAYOUTS)}")
    if not args.layouts:
        parser.error("--layouts: name at least one layout")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (throughput is timed from the end of a warmup step)")
    return args


def _labels(args, tools: list[str]) -> dict[str, tuple[str, str]]:
    """{row label: (tool, dpo-cli layout)}: one dpo-cli row per `--layouts` entry, then TRL's."""
    labels = {}
    if "dpo-cli" in tools:
        for layout in args.layouts:
            labels[f"dpo-cli {layout}"] = ("dpo-cli", layout)
    if "trl" in tools:
        labels["trl"] = ("trl", "")
    return labels


def _specs(args, labels: dict[str, tuple[str, str]], model_path: str, data_path: Path, device) -> dict[str, Spec]:
    """One Spec per row, the same settings for each (the output folder and profile path are set per run)."""
    return {
        label: Spec(
            model_path=model_path,
            data_path=str(data_path),
            device=device.type,
            quantize=not args.no_quantize,
            compute_dtype=args.compute_dtype,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            batch_size=args.batch_size,
            max_length=args.max_length,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lr=args.lr,
            beta=args.beta,
            warmup=args.warmup,
            steps=args.steps,
            seed=args.seed,
            trl_lora_fp32=args.trl_lora_dtype == "float32",
            threads=args.threads,
            output_dir="",
            layout=layout or "auto",
            precompute_ref=args.precompute_ref,
            compile=args.compile,
        )
        for label, (_, layout) in labels.items()
    }


def _run_all(args, labels: dict[str, tuple[str, str]], specs: dict[str, Spec], workdir: Path):
    """`--repeats` runs of each row's worker, alternating which goes first; {label: results}."""
    by_label: dict[str, list[WorkerResult]] = {label: [] for label in labels}
    order = list(labels)
    for run in range(args.repeats):
        for label in order if run % 2 == 0 else reversed(order):
            tool, spec = labels[label][0], specs[label]
            name = f"{tool}-{spec.layout}-{run}" if tool == "dpo-cli" else f"{tool}-{run}"
            spec.output_dir = str(workdir / f"run-{name}")
            shutil.rmtree(spec.output_dir, ignore_errors=True)  # a rerun in the same --workdir starts clean
            spec.profile_path = str(workdir / f"profile-{name}.txt") if args.profile else ""
            spec_path = workdir / f"spec-{name}.json"
            spec_path.write_text(json.dumps(asdict(spec)))
            result_path = workdir / f"result-{name}.json"
            by_label[label].append(run_worker(tool, spec_path, result_path, label, args.timeout))
    return by_label


def _settings_line(args, spec: Spec, by_label: dict[str, list[WorkerResult]], device) -> str:
    reference = next(iter(by_label.values()))[0]
    tokens = reference.tokens_per_step[spec.warmup : spec.warmup + spec.steps]
    rows = 2 * spec.batch_size
    dtype = "bfloat16" if device.type == "cuda" and args.compute_dtype == "auto" else args.compute_dtype
    if dtype == "auto":
        dtype = "float32"
    notes = sorted({note for results in by_label.values() for r in results for note in r.notes})
    if args.compile:
        notes.append("dpo-cli: decoder layers torch.compiled (model.compile)")
    if args.precompute_ref:
        notes.append("dpo-cli: reference log-probs precomputed in setup (dpo.precompute_ref), steps run the policy")
    settings = (
        f"{'4-bit NF4 (double quant)' if spec.quantize else 'unquantized'} base, compute {dtype}; LoRA "
        f"r={spec.lora_r} alpha={spec.lora_alpha} all-linear, {reference.trainable_params:,} trainable; batch "
        f"{spec.batch_size} pairs ({rows} rows), max_length {spec.max_length}, mean "
        f"{statistics.mean(tokens) / rows:.0f} real tokens per row; lr {spec.lr:g} constant, beta {spec.beta:g}, "
        f"AdamW, grad clip 1.0; gradient checkpointing {'on' if spec.gradient_checkpointing else 'off'}; "
        f"{spec.warmup} warmup + {spec.steps} timed steps, {args.repeats} run(s) per tool (median)"
    )
    return settings + ("; " + "; ".join(notes) if notes else "")


def _write_block(args, argv, device, described: dict[str, str], table: str) -> None:
    """Appends the run's table and its settings to the 'Training step vs TRL' section of `--write`'s file."""
    memory_note = (
        "peak step = peak of torch CPU allocations during one profiled step after timing; RSS growth = the "
        "worker's peak RSS minus its RSS before the first step (model, adapter and data loaded); max RSS = the "
        "worker's peak RSS, which includes each tool's imports"
        if device.type == "cpu"
        else "peak step = torch.cuda.max_memory_allocated over the timed steps minus the allocation at their "
        "start; max allocated = torch.cuda.max_memory_allocated"
    )
    command = benchlib.command_line("bench/bench_train.py", sys.argv[1:] if argv is None else argv)
    block = (
        f"### {benchlib.today()}: `{command}`\n\n"
        f"- machine: {described['machine']}; {benchlib.library_versions()}; {described['load']}\n"
        f"- code: {described['code']}\n"
        f"- model: {described['model']}\n"
        f"- data: {described['data']}\n"
        f"- settings: {described['settings']}\n"
        f"- memory: {memory_note}\n"
        + (f"- losses: {described['losses']}\n" if "losses" in described else "")
        + "- every row saw identical token ids at every step (checked by the script); ratios are dpo-cli / TRL "
        "(higher is better for pairs/s and tokens/s, lower for s/step and memory)\n\n"
        f"{table}\n"
    )
    section = f"Training step vs TRL ({'CUDA' if device.type == 'cuda' else 'CPU'})"
    benchlib.write_section_block(args.write, section, block)
    print(f"\nappended to section '{section}' of {args.write}")


def _write_json(path: Path, described: dict[str, str], spec: Spec, summaries, by_label) -> None:
    payload = {
        "settings": described["settings"],
        "spec": asdict(spec),
        "machine": described["machine"],
        "code": described["code"],
        "model": described["model"],
        "data": described["data"],
        "summaries": {label: asdict(s) for label, s in summaries.items()},
        "results": {label: [asdict(r) for r in results] for label, results in by_label.items()},
    }
    path.write_text(json.dumps(payload, indent=1))


def _prepared_inputs(args, workdir: Path, device) -> tuple[str, Path, dict[str, str]]:
    """(model path, the ordered data file, what the model and data are in words)."""
    records, data_name = source_records(args, workdir)
    model_path, model_name = resolve_model(args, records, workdir, device.type)
    records, dropped = drop_long_prompts(records, model_path, args.max_length)
    if dropped:
        data_name += f", {dropped} pairs left out whose prompt fills max_length"
    pairs_needed = (args.warmup + args.steps + 1) * args.batch_size
    data_path = ordered_data(records, pairs_needed, args.seed, workdir / "ordered.jsonl")
    return model_path, data_path, {"model": model_name, "data": data_name}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        tool, spec_path, result_path = args.worker
        worker_main(tool, Path(spec_path), Path(result_path))
        return
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for tool in tools:
        if tool not in TOOLS:
            raise SystemExit(f"--tools: unknown {tool!r}; choose from {', '.join(TOOLS)}")
    device = benchlib.resolve_device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_path, data_path, described = _prepared_inputs(args, workdir, device)
    labels = _labels(args, tools)
    specs = _specs(args, labels, model_path, data_path, device)
    described.update(machine=benchlib.machine_description(device, args.threads), code=benchlib.code_version(REPO))
    print(f"training-step benchmark on {device.type}: {described['machine']}")
    print(f"model: {described['model']}; data: {described['data']}; work folder {workdir}")
    by_label = _run_all(args, labels, specs, workdir)
    check_same_work(by_label)

    spec = next(iter(specs.values()))
    summaries: dict[str, Summary] = {label: summarize(spec, results) for label, results in by_label.items()}
    described["settings"] = _settings_line(args, spec, by_label, device)
    loads = [x for results in by_label.values() for r in results for x in r.load_average]
    described["load"] = f"1-min load average {min(loads):.1f}-{max(loads):.1f} during the runs"
    table = render(summaries, device.type)
    print()
    print(f"settings: {described['settings']}")
    print(f"{described['code']}; {described['load']}")
    print("every row saw identical token ids at every step (checked)")
    print()
    print(table)
    gaps = max_loss_gaps(by_label)
    if gaps:
        described["losses"] = "relative gap to TRL's loss at step 1 / the largest at a later step: " + ", ".join(
            f"{label} {first:.1e} / {later:.1e}" for label, (first, later) in gaps.items()
        )
        limits = f"--loss-rtol {args.loss_rtol:g} / --later-loss-rtol {args.later_loss_rtol:g}"
        print(f"\n{described['losses']} (checked against {limits})")
    disagreements = loss_disagreements(by_label, args.loss_rtol, args.later_loss_rtol)
    if args.json:
        _write_json(args.json, described, spec, summaries, by_label)
    if disagreements:
        raise SystemExit("dpo-cli's and TRL's losses disagree: " + "; ".join(disagreements))
    if args.write:
        _write_block(args, argv, device, described, table)


if __name__ == "__main__":
    main()
