"""Preparing a split: its files streamed into Arrow, every pair tokenized on all cores, the result kept in the cache.

`prepare_split` reads, checks and tokenizes the files of one split, or finds them already prepared (see `cache`). The
result holds every pair read, in file order, problems included; which of them a run uses (`data.on_invalid`,
`data.eval_split`) is decided by `load`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dpo_cli.config import DataSection
from dpo_cli.data.arrow import loaded_text, pair_hash, stored_text, text_features, tokenized_features
from dpo_cli.data.cache import cache_root, open_or_build, prepared_key, tokenizer_fingerprint, write_meta
from dpo_cli.data.decode import MAX_RECORD_BYTES
from dpo_cli.data.formats import parse_columns
from dpo_cli.data.readers import check_readable
from dpo_cli.data.records import InvalidRecord, ReadOptions, ReadResult, iter_file_pairs, json_line
from dpo_cli.data.templates import ChatTemplate, use_chat_template
from dpo_cli.data.tokenize import PAIR_TEXTS, chars_per_token, require_chat_template, tokenize_batch
from dpo_cli.errors import UserError

WRITE_BATCH = 10_000
PARALLEL_FROM = 20_000
"""Pairs below which tokenizing in one process beats starting workers."""
RECORD_BYTES_PER_TOKEN = 4096
"""Bytes one record may have per token of max_length: its three texts are used up to 2 x max_length tokens each, a
token is at most 64 characters, a character at most 6 bytes of JSON (an escape); 3 x 2 x 64 x 6 = 2,304."""

Progress = Callable[[str], None]
"""Where a line about what is happening goes (reading, tokenizing, waiting for another run), as it happens."""


def no_progress(line: str) -> None:
    """A `Progress` that says nothing."""


@dataclass
class PreparedSplit:
    """Every pair read from a split's files, tokenized, in file order; rows with a `problem` are not trainable."""

    texts: object
    """datasets.Dataset of the pairs' texts, sources and hashes."""
    tokenized: object
    """datasets.Dataset of ids, untruncated lengths, `truncated` and `problem`, row for row with `texts`."""
    read: ReadResult
    from_cache: bool
    seconds: float
    key: str = ""
    """The prepared folder's name: a hash of the files' bytes, how they are read, the tokenizer and max_length."""

    def problem_rows(self) -> list[int]:
        import numpy as np
        import pyarrow.compute as pc

        has_problem = pc.not_equal(self.tokenized.data.column("problem"), "")
        return np.flatnonzero(has_problem.to_numpy(zero_copy_only=False)).tolist()

    def tokenization_problems(self, rows: list[int]) -> list[InvalidRecord]:
        """The rows of `problem_rows()` as records to report and write out, their texts as the pair was read."""
        if not rows:
            return []
        problems = self.tokenized.select(rows).select_columns(["problem", "problem_message"])
        texts = self.texts.select(rows)
        records = []
        for problem, text in zip(problems, texts, strict=True):
            record = {name: loaded_text(text[name], text["is_chat"]) for name in PAIR_TEXTS}
            records.append(
                InvalidRecord(
                    self.read.files[text["file_index"]].path,
                    text["source"],
                    problem["problem"],
                    f"{text['source']}: {problem['problem_message']}",
                    json_line(record),
                )
            )
        return records


def read_options(data: DataSection, kind: str = "preference") -> ReadOptions:
    return ReadOptions(
        format=data.format,
        columns=parse_columns(data.columns),
        on_invalid=data.on_invalid,
        max_record_bytes=max(MAX_RECORD_BYTES, RECORD_BYTES_PER_TOKEN * data.max_length),
        kind=kind,
    )


def prepare_split(
    tokenizer,
    paths: list[str],
    data: DataSection,
    name: str,
    progress: Progress = no_progress,
    kind: str = "preference",
) -> PreparedSplit:
    """Read, check and tokenize the files of one split, or find them already prepared in the cache. `kind`:
    preference pairs, or sft examples (data/sft_formats.py), which the same file gives otherwise."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # our own lines say what is happening; datasets' bars would interleave with them
    started = time.perf_counter()
    if not paths:
        flag = "--eval-data" if name == "eval" else "--data"
        raise UserError(f"no {name} data: pass {flag} FILE.jsonl or set data.{name} in the recipe")
    options = read_options(data, kind)
    for path in paths:  # before fingerprinting them: a missing file is the user's one-line error, not a traceback
        check_readable(path)
    template = use_chat_template(tokenizer, data.chat_template)  # its text is part of the tokenizer's fingerprint
    settings = {"format": options.format, "columns": options.columns, "max_length": data.max_length}
    if kind != "preference":  # named only when not the default, so the preference cache keys stay as they were
        settings["kind"] = kind
    root = cache_root(data.cache_dir)
    target = root / "prepared" / prepared_key(paths, settings, tokenizer_fingerprint(tokenizer))

    def say(line: str) -> None:
        progress(f"{name} data: {line}")

    def build(folder: Path) -> None:
        say(f"reading {', '.join(map(str, paths))}")
        read, written = write_texts(folder, paths, options, tokenizer)
        tokenized_files = tokenize_texts(folder, tokenizer, data.max_length, written, say, template)
        write_meta(folder, read, tokenized_files)

    (texts, tokenized, read), from_cache = open_or_build(target, build, say)
    return PreparedSplit(texts, tokenized, read, from_cache, time.perf_counter() - started, target.name)


def write_texts(folder: Path, paths: list[str], options: ReadOptions, tokenizer=None) -> tuple[ReadResult, int]:
    """Stream every pair of `paths` into `folder/texts.arrow` in batches; (what reading found, pairs written).
    With a tokenizer, the first chat pair checks that it has a chat template, before hours of reading."""
    from datasets.arrow_writer import ArrowWriter

    result = ReadResult()
    columns: dict[str, list] = {column: [] for column in text_features()}
    written, has_chat = 0, False
    with ArrowWriter(features=text_features(), path=str(folder / "texts.arrow")) as writer:
        for file_index, path in enumerate(paths):
            for pair in iter_file_pairs(Path(path), options, result):
                if pair.is_chat and tokenizer is not None and not has_chat:
                    require_chat_template(tokenizer, pair, result.files[-1].format)
                    has_chat = True
                texts = (stored_text(pair.prompt), stored_text(pair.chosen), stored_text(pair.rejected))
                for column, value in zip(PAIR_TEXTS, texts, strict=True):
                    columns[column].append(value)
                columns["is_chat"].append(pair.is_chat)
                columns["source"].append(pair.source)
                columns["file_index"].append(file_index)
                columns["pair_hash"].append(pair_hash(*texts, pair.is_chat))
                written += 1
                if len(columns["source"]) >= WRITE_BATCH:
                    writer.write_batch(columns)
                    columns = {column: [] for column in columns}
        if columns["source"]:
            writer.write_batch(columns)
        writer.finalize()
    return result, written


def tokenize_texts(
    folder: Path, tokenizer, max_length: int, written: int, say: Progress, template: ChatTemplate | None = None
) -> list[str]:
    """Tokenize `folder/texts.arrow` into `folder/tokenized*.arrow`, on all cores for many pairs; the file names."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    workers = _worker_count() if written >= PARALLEL_FROM else None
    say(f"tokenizing {written:,} pairs" + (f" in {workers} processes" if workers else ""))
    if written == 0:  # every record was set aside: an empty table, since `map` over no rows writes no file
        with ArrowWriter(features=tokenized_features(), path=str(folder / "tokenized.arrow")) as writer:
            writer.finalize()
        return ["tokenized.arrow"]
    tokenized = Dataset.from_file(str(folder / "texts.arrow")).map(
        tokenize_batch,
        batched=True,
        batch_size=1000,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            "max_token_chars": chars_per_token(tokenizer),
            "template": template,
        },
        remove_columns=["prompt", "chosen", "rejected", "is_chat", "source"],
        features=tokenized_features(),
        num_proc=workers,
        cache_file_name=str(folder / "tokenized.arrow"),
        new_fingerprint=folder.name,
    )
    return [Path(f["filename"]).name for f in tokenized.cache_files]


def _worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity
        return os.cpu_count() or 1
