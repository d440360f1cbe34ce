"""Turning preference pairs into token ids exactly as TRL 1.16's DPOTrainer does, so our numbers are comparable.

Text pairs: the prompt alone, prompt+chosen and prompt+rejected are tokenized, EOS text appended to each completion
first. Chat pairs (message lists): the prompt is rendered with the chat template and the generation prompt,
prompt+chosen and prompt+rejected without it, and no EOS is appended (the template ends turns itself). Either way
the completion starts where the tokenized prompt and prompt+completion diverge, which is not always the end of the
prompt: tokens can merge across the boundary, and some templates render a prompt alone differently. Prompt+completion
is then cut to `max_length` keeping the start; a pair whose prompt alone fills `max_length` has no completion token
left and cannot be trained on.

A hostile record must cost milliseconds, not the minutes and gigabytes of tokenizing megabytes of text that are then
cut away. No token holds more than `chars_per_token` characters (the tokenizer's longest vocabulary entry, at least
64), so a prompt longer than `max_length` times that cannot fit and is set aside untokenized, and a completion is
tokenized only up to twice what the window can hold, which leaves the kept tokens the same as in full.

`load_tokenized_split` is the entry point of `train` and `eval`: it streams the files into Arrow, tokenizes on all
cores, caches the result by fingerprint (see `data_cache`), applies `data.on_invalid`, and returns a
`datasets.Dataset` whose rows are `{"prompt_ids", "chosen_ids", "rejected_ids"}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from rich.console import Console

from dpo_cli.config import DataSection
from dpo_cli.data.cache import (
    cache_root,
    cache_write_error,
    check_cache_writable,
    prepared_key,
    preparing,
    tokenizer_fingerprint,
)
from dpo_cli.data.formats import Text, parse_columns
from dpo_cli.data.readers import MAX_RECORD_BYTES, check_readable
from dpo_cli.data.records import (
    FileReport,
    InvalidRecord,
    PreferencePair,
    ReadOptions,
    ReadResult,
    iter_file_pairs,
    json_line,
    read_skipped,
    skipped_summary,
    write_skipped,
)
from dpo_cli.errors import UserError
from dpo_cli.files import atomic_directory, read_user_text

ID_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]
PAIR_TEXTS = ("prompt", "chosen", "rejected")
WRITE_BATCH = 10_000
PARALLEL_FROM = 20_000
"""Pairs below which tokenizing in one process beats starting workers."""
SPLIT_SEED = 0
"""The held-out part of `data.eval_split` is the same for the same data, whatever the training seed."""
MIN_CHARS_PER_TOKEN = 64
"""A generous bound on the characters one token covers (real tokenizers average 3 to 5), used when the vocabulary's
longest entry is shorter."""
RECORD_BYTES_PER_TOKEN = 4096
"""Bytes one record may have per token of max_length: its three texts are used up to 2 x max_length tokens each, a
token is at most 64 characters, a character at most 6 bytes of JSON (an escape); 3 x 2 x 64 x 6 = 2,304."""
NOT_TOKENIZED = -1
"""The token counts of a pair set aside on its character count alone."""
INVALID = "invalid.jsonl"
"""The records reading set aside, in a prepared folder."""


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __getitem__(self, key: str) -> list[int]:  # the layout reads pairs as mappings, like dataset rows
        return getattr(self, key)


@dataclass
class TokenizeSummary:
    kept: int = 0
    dropped_long_prompt: list[str] = field(default_factory=list)
    """Sources (file:line) of pairs set aside because the prompt alone fills max_length."""
    truncated: int = 0
    """Pairs kept but with a completion cut at max_length."""
    skipped: list[InvalidRecord] = field(default_factory=list)
    """Every record or pair set aside under `on_invalid: skip`, long prompts included."""
    duplicates: int = 0
    """Kept pairs that repeat an earlier one exactly."""
    from_cache: bool = False


# One pair ---------------------------------------------------------------------------------------------------------


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split_at_divergence(
    prompt_ids: list[int], prompt_chosen_ids: list[int], prompt_rejected_ids: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids, the completions starting where either stops agreeing with the prompt."""
    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids),
        common_prefix_length(prompt_ids, prompt_rejected_ids),
    )
    return prompt_ids[:prompt_len], prompt_chosen_ids[prompt_len:], prompt_rejected_ids[prompt_len:]


def chat_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a rendered conversation, as TRL's `_tokenize` gets them."""
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(rendered["input_ids"])


def chat_pair_ids(tokenizer, prompt: Text, chosen: Text, rejected: Text) -> tuple[list[int], list[int], list[int]]:
    return split_at_divergence(
        chat_ids(tokenizer, prompt, add_generation_prompt=True),
        chat_ids(tokenizer, prompt + chosen),
        chat_ids(tokenizer, prompt + rejected),
    )


def text_pairs_ids(
    tokenizer, prompts: list[str], chosen: list[str], rejected: list[str]
) -> list[tuple[list[int], list[int], list[int]]]:
    """Untruncated (prompt, chosen, rejected) ids of many text pairs, tokenized in three batched calls."""
    eos = tokenizer.eos_token
    chosen = [c if c.endswith(eos) else c + eos for c in chosen]
    rejected = [r if r.endswith(eos) else r + eos for r in rejected]
    prompt_ids = tokenizer(prompts)["input_ids"]
    prompt_chosen_ids = tokenizer([p + c for p, c in zip(prompts, chosen, strict=True)])["input_ids"]
    prompt_rejected_ids = tokenizer([p + r for p, r in zip(prompts, rejected, strict=True)])["input_ids"]
    return [split_at_divergence(*ids) for ids in zip(prompt_ids, prompt_chosen_ids, prompt_rejected_ids, strict=True)]


def cut_to_max_length(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int
) -> tuple[TokenizedPair | None, bool]:
    """Keep the start of prompt+completion; None when the prompt alone fills `max_length`."""
    if len(prompt) >= max_length:
        return None, False
    room = max_length - len(prompt)
    truncated = len(chosen) > room or len(rejected) > room
    return TokenizedPair(prompt, chosen[:room], rejected[:room]), truncated


def tokenize_pair(tokenizer, pair: PreferencePair, max_length: int) -> tuple[TokenizedPair | None, bool]:
    """(token ids, whether a completion was truncated); None when the prompt alone fills `max_length`."""
    if pair.is_chat:
        ids = chat_pair_ids(tokenizer, pair.prompt, pair.chosen, pair.rejected)
    else:
        (ids,) = text_pairs_ids(tokenizer, [pair.prompt], [pair.chosen], [pair.rejected])
    return cut_to_max_length(*ids, max_length)


def tokenize_pairs(
    tokenizer, pairs: Iterable[PreferencePair], max_length: int
) -> tuple[list[TokenizedPair], TokenizeSummary]:
    """Small in-memory lists; `load_tokenized_split` is the streaming, cached path for real data."""
    summary = TokenizeSummary()
    tokenized = []
    for pair in pairs:
        ids, truncated = tokenize_pair(tokenizer, pair, max_length)
        if ids is None:
            summary.dropped_long_prompt.append(pair.source)
            continue
        summary.truncated += truncated
        tokenized.append(ids)
    summary.kept = len(tokenized)
    return tokenized, summary


# Chat templates ---------------------------------------------------------------------------------------------------


def use_chat_template(tokenizer, path: str) -> None:
    """Give the tokenizer the Jinja template in `path`; it is then saved with the adapter's tokenizer too."""
    template = read_user_text(path, "chat template file", "pass a Jinja template with --chat-template")
    tokenizer.chat_template = template
    try:
        chat_ids(tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    except Exception as error:  # jinja2 syntax and render errors have many types; all mean the template is broken
        raise UserError(f"{path}: the chat template does not render ({error.__class__.__name__}: {error})") from None


def _require_chat_template(tokenizer, pair: PreferencePair, format_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{pair.source}: {format_name} data is a conversation, and the tokenizer has no chat template to "
            "render it; pass --chat-template FILE.jinja (recipe key data.chat_template)"
        )


# Many pairs: Arrow, all cores, cache ------------------------------------------------------------------------------


def _text_features():
    from datasets import Features, Value

    return Features(
        {
            "prompt": Value("string"),
            "chosen": Value("string"),
            "rejected": Value("string"),
            "is_chat": Value("bool"),
            "source": Value("string"),
            "file_index": Value("int32"),
            "pair_hash": Value("int64"),
        }
    )


def _tokenized_features():
    from datasets import Features, Sequence, Value

    ids = Sequence(Value("int32"))  # List in datasets >= 4; Sequence works in 3.x too
    return Features(
        {
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
            "prompt_tokens": Value("int32"),
            "chosen_tokens": Value("int32"),
            "rejected_tokens": Value("int32"),
            "truncated": Value("bool"),
            "problem": Value("string"),
            "problem_message": Value("string"),
            "file_index": Value("int32"),
            "pair_hash": Value("int64"),
        }
    )


def _stored_text(text: Text) -> str:
    """Text pairs are stored as they are; chat pairs as JSON, so one Arrow schema holds both."""
    return json.dumps(text, ensure_ascii=False) if isinstance(text, list) else text


def _pair_hash(prompt: str, chosen: str, rejected: str, is_chat: bool) -> int:
    blob = "\0".join((str(is_chat), prompt, chosen, rejected)).encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little", signed=True)


def write_texts(folder: Path, paths: list[str], options: ReadOptions, tokenizer=None) -> tuple[ReadResult, int]:
    """Stream every pair of `paths` into `folder/texts.arrow` in batches; (what reading found, pairs written).
    With a tokenizer, the first chat pair checks that it has a chat template, before hours of reading."""
    from datasets.arrow_writer import ArrowWriter

    result = ReadResult()
    columns: dict[str, list] = {column: [] for column in _text_features()}
    written, has_chat = 0, False
    with ArrowWriter(features=_text_features(), path=str(folder / "texts.arrow")) as writer:
        for file_index, path in enumerate(paths):
            for pair in iter_file_pairs(Path(path), options, result):
                if pair.is_chat and tokenizer is not None and not has_chat:
                    _require_chat_template(tokenizer, pair, result.files[-1].format)
                    has_chat = True
                texts = (_stored_text(pair.prompt), _stored_text(pair.chosen), _stored_text(pair.rejected))
                for column, value in zip(("prompt", "chosen", "rejected"), texts, strict=True):
                    columns[column].append(value)
                columns["is_chat"].append(pair.is_chat)
                columns["source"].append(pair.source)
                columns["file_index"].append(file_index)
                columns["pair_hash"].append(_pair_hash(*texts, pair.is_chat))
                written += 1
                if len(columns["source"]) >= WRITE_BATCH:
                    writer.write_batch(columns)
                    columns = {column: [] for column in columns}
        if columns["source"]:
            writer.write_batch(columns)
        writer.finalize()
    return result, written


def chars_per_token(tokenizer) -> int:
    """The most characters one token can stand for: its longest vocabulary entry (byte-level entries are at least as
    long as the text they cover), and never less than MIN_CHARS_PER_TOKEN."""
    return max(MIN_CHARS_PER_TOKEN, max(map(len, tokenizer.get_vocab()), default=0))


def _prompt_too_long(prompt: Text, max_length: int, max_chars: int) -> str:
    """Why `prompt` cannot fit in max_length tokens, told from its characters alone; "" when it may fit."""
    if isinstance(prompt, str):
        size = len(prompt)
    else:
        if len(prompt) > max_length:  # every turn renders to at least one token (its role marker)
            return f"has {len(prompt):,} messages, more than max_length={max_length} tokens can hold"
        size = sum(len(message["content"]) for message in prompt)
    if size <= max_chars:
        return ""
    return (
        f"is {size:,} characters, more than max_length={max_length} tokens can hold (no token of this tokenizer "
        f"covers more than {max_chars // max_length} characters)"
    )


def _head(text: Text, max_chars: int, max_messages: int) -> Text:
    """The start of a completion: at most `max_chars` characters of its text or of its messages' contents, and at
    most `max_messages` messages (each renders to a token at least)."""
    if isinstance(text, str):
        return text[:max_chars]
    kept = []
    for message in text[:max_messages]:
        if max_chars <= 0:
            break
        kept.append({**message, "content": message["content"][:max_chars]})
        max_chars -= len(message["content"])
    return kept


def tokenize_batch(
    batch: dict[str, list], tokenizer, max_length: int, max_token_chars: int = MIN_CHARS_PER_TOKEN
) -> dict[str, list]:
    """`datasets.map` function: the texts of a batch of pairs -> cut ids, full lengths and any problem per pair.

    The work per pair is bounded: a prompt of more than `max_length * max_token_chars` characters cannot fit and is
    not tokenized. A completion is cut to twice that before tokenizing: the kept tokens come from its first
    `max_length * max_token_chars` characters at most, and as much text again after them keeps any merge across the
    cut far from the window. Its token count is then counted up to the cut (still more than fits)."""
    size = len(batch["prompt"])
    max_prompt_chars = max_length * max_token_chars
    max_completion_chars = 2 * max_prompt_chars
    full: list[tuple[list[int], list[int], list[int]] | None] = [None] * size
    problems = [("", "")] * size
    texts = [[_loaded_text(batch[name][i], batch["is_chat"][i]) for name in PAIR_TEXTS] for i in range(size)]
    for i, (prompt, _, _) in enumerate(texts):
        if why := _prompt_too_long(prompt, max_length, max_prompt_chars):
            problems[i] = ("prompt fills max_length", f"field 'prompt': {why}; raise --max-length or shorten it")
        texts[i][1:] = [_head(completion, max_completion_chars, 2 * max_length) for completion in texts[i][1:]]
    text_rows = [i for i in range(size) if not batch["is_chat"][i] and not problems[i][0]]
    if text_rows:
        columns = [[texts[i][field] for i in text_rows] for field in range(3)]
        for i, ids in zip(text_rows, text_pairs_ids(tokenizer, *columns), strict=True):
            full[i] = ids
    for i in range(size):
        if batch["is_chat"][i] and not problems[i][0]:
            try:
                full[i] = chat_pair_ids(tokenizer, *texts[i])
            except Exception as error:  # templates raise their own errors (e.g. on roles that do not alternate)
                problems[i] = ("chat template error", f"the chat template refused it ({error}); fix the template")
    out: dict[str, list] = {name: [] for name in _tokenized_features() if name not in ("file_index", "pair_hash")}
    for i in range(size):
        if full[i] is None and problems[i][0] == "prompt fills max_length":
            _append_untokenized(out, problems[i])
            continue
        prompt, chosen, rejected = full[i] or ([], [], [])
        cut, truncated = cut_to_max_length(prompt, chosen, rejected, max_length)
        if cut is None and not problems[i][0]:
            problems[i] = (
                "prompt fills max_length",
                f"field 'prompt': is {len(prompt)} tokens, which fills max_length={max_length} and leaves no room "
                "for a completion; raise --max-length or shorten the prompt",
            )
        cut = cut or TokenizedPair([], [], [])
        for name in ID_COLUMNS:
            out[name].append(cut[name])
        out["prompt_tokens"].append(len(prompt))
        out["chosen_tokens"].append(len(chosen))
        out["rejected_tokens"].append(len(rejected))
        out["truncated"].append(truncated)
        out["problem"].append(problems[i][0])
        out["problem_message"].append(problems[i][1])
    return out


def _append_untokenized(out: dict[str, list], problem: tuple[str, str]) -> None:
    for name in ID_COLUMNS:
        out[name].append([])
    for name in ("prompt_tokens", "chosen_tokens", "rejected_tokens"):
        out[name].append(NOT_TOKENIZED)
    out["truncated"].append(False)
    out["problem"].append(problem[0])
    out["problem_message"].append(problem[1])


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
            record = {name: _loaded_text(text[name], text["is_chat"]) for name in ("prompt", "chosen", "rejected")}
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


def _loaded_text(stored: str, is_chat: bool) -> Text:
    return json.loads(stored) if is_chat else stored


def read_options(data: DataSection) -> ReadOptions:
    return ReadOptions(
        format=data.format,
        columns=parse_columns(data.columns),
        on_invalid=data.on_invalid,
        max_record_bytes=max(MAX_RECORD_BYTES, RECORD_BYTES_PER_TOKEN * data.max_length),
    )


def prepare_split(tokenizer, paths: list[str], data: DataSection, name: str, console: Console) -> PreparedSplit:
    """Read, check and tokenize the files of one split, or find them already prepared in the cache."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # our own lines say what is happening; datasets' bars would interleave with them
    started = time.perf_counter()
    if not paths:
        flag = "--eval-data" if name == "eval" else "--data"
        raise UserError(f"no {name} data: pass {flag} FILE.jsonl or set data.{name} in the recipe")
    options = read_options(data)
    for path in paths:  # before fingerprinting them: a missing file is the user's one-line error, not a traceback
        check_readable(path)
    if data.chat_template:
        use_chat_template(tokenizer, data.chat_template)
    settings = {"format": options.format, "columns": options.columns, "max_length": data.max_length}
    root = cache_root(data.cache_dir)
    target = root / "prepared" / prepared_key(paths, settings, tokenizer_fingerprint(tokenizer))
    prepared = _open_prepared(target)
    from_cache = prepared is not None
    if not from_cache:
        prepared, from_cache = _prepare_once(target, root, tokenizer, paths, options, data.max_length, name, console)
    texts, tokenized, read = prepared
    return PreparedSplit(texts, tokenized, read, from_cache, time.perf_counter() - started)


def _prepare_once(target: Path, root: Path, tokenizer, paths, options, max_length: int, name: str, console):
    """(prepared, from_cache): build `target` holding its lock, or read what the run waited for made; a problem of
    the cache's disk (not writable, full) is one line naming it."""
    say = partial(console.print, markup=False)
    check_cache_writable(root)
    try:
        with preparing(target, lambda: say(f"{name} data: another run is preparing it in {target}; waiting")):
            prepared = _open_prepared(target)
            if prepared is not None:
                return prepared, True
            if target.exists():
                say(f"{name} data: the prepared copy in {target} is damaged or incomplete; preparing it again")
            with atomic_directory(target, replace=True) as folder:  # built aside, renamed into place whole
                _build(folder, tokenizer, paths, options, max_length, name, console)
    except OSError as error:
        problem = cache_write_error(root, error)
        if problem is None:  # not the cache's disk: a bug, or an input problem the readers should have named
            raise
        raise problem from None
    return _load_prepared(target), False  # just written: a failure here is a bug to see in full


def _open_prepared(target: Path):
    """(texts, tokenized, read) of a complete prepared folder; None when it is missing, damaged or incomplete (a
    file cut short, a different row count, an unreadable line), which the caller then builds again."""
    if not (target / "meta.json").is_file():
        return None
    try:
        return _load_prepared(target)
    except Exception:  # a damaged copy fails in many ways (JSON, Arrow, sizes, counts); all mean: prepare it again
        return None


def _load_prepared(target: Path):
    from datasets import Dataset, concatenate_datasets

    meta = json.loads((target / "meta.json").read_text(encoding="utf-8"))
    for file_name, size in meta["sizes"].items():
        if (target / file_name).stat().st_size != size:
            raise ValueError(f"{target / file_name}: {size} bytes were written, it has others")
    texts = Dataset.from_file(str(target / "texts.arrow"))
    tokenized = concatenate_datasets([Dataset.from_file(str(target / name)) for name in meta["tokenized_files"]])
    read = ReadResult(files=[FileReport(**report) for report in meta["files"]], invalid=read_skipped(target / INVALID))
    pairs = sum(report.pairs for report in read.files)
    if not len(texts) == len(tokenized) == pairs or len(read.invalid) != sum(f.invalid for f in read.files):
        raise ValueError(f"{target}: holds other row counts than were written")
    return texts, tokenized, read


def _build(folder: Path, tokenizer, paths: list[str], options: ReadOptions, max_length: int, name: str, console):
    from datasets import Dataset

    console.print(f"{name} data: reading {', '.join(map(str, paths))}", markup=False)
    result, written = write_texts(folder, paths, options, tokenizer)
    workers = _worker_count() if written >= PARALLEL_FROM else None
    console.print(f"{name} data: tokenizing {written:,} pairs" + (f" in {workers} processes" if workers else ""))
    if written == 0:  # every record was set aside: an empty table, since `map` over no rows writes no file
        from datasets.arrow_writer import ArrowWriter

        with ArrowWriter(features=_tokenized_features(), path=str(folder / "tokenized.arrow")) as writer:
            writer.finalize()
        tokenized_files = ["tokenized.arrow"]
    else:
        tokenized = Dataset.from_file(str(folder / "texts.arrow")).map(
            tokenize_batch,
            batched=True,
            batch_size=1000,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "max_token_chars": chars_per_token(tokenizer)},
            remove_columns=["prompt", "chosen", "rejected", "is_chat", "source"],
            features=_tokenized_features(),
            num_proc=workers,
            cache_file_name=str(folder / "tokenized.arrow"),
            new_fingerprint=folder.name,
        )
        tokenized_files = [Path(f["filename"]).name for f in tokenized.cache_files]
    write_skipped(folder / INVALID, result.invalid)
    meta = {
        "files": [dataclasses.asdict(report) for report in result.files],
        "tokenized_files": tokenized_files,
        "sizes": {path.name: path.stat().st_size for path in folder.iterdir() if path.is_file()},
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")  # last: its presence means complete


def _worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity
        return os.cpu_count() or 1


# The entry point of train and eval ----------------------------------------------------------------------------------


def load_tokenized_split(
    tokenizer,
    paths: list[str],
    max_length: int,
    name: str,
    console: Console,
    data: DataSection | None = None,
    output_dir: Path | None = None,
    with_sources: bool = False,
):
    """Read, check and tokenize the files of one split, telling the user what was set aside or cut.

    `data` carries the reading settings (format, columns, on_invalid, chat_template, eval_split, cache_dir). With
    `data.eval_split` and no eval files, "train" is the larger part of the train files and "eval" the held-out rest.
    Under `on_invalid: skip`, the skipped records are written to `output_dir/skipped-{name}.jsonl`.
    Returns (a datasets.Dataset of {prompt_ids, chosen_ids, rejected_ids} rows, a TokenizeSummary); `with_sources`
    adds each pair's `source` (file:line), so per-pair results (`eval --per-example`) can point back at the record.
    """
    import numpy as np

    data = dataclasses.replace(data or DataSection(), max_length=max_length)
    part = None
    if data.eval_split and not data.eval:
        part, paths = name, (data.train if name == "eval" and not paths else paths)
    prepared = prepare_split(tokenizer, paths, data, name, console)
    problem_rows = prepared.problem_rows()
    skipped = prepared.read.invalid + prepared.tokenization_problems(problem_rows)
    if skipped and data.on_invalid == "error":
        raise UserError(f"{skipped[0].message} (or pass --on-invalid skip to set bad records aside)")
    keep = np.setdiff1d(np.arange(len(prepared.tokenized)), problem_rows)
    if part is not None:
        keep = _split_part(keep, data.eval_split, part)
    hashes = np.asarray(prepared.tokenized.data.column("pair_hash").to_numpy())[keep]
    truncated = np.asarray(prepared.tokenized.data.column("truncated").to_numpy(zero_copy_only=False))[keep]
    skipped_here = skipped if part != "eval" else []  # the held-out part's skips are the train part's, said once
    summary = TokenizeSummary(
        kept=len(keep),
        dropped_long_prompt=[r.source for r in skipped_here if r.reason == "prompt fills max_length"],
        truncated=int(truncated.sum()),
        skipped=skipped_here,
        duplicates=len(hashes) - len(np.unique(hashes)),
        from_cache=prepared.from_cache,
    )
    if summary.skipped and output_dir is not None:
        write_skipped(Path(output_dir) / f"skipped-{name}.jsonl", summary.skipped)
    report_tokenization(summary, name, max_length, console, prepared, output_dir)
    if not summary.kept:
        raise UserError(f"{name} data: no pair is left to use; {len(skipped):,} records or pairs were skipped")
    pairs = prepared.tokenized.select(keep.tolist()).select_columns(ID_COLUMNS)
    if with_sources:
        pairs = pairs.add_column("source", prepared.texts.select(keep.tolist())["source"])
    return pairs, summary


def _split_part(rows, fraction: float, part: str):
    """The rows of the "eval" (held-out) or "train" part, in file order; the held-out part has at least one row."""
    import numpy as np

    if len(rows) == 0:  # nothing to split: the caller says that no pair is left
        return rows
    if len(rows) == 1:
        raise UserError("data.eval_split needs at least 2 pairs to split, and there is 1; add data or drop the split")
    held_out = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    chosen = order[:held_out] if part == "eval" else order[held_out:]
    return rows[np.sort(chosen)]


def report_tokenization(
    summary: TokenizeSummary,
    name: str,
    max_length: int,
    console: Console,
    prepared: PreparedSplit | None = None,
    output_dir: Path | None = None,
) -> None:
    line = f"{name} data: {summary.kept:,} pairs"
    if prepared is not None:
        formats = ", ".join(sorted({report.format for report in prepared.read.files}))
        how = "from cache" if prepared.from_cache else "prepared"
        line += f" ({formats}; {how} in {prepared.seconds:.1f} s)"
    if summary.truncated:
        line += f", {summary.truncated:,} with a completion cut at max_length={max_length}"
    console.print(line, markup=False)
    if summary.skipped:
        where = f"; they are in {Path(output_dir) / f'skipped-{name}.jsonl'}" if output_dir is not None else ""
        text = f"{name} data: skipped {len(summary.skipped):,}: {skipped_summary(summary.skipped)}{where}"
        console.print(text, style="yellow", markup=False)
    if summary.duplicates:
        text = f"{name} data: {summary.duplicates:,} pairs repeat an earlier pair exactly"
        console.print(text, style="yellow", markup=False)
