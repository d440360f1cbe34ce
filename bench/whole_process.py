"""Whole-process benchmark: the real `dpo-cli train` command against a TRL 1.16 script doing the same job.

Each run is a fresh process, timed from its start to its exit: imports, model load, reading and tokenizing the data,
every training step, saving the adapter. Both read the same file of `--steps x --batch-size` preference pairs (taken
from the source data in the seeded order bench_train uses, read by dpo-cli's readers), for one epoch, so both train
exactly those pairs. Each tool runs first with an empty data cache (dpo-cli's prepared-data cache, `datasets`'
cache for TRL, both in a folder of the work folder) and then again with the cache its first run left ("warm").
Wall and CPU time (user + sys) and the peak RSS come from `os.wait4` on each child.

The TRL side is bench/trl_dpo_script.py (a TRL user's script: transformers 4-bit load, LoRA, DPOTrainer, save).

Run:
    python bench/compare_trl.py --whole-process                 # the cpu preset: stories260K 4-bit, HH, 512, batch 8
    python bench/whole_process.py --model tiny --data tiny --max-length 64 --batch-size 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import benchlib  # noqa: E402
from train_inputs import drop_long_prompts, resolve_model, source_records  # noqa: E402


@dataclass
class ProcessRun:
    name: str  # e.g. "dpo-cli (cold cache)"
    wall_seconds: float
    cpu_seconds: float  # user + sys of the child (and the children it waited for)
    max_rss_mib: float
    steps: int
    pairs: int
    first_loss: float
    last_loss: float
    load_average: float  # the 1-minute load average when the run started


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stories260K", help="stories260K (default), tiny or a model folder")
    parser.add_argument("--data", default="hh", help="hh (default), stories, tiny, hh-synthetic or a preference file")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps; the pairs are steps x batch size")
    parser.add_argument("--layout", default="auto", help="dpo-cli's --layout (default auto)")
    parser.add_argument("--dpo-cli-args", default="", help="more dpo-cli train options, e.g. '--compile'")
    parser.add_argument("--repeats", type=int, default=1, help="cold + warm runs of each tool, this many times")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both tools (default 1)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per process (default 900)")
    parser.add_argument("--workdir", type=Path, help="default: a temp folder")
    parser.add_argument("--write", nargs="?", const=benchlib.RESULTS, type=Path, help="append the table there")
    # bench_train's synthetic-model options are not offered: a whole process is about a model on disk.
    args = parser.parse_args(argv)
    args.hidden = args.layers = args.vocab = args.heads = args.kv_heads = args.intermediate = 0
    return args


def job_pairs(args, workdir: Path) -> tuple[Path, str, str]:
    """(the JSONL of exactly steps x batch pairs both tools train on, the model path, what the data is)."""
    records, described = source_records(args, workdir)
    model_path, _ = resolve_model(args, records, workdir, "cpu")
    records, dropped = drop_long_prompts(records, model_path, args.max_length)
    needed = args.steps * args.batch_size
    order = list(range(len(records)))
    random.Random(args.seed).shuffle(order)
    if len(order) < needed:
        raise SystemExit(f"{described}: {len(order)} usable pairs, {needed} needed; lower --steps")
    path = workdir / "pairs.jsonl"
    lines = [json.dumps(records[i], ensure_ascii=False) + "\n" for i in order[:needed]]
    path.write_text("".join(lines), encoding="utf-8")
    if dropped:
        described += f", {dropped} left out whose prompt fills max_length"
    return path, model_path, f"{needed} pairs of {described}"


def timed_process(name: str, command: list[str], env: dict[str, str], timeout: int) -> tuple[float, float, float]:
    """(wall s, CPU s, max RSS MiB) of one child process, from its start to its exit; its output goes to a log."""
    log_path = Path(env["BENCH_LOG"])
    with open(log_path, "w") as log:
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                child.kill()
                os.wait4(child.pid, 0)
                raise SystemExit(f"{name}: ran past --timeout {timeout}s; see {log_path}")
            time.sleep(0.05)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise SystemExit(f"{name}: exit {child.returncode}; its output is above ({log_path})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _env(args, workdir: Path, tool: str, log: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), BENCH_LOG=str(log))
    cache = workdir / f"cache-{tool}"
    env.update(DPO_CLI_CACHE=str(cache), HF_DATASETS_CACHE=str(cache / "datasets"))
    return env


def run_dpo_cli(args, model_path: str, data: Path, workdir: Path, name: str) -> ProcessRun:
    out = workdir / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "dpo_cli", "train", "--model", model_path, "--data", str(data)]
    command += ["--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--epochs", "1"]
    command += ["--layout", args.layout, "--output-dir", str(out), "--seed", str(args.seed)]
    command += ["--set", "training.scheduler=constant", "--set", "training.warmup_ratio=0"]
    command += ["--set", "training.save_steps=0", *args.dpo_cli_args.split()]
    load = os.getloadavg()[0]
    wall, cpu, rss = timed_process(name, command, _env(args, workdir, "dpo-cli", workdir / f"{name}.log"), args.timeout)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line and '"step"' in line]
    steps = len(losses)
    return ProcessRun(name, wall, cpu, rss, steps, steps * args.batch_size, losses[0], losses[-1], load)


def run_trl(args, model_path: str, data: Path, workdir: Path, name: str) -> ProcessRun:
    out = workdir / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(BENCH / "trl_dpo_script.py"), "--model", model_path, "--data", str(data)]
    command += ["--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--epochs", "1"]
    command += ["--output-dir", str(out), "--seed", str(args.seed)]
    load = os.getloadavg()[0]
    wall, cpu, rss = timed_process(name, command, _env(args, workdir, "trl", workdir / f"{name}.log"), args.timeout)
    summary = json.loads((out / "whole-process.json").read_text())
    losses = summary["losses"]
    return ProcessRun(name, wall, cpu, rss, summary["steps"], summary["pairs"], losses[0], losses[-1], load)


def render(runs: list[ProcessRun]) -> str:
    header = ["run", "wall s", "CPU s (user+sys)", "max RSS MiB", "steps", "pairs", "loss step 1 → last", "load"]
    rows = [
        [
            r.name,
            f"{r.wall_seconds:.1f}",
            f"{r.cpu_seconds:.1f}",
            f"{r.max_rss_mib:,.0f}",
            str(r.steps),
            str(r.pairs),
            f"{r.first_loss:.4f} → {r.last_loss:.4f}",
            f"{r.load_average:.1f}",
        ]
        for r in runs
    ]
    for cache in ("cold", "warm"):
        ours = [r for r in runs if r.name.startswith("dpo-cli") and cache in r.name]
        theirs = [r for r in runs if r.name.startswith("TRL") and cache in r.name]
        if ours and theirs:

            def median_ratio(key, ours=ours, theirs=theirs):
                a = statistics.median(getattr(r, key) for r in ours)
                b = statistics.median(getattr(r, key) for r in theirs)
                return f"{a / b:.2f}x"

            ratios = [median_ratio(k) for k in ("wall_seconds", "cpu_seconds", "max_rss_mib")]
            rows.append([f"**dpo-cli / TRL, {cache} cache**", *ratios, "", "", "", ""])
            speed_ups = [median_ratio(k, theirs, ours) for k in ("wall_seconds", "cpu_seconds")]
            rows.append([f"**speed-up (TRL s / dpo-cli s), {cache} cache**", *speed_ups, "", "", "", "", ""])
    return benchlib.format_table(header, rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-whole-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for tool in ("dpo-cli", "trl"):
        shutil.rmtree(workdir / f"cache-{tool}", ignore_errors=True)  # the first run of each is cold
    data, model_path, described = job_pairs(args, workdir)
    print(f"whole-process benchmark: {benchlib.machine_description(benchlib.resolve_device('cpu'), args.threads)}")
    print(f"model {model_path}; data: {described}; work folder {workdir}")
    runs: list[ProcessRun] = []
    for repeat in range(args.repeats):
        for cache in ("cold", "warm"):
            if cache == "cold" and repeat:
                for tool in ("dpo-cli", "trl"):
                    shutil.rmtree(workdir / f"cache-{tool}", ignore_errors=True)
            pair = [("dpo-cli", run_dpo_cli), ("TRL", run_trl)]
            for tool, runner in pair if (repeat + (cache == "warm")) % 2 == 0 else reversed(pair):
                name = f"{tool} ({cache} cache)" + (f" #{repeat + 1}" if args.repeats > 1 else "")
                runs.append(runner(args, model_path, data, workdir, re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")))
                runs[-1].name = name
                print(f"  {name}: {runs[-1].wall_seconds:.1f}s wall, {runs[-1].cpu_seconds:.1f}s CPU")
    pairs = {r.pairs for r in runs}
    if len(pairs) != 1:
        raise SystemExit(f"the runs trained different numbers of pairs: {sorted(pairs)}")
    table = render(runs)
    print()
    print(table)
    if args.write:
        command = benchlib.command_line("bench/whole_process.py", sys.argv[1:] if argv is None else argv)
        block = (
            f"### {benchlib.today()}: `{command}`\n\n"
            f"- machine: {benchlib.machine_description(benchlib.resolve_device('cpu'), args.threads)}; "
            f"{benchlib.library_versions()}\n- code: {benchlib.code_version(REPO)}\n- model: {model_path}\n"
            f"- data: {described}; max_length {args.max_length}, batch {args.batch_size}, one epoch; dpo-cli "
            f"--layout {args.layout} {args.dpo_cli_args}\n- load: the 1-minute load average as each run started\n\n"
            f"{table}\n"
        )
        benchlib.write_section_block(args.write, "Whole process vs TRL (CPU)", block)
    (workdir / "whole-process.json").write_text(json.dumps([asdict(r) for r in runs], indent=1))


if __name__ == "__main__":
    main()
