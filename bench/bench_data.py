"""Data pipeline benchmark: read, check and tokenize a generated preference JSONL; pairs/s, peak memory, rerun time.

A script, not a test. It writes `--pairs` explicit {"prompt","chosen","rejected"} records (story-like sentences of
random words, about 20/30/30 tokens, some with non-ASCII punctuation) to a temporary JSONL, then runs
`dpo_cli.run.data_report.load_split` on it exactly as `dpo-cli train` does, each phase in its own subprocess
so its memory is its own:

- cold: an empty cache, so the file is read, checked, written to Arrow and tokenized on all cores;
- warm: the same command again, which finds the prepared data in the cache (what a rerun of `train` waits for).

Peak memory is the peak resident set size (ru_maxrss) of the process and, separately, of its largest child process
(the tokenizing workers; loading a transformers tokenizer alone starts a ~230 MiB child, which is the figure when
no worker runs); `after imports` is the RSS before any data is read. RSS counts the pages of the memory-mapped Arrow
files that were touched, and forked workers count the pages they share with their parent. The machine's
load average is printed too: other processes on the same cores slow the cold phase down in proportion.

Run:
    python bench/bench_data.py                        # 1,000,000 pairs, ../shared/models/stories260K's tokenizer
    python bench/bench_data.py --pairs 100000 --max-length 128
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "stories260K"
WORDS = (
    "the a little big happy sad dog cat girl boy tree park ball sun rain went saw played ran jumped said was "
    "very and then with her his friend mom dad house garden bird fish red blue green day night toy box"
).split()
PUNCTUATION = [".", ".", ".", "!", "?", ",", " —", "…", "’s"]


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice(PUNCTUATION)


def write_pairs(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            record = {
                "prompt": sentence(rng, 12),
                "chosen": " " + sentence(rng, 18),
                "rejected": " " + sentence(rng, 18),
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    """One phase in this process: prints one JSON line of measurements."""
    os.environ["DPO_CLI_CACHE"] = args.cache
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    from dpo_cli.config import DataSection
    from dpo_cli.data.split import SplitRequest
    from dpo_cli.model.load import load_tokenizer
    from dpo_cli.run.data_report import load_split

    tokenizer = load_tokenizer(args.model)
    after_imports = current_rss_mib()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    request = SplitRequest([args.file], "train", DataSection(max_length=args.max_length))
    pairs, summary = load_split(tokenizer, request, Console(stderr=True))
    first = pairs[0]["chosen_ids"]  # touch the data, as the trainer's first step would
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "pairs": len(pairs),
                "seconds": seconds,
                "from_cache": summary.from_cache,
                "truncated": summary.truncated,
                "after_imports_mib": after_imports,
                "peak_mib": peak_rss_mib(resource.RUSAGE_SELF),
                "peak_child_mib": peak_rss_mib(resource.RUSAGE_CHILDREN),
                "first_chosen_tokens": len(first),
                "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            }
        )
    )


def run_phase(phase: str, args: argparse.Namespace, file: Path, cache: Path) -> dict:
    command = [sys.executable, __file__, "--worker", phase, "--file", str(file), "--cache", str(cache)]
    command += ["--model", str(args.model), "--max-length", str(args.max_length)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{phase} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder whose tokenizer is used")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model}: no model folder; pass --model PATH (any folder with a tokenizer)")
    with tempfile.TemporaryDirectory(prefix="dpo-cli-bench-data-") as folder:
        file, cache = Path(folder) / "pairs.jsonl", Path(folder) / "cache"
        started = time.perf_counter()
        write_pairs(file, args.pairs)
        size_mib = file.stat().st_size / 2**20
        print(f"wrote {args.pairs:,} pairs ({size_mib:.0f} MiB) in {time.perf_counter() - started:.1f} s")
        cold = run_phase("cold", args, file, cache)
        warm = run_phase("warm", args, file, cache)
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cores} CPU cores; tokenizer {args.model}; max_length {args.max_length}")
    for name, result in (("cold", cold), ("warm (cache)", warm)):
        print(
            f"{name:13s} {result['pairs']:,} pairs in {result['seconds']:.1f} s = "
            f"{result['pairs'] / result['seconds']:,.0f} pairs/s; RSS after imports {result['after_imports_mib']:.0f} "
            f"MiB, peak {result['peak_mib']:.0f} MiB, largest child peak {result['peak_child_mib']:.0f} MiB; "
            f"1-minute load average {result['load_average'][0]} before, {result['load_average'][1]} after"
        )


if __name__ == "__main__":
    main()
