"""`dpo-cli data check FILE...`: what is in a set of preference files, before any training time is spent on them.

For each file: the detected format, how many records and pairs, the invalid records per reason (with the first
places), exact duplicates and pairs whose chosen equals rejected. With a model's tokenizer also the token lengths
of prompt, chosen and rejected (mean, p50, p95, max) and how many pairs `max_length` would cut or drop, and with
`show` the first pairs as the model sees them (`shown_example`). The report is a dict the command prints as tables
for people or JSON for machines; checking prepares the data the same way training does, so a check warms the cache
for the run that follows.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from dpo_cli.config import DataSection
from dpo_cli.data.prepare import Progress, no_progress, prepare_split, read_options, write_texts
from dpo_cli.data.records import InvalidRecord, ReadResult
from dpo_cli.data.skipped import invalid_by_reason

FIRST_PLACES = 3
TOKEN_FIELDS = ("prompt", "chosen", "rejected")


def check_files(
    paths: list[str],
    data: DataSection,
    tokenizer=None,
    model: str | None = None,
    progress: Progress = no_progress,
    show: int = 0,
) -> dict:
    """The report of `paths` read with `data`'s settings; every problem is counted, none stops the check.

    With `tokenizer` (that of `model`, named in the report) the pairs are tokenized as training would, and the
    report has token lengths and, under "examples", the first `show` trainable pairs as the model sees them;
    `progress` hears what is happening as it happens.
    """
    data = dataclasses.replace(data, on_invalid="skip")
    if tokenizer is None:
        return _check_without_tokenizer(paths, data)
    prepared = prepare_split(tokenizer, list(paths), data, "checked", progress)
    columns = prepared.tokenized.select_columns(
        ["file_index", "pair_hash", "prompt_tokens", "chosen_tokens", "rejected_tokens", "truncated", "problem"]
    ).with_format("numpy")[:]
    problems = prepared.tokenization_problems(prepared.problem_rows())
    report = _report(prepared.read, problems, columns, data.max_length)
    report["model"] = model
    if show:
        report["examples"] = _shown_pairs(prepared, tokenizer, show)
    return report


def _shown_pairs(prepared, tokenizer, count: int) -> list[dict]:
    """The first `count` pairs that will be trained on, as `shown_example`s."""
    trainable = np.flatnonzero(np.asarray(prepared.tokenized["problem"]) == "")[:count].tolist()
    rows = prepared.tokenized.select(trainable)
    sources = prepared.texts.select(trainable)["source"]
    return [
        shown_example(
            tokenizer, source, row["prompt_ids"], {"chosen": row["chosen_ids"], "rejected": row["rejected_ids"]}
        )
        for source, row in zip(sources, rows, strict=True)
    ]


def shown_example(tokenizer, source: str, prompt_ids: list[int], completions: dict[str, list[int]]) -> dict:
    """One example as the model sees it, after the template and the cut to max_length: the text of the prompt and
    of each completion (the trained tokens), and their token counts. Any objective's examples fit: a preference
    pair has chosen and rejected completions, a supervised one a single completion."""
    prompt = tokenizer.decode(prompt_ids)
    texts = {}
    for name, ids in completions.items():
        whole = tokenizer.decode(list(prompt_ids) + list(ids))
        # decoded together, so a word split across the boundary reads as it will; alone if the prompt's text moved
        texts[name] = whole[len(prompt) :] if whole.startswith(prompt) else tokenizer.decode(ids)
    tokens = {"prompt": len(prompt_ids)} | {name: len(ids) for name, ids in completions.items()}
    return {"source": source, "prompt": prompt, "completions": texts, "tokens": tokens}


def _check_without_tokenizer(paths: list[str], data: DataSection) -> dict:
    from datasets import Dataset

    with tempfile.TemporaryDirectory(prefix="dpo-cli-check-") as folder:
        read, _ = write_texts(Path(folder), list(paths), read_options(data))
        texts = Dataset.from_file(str(Path(folder) / "texts.arrow"))
        columns = texts.select_columns(["file_index", "pair_hash"]).with_format("numpy")[:]
        del texts  # release the memory map before the folder goes
    report = _report(read, [], columns, data.max_length)
    report["model"] = None
    return report


def _report(read: ReadResult, problems: list[InvalidRecord], columns: dict, max_length: int) -> dict:
    """Per file and in total. `columns` are numpy arrays, one entry per pair that passed the record checks."""
    files = []
    for index, file in enumerate(read.files):
        rows = columns["file_index"] == index
        invalid = [r for r in read.invalid + problems if r.file == file.path]
        files.append(
            {"path": file.path, "format": file.format, "records": file.records, "pairs": int(rows.sum())}
            | _summary(invalid, columns, rows, max_length)
        )
    everything = np.ones(len(columns["file_index"]), dtype=bool)
    total = {
        "formats": sorted({file.format for file in read.files}),
        "records": sum(file.records for file in read.files),
        "pairs": len(everything),
    } | _summary(read.invalid + problems, columns, everything, max_length)
    return {"max_length": max_length, "files": files, "total": total}


def _summary(invalid: list[InvalidRecord], columns: dict, rows: np.ndarray, max_length: int) -> dict:
    hashes = columns["pair_hash"][rows]
    reasons = Counter(r.reason for r in invalid)
    summary = {
        "invalid": {
            reason: {
                "count": len(records),
                "first": [r.source for r in records[:FIRST_PLACES]],
                "message": records[0].message,
            }
            for reason, records in invalid_by_reason(invalid).items()
        },
        "duplicates": int(len(hashes) - len(np.unique(hashes))),
        "chosen_equals_rejected": reasons["chosen equals rejected"],
    }
    if "prompt_tokens" in columns:
        # Pairs set aside unrendered (a template error) or untokenized (a prompt far over max_length) have no counts.
        tokenized = rows & (columns["problem"] != "chat template error") & (columns["prompt_tokens"] >= 0)
        summary["tokens"] = {field: _stats(columns[f"{field}_tokens"][tokenized]) for field in TOKEN_FIELDS}
        summary["truncated"] = int(columns["truncated"][rows].sum())
        summary["dropped"] = reasons["prompt fills max_length"]
    return summary


def _stats(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {"mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    p50, p95 = np.percentile(lengths, [50, 95])
    return {"mean": round(float(lengths.mean()), 1), "p50": float(p50), "p95": float(p95), "max": int(lengths.max())}


def has_problems(report: dict) -> bool:
    return bool(report["total"]["invalid"])
