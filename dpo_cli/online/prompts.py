"""The prompts to sample from: a file of prompts, or the distinct prompts of any file the data readers know.

A prompt file has one record per line with a `prompt` (a string, or a list of {"role", "content"} messages) and no
`chosen`/`rejected`; its other keys are handed to reward functions as columns (TRL's `**kwargs`). Any other file is
read as preference data by `dpo_cli.data.records` (every format, container and check of `train`), and each distinct
prompt is taken once, in file order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from dpo_cli.config import DataSection
from dpo_cli.data.formats import RecordProblem, check_messages, rename_columns
from dpo_cli.data.prepare import read_options
from dpo_cli.data.readers import check_readable, open_records
from dpo_cli.data.records import ReadResult, iter_file_pairs
from dpo_cli.errors import UserError

PAIR_KEYS = {"chosen", "rejected"}


@dataclass
class Prompt:
    text: str | list
    """A string, or a list of {"role", "content"} messages."""
    source: str
    """file:line, for messages and for pointing back at the record."""
    columns: dict = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.text, list)


def read_prompts(paths: list[str], data: DataSection) -> list[Prompt]:
    if not paths:
        raise UserError("no prompts: pass --prompts FILE (repeatable)")
    prompts: list[Prompt] = []
    for path in paths:
        check_readable(path)
        if _is_prompt_file(Path(path), data):
            prompts.extend(_prompt_records(Path(path), data))
        else:
            prompts.extend(_pair_prompts(Path(path), data))
    if not prompts:
        raise UserError(f"{', '.join(paths)}: no prompts found")
    kinds = {prompt.is_chat for prompt in prompts}
    if len(kinds) > 1:
        raise UserError("--prompts: some prompts are conversations and some are text; sample one kind at a time")
    return prompts


def prompts_fingerprint(prompts: list[Prompt]) -> str:
    """Names these prompts (text and columns, in order): a resumed sample must continue the same list."""
    digest = hashlib.blake2b(digest_size=16)
    for prompt in prompts:
        digest.update(json.dumps([prompt.text, prompt.columns], sort_keys=True).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _is_prompt_file(path: Path, data: DataSection) -> bool:
    columns = read_options(data).columns
    for raw in open_records(path):
        if raw.problem is not None or not isinstance(raw.value, dict):
            return False  # the pair reader reports it, with its place
        try:
            record = rename_columns(raw.value, columns)
        except RecordProblem:
            return False
        return "prompt" in record and not (PAIR_KEYS & record.keys()) and data.format == "auto"
    return False


def _prompt_records(path: Path, data: DataSection) -> list[Prompt]:
    columns = read_options(data).columns
    prompts = []
    for raw in open_records(path):
        try:
            if raw.problem is not None:
                raise raw.problem
            if not isinstance(raw.value, dict):
                raise RecordProblem("not an object", None, "expected a JSON object", "one record per line")
            record = rename_columns(raw.value, columns)
            text = record.get("prompt")
            if isinstance(text, list):
                text = check_messages(text, "prompt")
            elif not isinstance(text, str) or not text:
                raise RecordProblem("wrong type", "prompt", "must be a non-empty string or a message list", "fix it")
        except RecordProblem as problem:
            raise UserError(problem.line(raw.where)) from None
        extra = {key: value for key, value in record.items() if key != "prompt"}
        prompts.append(Prompt(text, raw.where, extra))
    return prompts


def _pair_prompts(path: Path, data: DataSection) -> list[Prompt]:
    options = read_options(data)
    seen: set[str] = set()
    prompts = []
    for pair in iter_file_pairs(path, options, ReadResult()):
        key = json.dumps(pair.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(Prompt(pair.prompt, pair.source))
    return prompts
