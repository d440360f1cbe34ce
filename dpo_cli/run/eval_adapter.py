"""`dpo-cli eval`: a trained adapter scored on held-out preference pairs.

    dpo-cli eval --adapter runs/happy --data test.jsonl --output eval.json --per-example pairs.jsonl

The policy is the base + adapter, the reference the same base with the adapter off, loaded as training loaded them.
The metrics come from `evaluate_pairs`, the function training's eval steps use, so they carry TRL's names and are
computed exactly as the optimizer saw them. `--generate N` also samples N prompts from policy and reference.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dpo_cli.config import reference_adapter_of
from dpo_cli.data.split import SplitRequest
from dpo_cli.data.templates import template_file
from dpo_cli.errors import UserError
from dpo_cli.files import standard_json, write_text_atomic
from dpo_cli.model.adapter import load_base_tokenizer, open_adapter
from dpo_cli.model.attention_support import resolve_layout
from dpo_cli.model.reference_adapter import load_policy_and_reference, reference_copy_of
from dpo_cli.output_folder import check_placeable, is_replaceable_output, is_within
from dpo_cli.run.data_report import load_split
from dpo_cli.run.evaluate import evaluate_pairs
from dpo_cli.run.generate import distinct_prompts, new_token_budget, sample_side_by_side
from dpo_cli.run.reference import SplitPairs, split_reference_logps


@dataclasses.dataclass
class EvalOptions:
    adapter: Path
    overrides: dict[str, dict] = dataclasses.field(default_factory=dict)
    """Recipe settings over the adapter's recipe.yaml, from the flags and --set: data.eval (the files to score),
    model.path (another base), training.eval_batch_size, data.max_length and the reading settings, dpo.*."""
    output: Path | None = None
    per_example: Path | None = None
    generate: int = 0
    max_new_tokens: int = 64
    samples: Path | None = None
    seed: int = 0
    trust_remote_code: bool = False
    """From --trust-remote-code on this command line; the adapter's recipe never grants it."""
    sample_scorer: Callable | None = None
    """With --reward: `(model, tokenizer, recipe, advance) -> (metrics, rows)` samples --generate prompts from policy
    and reference and scores them (dpo_cli.online.policy_eval); rows carry `source` and go to --samples."""

    @property
    def data(self) -> list[str]:
        return [str(path) for path in self.overrides.get("data", {}).get("eval", [])]

    def recipe_overrides(self) -> dict[str, dict]:
        """The overrides with the training run's data left out: eval reads only its own files, with no split."""
        data = {**self.overrides.get("data", {}), "train": [], "eval": self.data, "eval_split": 0.0}
        return {**self.overrides, "data": data}

    def outputs(self) -> list[tuple[str, Path]]:
        """(flag, path) of each file this evaluation will write."""
        named = (("--output", self.output), ("--per-example", self.per_example), ("--samples", self.samples))
        return [(flag, Path(path)) for flag, path in named if path is not None]

    def check(self) -> None:
        if not self.data:
            raise UserError("no data to evaluate: pass --data FILE (repeatable)")
        if self.generate < 0:
            raise UserError(f"--generate {self.generate}: must be 0 (no samples) or a number of prompts")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens {self.max_new_tokens}: must be positive")
        if self.generate and self.samples is None and self.sample_scorer is None:
            raise UserError("--generate needs --samples FILE.jsonl: the file the side-by-side samples are written to")
        self.check_outputs()

    def check_outputs(self) -> None:
        """Each output file can be written and replaces nothing but an earlier output of its kind; no two coincide."""
        inputs = [*self.data, template_file(str(self.overrides.get("data", {}).get("chat_template", "")))]
        seen: dict[Path, str] = {}
        for flag, path in self.outputs():
            if path.is_dir():
                raise UserError(f"{flag} {path}: is a folder; pass a file path")
            check_placeable(path, flag)
            if path.resolve() in seen:
                raise UserError(f"{flag} {path}: is also {seen[path.resolve()]}; give each output its own file")
            seen[path.resolve()] = flag
            if any(source and is_within(path, source) for source in inputs):
                raise UserError(f"{flag} {path}: is an input file of this evaluation; pick another path")
            if not is_replaceable_output(path, flag):
                raise UserError(
                    f"{flag} {path}: exists and is not an earlier `dpo-cli eval {flag}` file; dpo-cli replaces only "
                    "its own outputs, pick another path"
                )

    def check_outputs_outside(self, folder: Path | str, what: str) -> None:
        """No output lands in the adapter's or the base model's folder."""
        if not folder or not Path(folder).is_dir():
            return
        for flag, path in self.outputs():
            if is_within(path, folder):
                raise UserError(f"{flag} {path}: is inside {what} {folder}; pick a path outside it")


@contextmanager
def _advancing(label: str, total: int, console: Console) -> Iterator:
    """A progress bar over `total` items; yields the callback that advances it."""
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.advance(task, done)


def metrics_table(metrics: dict[str, float]) -> Table:
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, str(value) if isinstance(value, int) else f"{value:.4f}")
    return table


# Generated text can hold the characters that str.splitlines() also breaks lines on (json.dumps escapes the others);
# escaping them keeps one record per line for every reader while the rest of the text stays readable.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def write_jsonl(path: Path, rows: list[dict]) -> None:
    rows = standard_json(rows)  # NaN and infinity are not JSON: null
    lines = (json.dumps(row, ensure_ascii=False, allow_nan=False).translate(_LINE_BREAKS) + "\n" for row in rows)
    write_text_atomic(path, "".join(lines))


SKIPPED_FILE = "skipped-eval.jsonl"
_PLACES_SHOWN = 20


def skipped_records_dir(options: EvalOptions) -> Path | None:
    """Under --on-invalid skip, skipped-eval.jsonl goes beside eval's first output file; with none, nowhere."""
    outputs = options.outputs()
    return outputs[0][1].parent if outputs else None


def _check_skipped_file(options: EvalOptions, folder: Path | None) -> None:
    """skipped-eval.jsonl, beside the first output, replaces neither an output, an input nor a user's file."""
    if folder is None:
        return
    path = folder / SKIPPED_FILE
    taken = [str(named) for _, named in options.outputs()] + list(options.data)
    if any(is_within(path, other) for other in taken):
        raise UserError(f"{path}: is where --on-invalid skip writes the skipped records; name your file otherwise")
    if not is_replaceable_output(path, "skipped"):
        raise UserError(
            f"{folder / SKIPPED_FILE}: exists and is not an earlier dpo-cli skipped-records file; --on-invalid skip "
            "would replace it, so write the outputs to another folder"
        )


def _print_skipped_places(summary, console: Console) -> None:
    """With no output file there is no place to write skipped records: say where each one is instead."""
    places = [f"{record.source} ({record.reason})" for record in summary.skipped]
    more = f", and {len(places) - _PLACES_SHOWN:,} more" if len(places) > _PLACES_SHOWN else ""
    console.print(
        f"skipped records, not written anywhere (pass --output or --per-example to get {SKIPPED_FILE} beside it): "
        + ", ".join(places[:_PLACES_SHOWN])
        + more,
        style="yellow",
        markup=False,
    )


@dataclasses.dataclass
class EvalReport:
    result: dict
    """What --output holds: adapter, model, data, max_length, the dpo settings scored under, metrics."""
    written: list[str]
    """One line per file written, saying what is in it."""


def run_eval(options: EvalOptions, console: Console) -> EvalReport:
    """Evaluate and write the requested files; `console` shows progress, the command prints the report."""
    options.check()
    overrides = options.recipe_overrides()
    adapter = open_adapter(options.adapter, None, console, options.trust_remote_code, overrides)
    options.check_outputs_outside(adapter.path, "the adapter folder")
    options.check_outputs_outside(adapter.base_path, "the base model's folder")
    recipe = adapter.recipe
    batch_size, max_length = recipe.training.eval_batch_size, recipe.data.max_length
    reading, paths = recipe.data, recipe.data.eval
    skipped_dir = skipped_records_dir(options) if reading.on_invalid == "skip" else None
    _check_skipped_file(options, skipped_dir)
    tokenizer = load_base_tokenizer(adapter)
    # Data before the model: a bad line should not wait for a large base to load.
    request = SplitRequest(paths, "eval", reading, skipped_dir, with_sources=True)
    pairs, summary = load_split(tokenizer, request, console)
    if summary.skipped and skipped_dir is None:
        _print_skipped_places(summary, console)
    model = load_policy_and_reference(adapter)  # a run started --from-adapter: against its reference-adapter/
    layout, fallback_note = resolve_layout(recipe.data.layout, model, max_length)
    if fallback_note:
        console.print(fallback_note)

    # Read from the reference cache when a run (or an earlier eval) scored these pairs against this base, else
    # scored once here and cached, which costs what the live pass would: either way each batch runs only the policy.
    split = SplitPairs("eval", pairs, summary.pairs_key, tokenizer.pad_token_id, layout, batch_size)
    ref_logps = split_reference_logps(recipe, model, split, True, console)
    per_pair: list[dict] | None = [] if options.per_example is not None else None
    with _advancing("eval", len(pairs), console) as advance:
        metrics = evaluate_pairs(
            model, pairs, tokenizer.pad_token_id, recipe.dpo, batch_size, advance, per_pair, layout, ref_logps
        )
    result = {
        "adapter": str(adapter.path),
        "reference": f"base + {reference_copy_of(adapter.path)}" if reference_adapter_of(recipe.model) else "the base",
        "model": adapter.base_path,
        "data": paths,
        "max_length": max_length,
        "dpo": dataclasses.asdict(recipe.dpo),
        "metrics": metrics,
    }
    sample_rows = None
    if options.sample_scorer is not None and options.generate:
        with _advancing("sample", options.generate, console) as advance:
            sample_metrics, sample_rows = options.sample_scorer(model, tokenizer, recipe, advance)
        metrics.update(sample_metrics)
        if per_pair is not None:
            _join_sample_rows(per_pair, list(pairs["source"]), sample_rows)
    report = EvalReport(result, _write_outputs(options, result, pairs, per_pair))
    if sample_rows is not None:
        if options.samples is not None:
            write_jsonl(options.samples, sample_rows)
            report.written.append(f"{len(sample_rows)} prompts sampled and scored, written to {options.samples}")
    elif options.generate:
        indices = distinct_prompts(pairs, options.generate)
        lengths = [len(pairs[index]["prompt_ids"]) for index in indices]
        max_new_tokens, capped_note = new_token_budget(model, lengths, options.max_new_tokens)
        if capped_note:
            console.print(capped_note, style="yellow", markup=False)
        with _advancing("sample", len(indices), console) as advance:
            rows = sample_side_by_side(
                model, tokenizer, pairs, indices, max_new_tokens, options.seed, batch_size, advance
            )
        write_jsonl(options.samples, rows)
        report.written.append(f"{len(rows)} prompts sampled from policy and reference, written to {options.samples}")
    return report


def _join_sample_rows(per_pair: list[dict], sources: list[str], sample_rows: list[dict]) -> None:
    """Each prompt's sample results also go on the first --per-example row of a pair from the same record."""
    by_source = {_source_key(row["source"]): row for row in sample_rows}
    for row in per_pair:
        sample = by_source.pop(_source_key(sources[row["index"]]), None)
        if sample is not None:
            row.update({f"sample_{key}": sample[key] for key in ("reward_policy", "reward_reference", "log_ratio")})


def _source_key(source: str) -> tuple[str, str]:
    """file:line with the file resolved: the same record, however its path was written."""
    path, _, line = source.rpartition(":")
    return str(Path(path).resolve()), line


def _write_outputs(options: EvalOptions, result: dict, pairs, per_pair: list[dict] | None) -> list[str]:
    """--output and --per-example; one line for each file written."""
    written = []
    if options.output is not None:
        write_text_atomic(options.output, json.dumps(standard_json(result), indent=2, allow_nan=False) + "\n")
        written.append(f"metrics written to {options.output}")
    if per_pair is not None:
        sources = list(pairs["source"])
        write_jsonl(options.per_example, [{"source": sources[row["index"]], **row} for row in per_pair])
        wrong = sum(not row["correct"] for row in per_pair)
        written.append(f"{len(per_pair)} per-pair results ({wrong} ranked wrong) written to {options.per_example}")
    return written
