"""Memory per process of `dpo-cli train` on one process, two with `--sharding ddp`, and two with `--sharding fsdp`.

    python bench/bench_sharding.py                       # CPU, a synthetic 4-bit Llama of ~210M parameters
    python bench/bench_sharding.py --device cuda --layers 16 --hidden 2048 --intermediate 8192   # on 2 GPUs

Builds a synthetic Llama (random weights, stories260K's tokenizer and so its 512-token vocabulary, so that the decoder
layers hold nearly all the weights), saves it under --workdir, and runs the real command line (`dpo_cli.cli.main`,
under `torch.distributed.run` for two processes) for one optimizer step on stories-happy pairs. A callback added to
the run's own reports, per process: the bytes of the frozen base weights it holds once the run is set up (its
shard, under fsdp), the peak RSS by then (loading, quantizing and sharding included), the peak RSS from then to the
end (the training step and the final save; Linux's VmHWM, reset through /proc/self/clear_refs), and on CUDA the peak
of torch's allocations on the device in setup (rank 0 loads the whole base into host memory under fsdp, so this is
its slices, one decoder layer whole at a time, and the reference scoring) and in training. `--write` appends the table
to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "stories-happy" / "train.jsonl"
MIB = 2**20
CONFIGS = {"1 process": (1, "ddp"), "2 processes ddp": (2, "ddp"), "2 processes fsdp": (2, "fsdp")}


def build_model(folder: Path, args) -> int:
    """A Llama of random weights saved in bf16 with stories260K's tokenizer; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    count = sum(p.numel() for p in model.parameters())
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER / name, folder / name)
    return count


def run_config(name: str, processes: int, sharding: str, model: Path, workdir: Path, device: str) -> list[dict]:
    out = workdir / name.replace(" ", "").replace(",", "-")
    shutil.rmtree(out, ignore_errors=True)
    train = ["--model", str(model), "--data", str(DATA), "--output-dir", str(out), "--max-steps", "1"]
    train += ["--batch-size", "1", "--max-length", "64", "--sharding", sharding, "--set", f"model.device={device}"]
    worker = [str(Path(__file__).resolve()), "--worker", str(workdir / f"{out.name}.rank"), *train]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command += worker
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{name}: exit {result.returncode}\n{(result.stdout + result.stderr)[-3000:]}")
    seconds = time.perf_counter() - started
    ranks = [json.loads(Path(f"{workdir / out.name}.rank{r}").read_text()) for r in range(processes)]
    return [{**rank, "seconds": seconds} for rank in ranks]


def worker(prefix: str, train_args: list[str]) -> None:
    """One process of a run: `dpo-cli train`, with a callback that writes this process's memory to PREFIX{rank}."""
    import torch

    from dpo_cli.cli import main
    from dpo_cli.run import distributed, loop, sharding
    from dpo_cli.run.callbacks import Callback

    def peak_rss() -> int:
        """Peak resident memory since the start or the last reset (Linux's VmHWM), in bytes."""
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024

    class Measure(Callback):
        def on_loop_start(self, run) -> None:
            frozen = [p for p in run.model.parameters() if not p.requires_grad]
            self.record = {
                "base_bytes": sum(sharding.local_part(p).numel() * p.element_size() for p in frozen),
                "peak_rss_setup": peak_rss(),
            }
            Path("/proc/self/clear_refs").write_text("5")  # the peak from here on is training's alone
            if torch.cuda.is_available() and run.device.type == "cuda":  # what setup put on the device at most
                self.record["cuda_peak_setup"] = torch.cuda.max_memory_allocated(run.device)
                torch.cuda.reset_peak_memory_stats(run.device)

        def on_end(self, run, result) -> None:
            self.record["peak_rss_training"] = peak_rss()
            if torch.cuda.is_available() and run.device.type == "cuda":
                self.record["cuda_peak"] = torch.cuda.max_memory_allocated(run.device)
            Path(f"{prefix}{distributed.rank()}").write_text(json.dumps(self.record))

    defaults = loop.default_callbacks
    loop.default_callbacks = lambda run, console, *more: [*defaults(run, console, *more), Measure()]
    sys.argv = ["dpo-cli", "train", *train_args]
    main()


def table(rows: dict[str, list[dict]], params: int, args) -> str:
    cuda = any("cuda_peak" in rank for ranks in rows.values() for rank in ranks)
    lines = [
        f"Synthetic Llama, {params / 1e6:.0f}M parameters (hidden {args.hidden}, {args.layers} layers, intermediate "
        f"{args.intermediate}, vocab 512, untied head), 4-bit NF4, LoRA r16 all-linear, one step of 1 pair at "
        f"max_length 64, {args.device}. Per process (rank 0 / rank 1):",
        "",
        "| run | base weights held | peak RSS in setup (load, quantize, shard) | peak RSS in training (after setup) |"
        + (" CUDA peak in setup | CUDA peak in training |" if cuda else "")
        + " wall s |",
        "|---|---|---|---|" + ("---|---|" if cuda else "") + "---|",
    ]
    for name, ranks in rows.items():

        def each(key: str, ranks=ranks) -> str:
            return " / ".join(f"{rank[key] / MIB:,.0f} MiB" for rank in ranks)

        cells = [name, each("base_bytes"), each("peak_rss_setup"), each("peak_rss_training")]
        if cuda:
            cells += [each("cuda_peak_setup"), each("cuda_peak")]
        cells.append(f"{ranks[0]['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of CONFIGS to run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-sharding"))
    parser.add_argument("--write", type=Path, nargs="?", const=ROOT / "bench" / "RESULTS.md", default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / f"llama-{args.hidden}x{args.layers}"
    params = build_model(model, args)
    rows = {}
    for name in args.configs.split(","):
        processes, sharding = CONFIGS[name]
        rows[name] = run_config(name, processes, sharding, model, args.workdir, args.device)
        print(name, rows[name], flush=True)
    text = table(rows, params, args)
    print(text)
    if args.write:
        with args.write.open("a", encoding="utf-8") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
