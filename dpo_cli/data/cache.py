"""Where prepared (read, checked, tokenized) data is kept between runs, and the fingerprints that name it.

A prepared split is a folder named by a hash of everything its content depends on: the bytes of every input file
(not its modification time, so a copy or a touch reuses it and an edit does not), how the files are read (format,
column mapping), the tokenizer (vocabulary, merges, special tokens, chat template) and `max_length`. A rerun with
the same inputs finds the folder and memory-maps it, so training starts in seconds; change any input and the name
changes. Folders are built under a temporary name and renamed into place, so an interrupted build leaves nothing
that a later run could mistake for a finished one. A folder that is there but damaged (a file cut short by a full disk
or a crash before its data reached the disk, a missing file, other row counts than it was written with) is found
when it is opened and prepared again; a cache that cannot be written is one line naming it, before any model loads.
One run at a time prepares a folder (a lock in `locks/`, which the system lets go when a run dies): a second run with
the same inputs waits and then reads what the first made, and the run holding the lock removes what killed builds of
that folder left behind.

The root is `data.cache_dir`, else `$DPO_CLI_CACHE`, else `$XDG_CACHE_HOME/dpo-cli` (`~/.cache/dpo-cli`). Nothing
is ever evicted automatically: delete the folder to reclaim the space.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from dpo_cli.data.records import FileReport, ReadResult
from dpo_cli.data.skipped import read_skipped, write_skipped
from dpo_cli.errors import UserError
from dpo_cli.files import atomic_directory

CACHE_VERSION = "2"
"""Bump when the layout or the meaning of a prepared folder changes, so older folders are not reused."""
HASH_CHUNK = 1 << 22
INVALID = "invalid.jsonl"
"""The records reading set aside, in a prepared folder."""


def cache_root(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("DPO_CLI_CACHE"):
        return Path(os.environ["DPO_CLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpo-cli"


CACHE_HINT = "set data.cache_dir in the recipe or $DPO_CLI_CACHE to a writable folder"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def check_cache_writable(root: Path) -> None:
    """Make sure prepared data can be written under `root` (making the folders), or say in one line why not."""
    try:
        (root / "prepared").mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=root / "prepared", prefix=".probe.", suffix=".tmp"))
    except OSError as error:
        raise cache_write_error(root, error, always=True) from None


def lock_path(target: Path) -> Path:
    """The lock file of a prepared folder: in `locks/` beside `prepared/`, which holds prepared folders only."""
    locks = target.parent.with_name("locks")
    locks.mkdir(exist_ok=True)
    return locks / f"{target.name}.lock"


@contextlib.contextmanager
def preparing(target: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    """Hold the lock for building `target`, calling `on_wait` first if another run holds it, and remove the temporary
    and replaced folders of killed builds (`.<name>.*`): while the lock is held, no live run is writing them."""
    import fcntl

    with open(lock_path(target), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in target.parent.glob(f".{target.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        yield  # the lock goes with the file's closing, or with the process


def cache_write_error(root: Path, error: OSError, always: bool = False) -> UserError | None:
    """The one line for `error` while writing the cache at `root`; None when it is not about that disk."""
    inside = error.filename is not None and Path(str(error.filename)).resolve().is_relative_to(root.resolve())
    if not (always or inside or error.errno in (*DISK_FULL, errno.EROFS)):  # Arrow's write errors name no file
        return None
    if error.errno in DISK_FULL:
        return UserError(f"{root}: data cache: no space left for the prepared data; free space there or {CACHE_HINT}")
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return UserError(f"{root}: data cache: a part of this path is a file, not a folder; {CACHE_HINT}")
    return UserError(f"{root}: data cache: cannot write there ({error.strerror or error}); {CACHE_HINT}")


_FINGERPRINTS_SEEN: dict[tuple, str] = {}
"""This process's hashes of large files by (resolved path, size, mtime_ns, inode): a run asks for each data file's
hash three times (the resume fingerprint, the prepared-data key, the model card), and a large file is read once."""
REMEMBER_FROM_BYTES = 64 << 20
"""Only files this large are remembered: rehashing a small one costs little, and a file's time may tick only every
few ms, so a small file rewritten at once with the same size could keep its time; 64 MiB takes longer to write."""


def file_fingerprint(path: Path) -> str:
    """A hash of the content of a file, or of every file (with its relative name) in a folder."""
    path = Path(path)
    identity = _file_identity(path)
    if identity is not None and identity in _FINGERPRINTS_SEEN:
        return _FINGERPRINTS_SEEN[identity]
    fingerprint = _content_hash(path)
    if identity is not None:
        _FINGERPRINTS_SEEN[identity] = fingerprint
    return fingerprint


def _file_identity(path: Path) -> tuple | None:
    """What changes when a large regular file is rewritten; None for a small file, or a folder (its own times miss
    its files' changes)."""
    try:
        stat = path.stat()
    except OSError:
        return None  # _content_hash says what is wrong
    if not path.is_file() or stat.st_size < REMEMBER_FROM_BYTES:
        return None
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _content_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if not file.is_file():  # a pipe or device: opening it could wait forever for a writer
                raise UserError(f"{file}: is not a regular file (a pipe, device or socket); pass a data file")
            if path.is_dir():
                digest.update(os.fsencode(file.relative_to(path)) + b"\0")  # names need not be UTF-8
            with file.open("rb") as handle:
                while chunk := handle.read(HASH_CHUNK):
                    digest.update(chunk)
    except OSError as error:  # e.g. a file in a dataset folder that cannot be read
        raise UserError(f"{error.filename or path}: cannot read ({error.strerror or error}); check the file") from None
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the serialized fast tokenizer (vocabulary, merges, normalizer,
    post-processor and its BOS/EOS rules) or a slow one's vocabulary, plus special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = json.loads(backend.to_str())
        # Padding and truncation are call-time state, not token ids: a tokenizer saved after padding a batch (the
        # copy in an adapter folder) must name the same prepared data and reference log-probs as its base's.
        serialized.pop("padding", None)
        serialized.pop("truncation", None)
        model = json.dumps(serialized, sort_keys=True)
    else:
        model = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = {
        "class": type(tokenizer).__name__,
        "model": model,
        "special": {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        "eos": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template or "",
        "add_bos": str(getattr(tokenizer, "add_bos_token", None)),
        "add_eos": str(getattr(tokenizer, "add_eos_token", None)),
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def prepared_key(paths: list[str], settings: dict, tokenizer_print: str) -> str:
    """The folder name of a prepared split: files (path and content, in order), settings and tokenizer."""
    files = [[str(Path(p).resolve()), file_fingerprint(Path(p))] for p in paths]
    blob = json.dumps({"version": CACHE_VERSION, "files": files, "settings": settings, "tokenizer": tokenizer_print})
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


# An entry: found whole, or built aside under the lock ---------------------------------------------------------------


def open_or_build(target: Path, build: Callable[[Path], None], say: Callable[[str], None]):
    """((texts, tokenized, read), from_cache) of the prepared folder `target`: opened if it is whole, else built by
    `build(folder)` in a temporary folder, holding its lock, and renamed into place; a problem of the cache's disk
    (not writable, full) is one line naming it."""
    prepared = open_prepared(target)
    if prepared is not None:
        return prepared, True
    root = target.parent.parent
    check_cache_writable(root)
    try:
        with preparing(target, lambda: say(f"another run is preparing it in {target}; waiting")):
            prepared = open_prepared(target)
            if prepared is not None:
                return prepared, True
            if target.exists():
                say(f"the prepared copy in {target} is damaged or incomplete; preparing it again")
            with atomic_directory(target, replace=True) as folder:  # built aside, renamed into place whole
                build(folder)
    except OSError as error:
        problem = cache_write_error(root, error)
        if problem is None:  # not the cache's disk: a bug, or an input problem the readers should have named
            raise
        raise problem from None
    return load_prepared(target), False  # just written: a failure here is a bug to see in full


def write_meta(folder: Path, read: ReadResult, tokenized_files: list[str]) -> None:
    """Write what reading set aside, then `meta.json` last: its presence means the folder is complete."""
    write_skipped(folder / INVALID, read.invalid)
    meta = {
        "files": [dataclasses.asdict(report) for report in read.files],
        "tokenized_files": tokenized_files,
        "sizes": {path.name: path.stat().st_size for path in folder.iterdir() if path.is_file()},
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def open_prepared(target: Path):
    """(texts, tokenized, read) of a complete prepared folder; None when it is missing, damaged or incomplete (a
    file cut short, a different row count, an unreadable line), which the caller then builds again."""
    if not (target / "meta.json").is_file():
        return None
    try:
        return load_prepared(target)
    except Exception:  # a damaged copy fails in many ways (JSON, Arrow, sizes, counts); all mean: prepare it again
        return None


def load_prepared(target: Path):
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
