"""What the commands print about data: progress while a split is prepared, the lines `train` and `eval` print about
each split, and the tables of `dpo-cli data check`. The data functions return reports; this renders them.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from dpo_cli.data.load import SplitReport, load_tokenized_split
from dpo_cli.data.prepare import Progress
from dpo_cli.data.skipped import skipped_summary
from dpo_cli.data.split import SplitRequest


def progress_to(console: Console) -> Progress:
    """Progress lines printed as they come, as plain text (a file name may hold [brackets])."""
    return lambda line: console.print(line, markup=False)


def load_split(tokenizer, request: SplitRequest, console: Console):
    """(pairs, report) of `request`, saying what happens and what became of the records; a split with no pair
    left stops the command after its report."""
    pairs, report = load_tokenized_split(tokenizer, request, progress_to(console))
    print_split_report(report, console)
    report.require_pairs()
    return pairs, report


def print_split_report(report: SplitReport, console: Console) -> None:
    """'train data: 168 pairs (openai; prepared in 0.9 s), ...', then what was skipped and repeated, in yellow."""
    how = "from cache" if report.from_cache else "prepared"
    formats = ", ".join(report.formats)
    line = f"{report.name} data: {report.kept:,} {report.unit} ({formats}; {how} in {report.seconds:.1f} s)"
    if report.truncated:
        line += f", {report.truncated:,} with a completion cut at max_length={report.max_length}"
    console.print(line, markup=False)
    if report.skipped:
        where = f"; they are in {report.skipped_file}" if report.skipped_file is not None else ""
        text = f"{report.name} data: skipped {len(report.skipped):,}: {skipped_summary(report.skipped)}{where}"
        console.print(text, style="yellow", markup=False)
    if report.duplicates:
        text = f"{report.name} data: {report.duplicates:,} pairs repeat an earlier pair exactly"
        console.print(text, style="yellow", markup=False)


def print_check_report(report: dict, console: Console) -> None:
    """The report of `data.check.check_files` as tables: files, invalid records, token lengths, then totals."""
    files = Table(title="files", title_justify="left")
    files.add_column("file", overflow="fold")
    files.add_column("format")
    for name in ("records", "pairs"):
        files.add_column(name, justify="right")
    files.add_column("invalid", justify="right")
    files.add_column("duplicates", justify="right")
    for file in report["files"]:
        invalid = sum(entry["count"] for entry in file["invalid"].values())
        files.add_row(
            file["path"], file["format"], f"{file['records']:,}", f"{file['pairs']:,}", f"{invalid:,}",
            f"{file['duplicates']:,}",
        )  # fmt: skip
    console.print(files)
    total = report["total"]
    if total["invalid"]:
        problems = Table(title="invalid records", title_justify="left")
        for name in ("reason", "count", "first", "first message"):
            problems.add_column(name, justify="right" if name == "count" else "left", overflow="fold")
        for reason, entry in total["invalid"].items():
            problems.add_row(reason, f"{entry['count']:,}", "\n".join(entry["first"]), entry["message"])
        console.print(problems)
    if "tokens" in total:
        tokens = Table(title=f"tokens ({report['model']})", title_justify="left")
        for name in ("", "mean", "p50", "p95", "max"):
            tokens.add_column(name, justify="left" if not name else "right")
        for field, stats in total["tokens"].items():
            tokens.add_row(field, f"{stats['mean']:.1f}", f"{stats['p50']:g}", f"{stats['p95']:g}", f"{stats['max']:,}")
        console.print(tokens)
        console.print(
            f"max_length={report['max_length']}: {total['truncated']:,} pairs would have a completion cut, "
            f"{total['dropped']:,} would be dropped (the prompt alone fills it)",
            markup=False,
        )
    console.print(
        f"{total['pairs']:,} pairs from {total['records']:,} records; {total['duplicates']:,} exact duplicates, "
        f"{total['chosen_equals_rejected']:,} with chosen equal to rejected",
        markup=False,
    )


TRAINED_START, TRAINED_END = "⟦", "⟧"
"""Around the trained tokens of a shown example (also in a colour, where the terminal has one)."""


def print_examples(examples: list[dict], console: Console) -> None:
    """Each example of `data.check.shown_example` as the model sees it: the rendered prompt, then each completion
    after it between ⟦ ⟧ (the tokens trained on), with the token counts."""
    for number, example in enumerate(examples, start=1):
        counts = ", ".join(f"{name} {count:,}" for name, count in example["tokens"].items())
        console.print(
            f"example {number} ({example['source']}): {counts} tokens; trained tokens between {TRAINED_START} "
            f"{TRAINED_END}",
            style="bold",
            markup=False,
            soft_wrap=True,
        )
        for name, completion in example["completions"].items():
            text = Text(f"prompt + {name}:\n", style="dim")
            text.append(example["prompt"])
            text.append(TRAINED_START + completion + TRAINED_END, style="reverse")
            console.print(text, soft_wrap=True)
