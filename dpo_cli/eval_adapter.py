"""`dpo-cli eval`: a trained adapter scored on held-out preference pairs.

    dpo-cli eval --adapter runs/happy --data test.jsonl --output eval.json --per-example pairs.jsonl

The policy is the base + adapter, the reference the same base with the adapter off, loaded as training loaded them.
The metrics come from `evaluate_pairs`, the function training's eval steps use, so they carry TRL's names and are
computed exactly as the optimizer saw them. `--generate N` also samples N prompts from policy and reference.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dpo_cli.attention import resolve_layout
from dpo_cli.errors import UserError
from dpo_cli.evaluate import evaluate_pairs
from dpo_cli.files import write_text_atomic
from dpo_cli.generate import distinct_prompts, sample_side_by_side
from dpo_cli.tokenization import load_tokenized_split
from dpo_cli.trained_adapter import load_base_tokenizer, load_policy, open_adapter


@dataclasses.dataclass
class EvalOptions:
    adapter: Path
    data: list[str]
    model: str | None = None
    """Base model; None: the one in the adapter's recipe."""
    batch_size: int | None = None
    """Pairs per forward pass; None: the recipe's training.eval_batch_size."""
    max_length: int | None = None
    """None: the recipe's data.max_length, as in training."""
    output: Path | None = None
    per_example: Path | None = None
    generate: int = 0
    max_new_tokens: int = 64
    samples: Path | None = None
    seed: int = 0
    reading: dict[str, str] = dataclasses.field(default_factory=dict)
    """Data reading settings (format, columns, on_invalid, chat_template) over the training run's."""

    def check(self) -> None:
        if not self.data:
            raise UserError("no data to evaluate: pass --data FILE (repeatable)")
        for flag, value in (("--batch-size", self.batch_size), ("--max-length", self.max_length)):
            if value is not None and value <= 0:
                raise UserError(f"{flag} {value}: must be positive")
        if self.generate < 0:
            raise UserError(f"--generate {self.generate}: must be 0 (no samples) or a number of prompts")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: must be positive")
        if self.generate and self.samples is None:
            raise UserError("--generate needs --samples FILE.jsonl: the file the side-by-side samples are written to")
        for flag, path in (("--output", self.output), ("--per-example", self.per_example), ("--samples", self.samples)):
            if path is not None and Path(path).is_dir():
                raise UserError(f"{flag} {path}: is a folder; pass a file path")


@contextmanager
def _advancing(label: str, total: int, console: Console) -> Iterator:
    """A progress bar over `total` items; yields the callback that advances it."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.advance(task, done)


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, str(value) if isinstance(value, int) else f"{value:.4f}")
    return table


# Generated text can hold the characters that str.splitlines() also breaks lines on (json.dumps escapes the others);
# escaping them keeps one record per line for every reader while the rest of the text stays readable.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def write_jsonl(path: Path, rows: list[dict]) -> None:
    lines = (json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS) + "\n" for row in rows)
    write_text_atomic(path, "".join(lines))


def _skipped_records_dir(options: EvalOptions) -> Path:
    """Under --on-invalid skip, skipped-eval.jsonl goes beside eval's first output file, else the current folder."""
    for path in (options.output, options.per_example, options.samples):
        if path is not None:
            return Path(path).parent
    return Path.cwd()


def run_eval(options: EvalOptions, console: Console) -> dict:
    """Evaluate, print the table, write the requested files; returns what `--output` holds."""
    options.check()
    adapter = open_adapter(options.adapter, options.model, console)
    recipe = adapter.recipe
    batch_size = options.batch_size or recipe.training.eval_batch_size
    max_length = options.max_length or recipe.data.max_length
    tokenizer = load_base_tokenizer(adapter)
    # Data before the model: a bad line should not wait for a large base to load.
    paths = [str(p) for p in options.data]
    reading = dataclasses.replace(recipe.data, train=[], eval=paths, eval_split=0.0, **options.reading)
    pairs, _ = load_tokenized_split(
        tokenizer, paths, max_length, "eval", console, reading, _skipped_records_dir(options), with_sources=True
    )
    model = load_policy(adapter)
    layout, fallback_note = resolve_layout(recipe.data.layout, model, max_length)
    if fallback_note:
        console.print(fallback_note)

    per_pair: list[dict] | None = [] if options.per_example is not None else None
    with _advancing("eval", len(pairs), console) as advance:
        metrics = evaluate_pairs(
            model, pairs, tokenizer.pad_token_id, recipe.dpo, batch_size, advance, per_pair, layout=layout
        )
    console.print(metrics_table(metrics, f"{adapter.path} on {len(pairs)} pairs (beta {recipe.dpo.beta})"))

    result = {
        "adapter": str(adapter.path),
        "model": adapter.base_path,
        "data": paths,
        "max_length": max_length,
        "dpo": dataclasses.asdict(recipe.dpo),
        "metrics": metrics,
    }
    if options.output is not None:
        write_text_atomic(options.output, json.dumps(result, indent=2) + "\n")
        console.print(f"metrics written to {options.output}")
    if per_pair is not None:
        sources = list(pairs["source"])
        write_jsonl(options.per_example, [{"source": sources[row["index"]], **row} for row in per_pair])
        wrong = sum(not row["correct"] for row in per_pair)
        console.print(f"{len(per_pair)} per-pair results ({wrong} ranked wrong) written to {options.per_example}")
    if options.generate:
        indices = distinct_prompts(pairs, options.generate)
        with _advancing("sample", len(indices), console) as advance:
            rows = sample_side_by_side(
                model, tokenizer, pairs, indices, options.max_new_tokens, options.seed, batch_size, advance
            )
        write_jsonl(options.samples, rows)
        console.print(f"{len(rows)} prompts sampled from policy and reference, written to {options.samples}")
    return result
