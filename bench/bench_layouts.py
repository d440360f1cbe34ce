"""Same-process A/B of the batch layouts: one training micro-batch (reference pass, policy pass, backward) in each.

Loads one model with a seeded random LoRA adapter, tokenizes real preference pairs, and times `score_batch` +
backward on the same micro-batches in every layout, round-robin (layout order rotated per round) so a slow moment
of a shared machine hits every layout alike. Prints per layout the median seconds per micro-batch, the tokens the
rows hold (real ones, and slots: rows x width), wall and CPU time, and the largest loss difference from padded
(they must agree).

Run:
    python bench/bench_layouts.py                        # stories260K 4-bit, HH-RLHF helpful-base, max_length 512
    python bench/bench_layouts.py --batches 4 --rounds 5 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("DPO_CLI_SHARED", REPO.parent / "shared"))
LAYOUTS = ("padded", "packed", "shared-prompt")


def load(args):
    import torch

    from dpo_cli.config import DataSection, LoraSection, ModelSection
    from dpo_cli.data.load import load_tokenized_split
    from dpo_cli.data.split import SplitRequest
    from dpo_cli.model.load import add_lora, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    cache = tempfile.mkdtemp(prefix="bench-layouts-")  # prepared data stays out of the user's cache
    data = DataSection(train=[args.data], on_invalid="skip", cache_dir=cache, max_length=args.max_length)
    pairs, _ = load_tokenized_split(tokenizer, SplitRequest([args.data], "train", data))
    base = load_base_model(ModelSection(path=args.model, gradient_checkpointing=False), torch.device("cpu"))
    model = add_lora(base, LoraSection(), gradient_checkpointing=args.gradient_checkpointing)
    model.train()
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_" in name:  # policy != reference, so the losses are not all log 2
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    return tokenizer, pairs, model


def one_micro_batch(model, batch, dpo) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss): CPU time stays steady when other work shares the CPU."""
    from dpo_cli.dpo.scoring import score_batch
    from dpo_cli.model.load import scoring_model

    started, started_cpu = time.perf_counter(), time.process_time()
    scores = score_batch(scoring_model(model), batch, dpo)
    scores.loss.backward()
    elapsed, elapsed_cpu = time.perf_counter() - started, time.process_time() - started_cpu
    model.zero_grad(set_to_none=True)
    return elapsed, elapsed_cpu, float(scores.loss.detach())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--data", default=str(SHARED / "data" / "hh-rlhf" / "helpful-base-test.jsonl.gz"))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as training does by default")
    args = parser.parse_args(argv)

    import torch

    from dpo_cli.config import DpoSection
    from dpo_cli.dpo.layouts import collate

    torch.manual_seed(0)
    tokenizer, pairs, model = load(args)
    dpo = DpoSection()
    batches = {
        layout: [
            collate(layout, [pairs[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)], 0)
            for b in range(args.batches)
        ]
        for layout in LAYOUTS
    }
    times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    cpu_times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
    losses: dict[str, list[float]] = {layout: [0.0] * args.batches for layout in LAYOUTS}
    for layout in LAYOUTS:  # warm-up, not timed
        one_micro_batch(model, batches[layout][0], dpo)
    for round_ in range(args.rounds):
        order = LAYOUTS[round_ % 3 :] + LAYOUTS[: round_ % 3]
        for b in range(args.batches):
            for layout in order:
                elapsed, elapsed_cpu, loss = one_micro_batch(model, batches[layout][b], dpo)
                times[layout].append(elapsed)
                cpu_times[layout].append(elapsed_cpu)
                losses[layout][b] = loss
    threads = torch.get_num_threads()
    print(f"{args.model} 4-bit, {args.data}, max_length {args.max_length}, {args.batch_size} pairs per micro-batch,")
    checkpointing = "on" if args.gradient_checkpointing else "off"
    print(f"{args.batches} micro-batches x {args.rounds} rounds, torch threads {threads}, gradient checkpointing")
    print(f"{checkpointing}; each timed: reference pass + policy pass + backward")
    print("layout         rows x width   real tok  slots  median wall s  vs padded  median CPU s  vs padded  loss gap")
    padded_wall, padded_cpu = statistics.median(times["padded"]), statistics.median(cpu_times["padded"])
    for layout in LAYOUTS:
        shapes = [tuple(batch.input_ids.shape) for batch in batches[layout]]
        real = sum(int(batch.attention_mask.sum()) for batch in batches[layout])
        slots = sum(rows * width for rows, width in shapes)
        wall, cpu = statistics.median(times[layout]), statistics.median(cpu_times[layout])
        gap = max(abs(a - b) for a, b in zip(losses[layout], losses["padded"], strict=True))
        shape_text = " ".join(f"{r}x{w}" for r, w in shapes[:2])
        print(
            f"{layout:14} {shape_text:14} {real:8d} {slots:6d} {wall:14.3f} {padded_wall / wall:9.2f}x"
            f" {cpu:13.3f} {padded_cpu / cpu:9.2f}x  {gap:.1e}"
        )


if __name__ == "__main__":
    main()
