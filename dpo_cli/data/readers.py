"""Opening preference files of every container, one decoded record at a time.

`.jsonl` and `.json` (read by `json_text`), either of them `.gz` or `.zst` compressed (recognised by their magic bytes,
whatever the name), `.parquet`, and a folder written by `datasets.save_to_disk`. Every record is a `decode.RawRecord`:
its place, its raw text, and its value or its problem; whether a problem stops the run is the caller's choice.
File-level problems (missing, binary, damaged, a pipe) are one `UserError` line here.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from dpo_cli.data.decode import MAX_RECORD_BYTES, SUPPORTED, RawRecord, is_utf8
from dpo_cli.data.json_text import text_records
from dpo_cli.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"


def open_records(path: Path, max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[RawRecord]:
    """Every record of one file or dataset folder; file-level problems (missing, binary, ...) raise UserError."""
    path = check_readable(path)
    if path.is_dir():
        return _saved_dataset_records(path)
    head = _read_head(path)
    if head.startswith(PARQUET_MAGIC):
        return _parquet_records(path)
    if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC):
        return text_records(path, _open_compressed(path, head), max_record_bytes)
    if b"\x00" in head:
        raise UserError(f"{path}: binary data, not text; pass {SUPPORTED}")
    return text_records(path, _open(path), max_record_bytes)


def check_readable(path: Path) -> Path:
    """The path, if it is a file or a dataset folder that can be read; else the one-line reason why not."""
    path = Path(path)
    if not is_utf8(str(path)):  # bytes that are no UTF-8 reach Python as lone surrogates, which Arrow refuses
        shown = os.fsencode(path).decode("utf-8", errors="backslashreplace")  # printable wherever stderr goes
        raise UserError(f"{shown}: the path is not valid UTF-8, and places in the data are kept as text; rename it")
    mode = _mode(path)
    if stat.S_ISDIR(mode):
        if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise UserError(f"{path}: is a folder but not one saved by datasets.save_to_disk; pass {SUPPORTED}")
    elif stat.S_ISREG(mode):
        _read_head(path)
    else:  # a pipe would block the run on open, and a device or socket is no data file either
        raise UserError(f"{path}: is not a regular file (a pipe, device or socket); pass {SUPPORTED}")
    return path


def _mode(path: Path) -> int:
    """The file type bits of `path` (following links), or the one-line reason it cannot be looked at."""
    try:
        return path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; check the path") from None
    except NotADirectoryError:
        above = _file_above(path)
        raise UserError(f"{path}: {above} is a file, not a folder; check the path") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied on a folder of the path; make it readable") from None
    except OSError as error:  # a symbolic link loop, a name too long, an I/O error, ...
        raise UserError(f"{path}: cannot open ({error.strerror or error}); check the path") from None


def _file_above(path: Path) -> Path:
    """The first part of `path` that is a file (where a folder was expected)."""
    for parent in reversed(path.parents):
        if parent.is_file():
            return parent
    return path.parent


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable") from None
    except OSError as error:
        raise UserError(f"{path}: cannot open ({error.strerror or error}); check the path") from None


def _read_head(path: Path) -> bytes:
    try:
        with _open(path) as handle:
            return handle.read(4096)
    except OSError as error:  # e.g. EIO, or EISDIR for a name that became a folder meanwhile
        raise UserError(f"{path}: cannot read ({error.strerror or error}); check the file") from None


def _open_compressed(path: Path, head: bytes) -> IO[bytes]:
    if head.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    import zstandard

    if not _zstd_frames_complete(path):  # zstandard's reader just stops at a cut end, where gzip raises
        raise UserError(f"{path}: cannot read (it ends inside a Zstandard frame); the file is damaged or incomplete")
    return zstandard.ZstdDecompressor().stream_reader(path.open("rb"), read_across_frames=True, closefd=True)


ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def _zstd_frames_complete(path: Path) -> bool:
    """Whether every Zstandard frame of the file is whole, told from frame and block headers alone (seeking over
    the block contents, RFC 8878 section 3.1), so checking costs a few reads per 128 KiB block."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        while handle.tell() < size:
            magic = int.from_bytes(handle.read(4), "little")
            if magic in ZSTD_SKIPPABLE:
                handle.seek(int.from_bytes(handle.read(4), "little"), io.SEEK_CUR)
            elif magic == int.from_bytes(ZSTD_MAGIC, "little"):
                descriptor = handle.read(1)[0] if handle.tell() < size else 0
                single_segment, fcs_flag = descriptor >> 5 & 1, descriptor >> 6
                header = (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]
                header += (single_segment, 2, 4, 8)[fcs_flag]
                handle.seek(header, io.SEEK_CUR)
                last = False
                while not last and handle.tell() + 3 <= size:
                    block = int.from_bytes(handle.read(3), "little")
                    last, kind = bool(block & 1), block >> 1 & 3
                    handle.seek(1 if kind == 1 else block >> 3, io.SEEK_CUR)  # an RLE block holds one byte
                if not last:
                    return False
                handle.seek(4 * (descriptor >> 2 & 1), io.SEEK_CUR)  # the content checksum
            else:
                return True  # not a frame: the decompressor says what is wrong
            if handle.tell() > size:
                return False
    return True


def _saved_dataset_records(path: Path) -> Iterator[RawRecord]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise UserError(f"{path}: holds several splits ({', '.join(splits)}); pass one of them, e.g. {path}/train")
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as error:  # a damaged save: tell which folder, not where in datasets it broke
        raise UserError(f"{path}: cannot load the saved dataset ({error.__class__.__name__}: {error})") from None
    return _rows(path, (row for batch in dataset.iter(batch_size=1000) for row in _batch_rows(batch)))


def _parquet_records(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow's errors for a damaged footer vary by version
        raise UserError(f"{path}: cannot read the Parquet file ({error}); is it complete?") from None
    return _rows(path, (row for batch in parquet.iter_batches(batch_size=1000) for row in batch.to_pylist()))


def _batch_rows(batch: dict[str, list]) -> Iterator[dict]:
    names = list(batch)
    for values in zip(*(batch[name] for name in names), strict=True):
        yield dict(zip(names, values, strict=True))


def _rows(path: Path, rows: Iterator[dict]) -> Iterator[RawRecord]:
    index = 0
    try:
        for index, row in enumerate(rows):  # noqa: B007 (the index is the place of a damaged row)
            yield RawRecord(f"{path}: row {index}", json.dumps(row, ensure_ascii=False, default=str), value=row)
    except (OSError, ValueError) as error:  # pyarrow's errors for a damaged body (ArrowInvalid is a ValueError)
        raise UserError(f"{path}: row {index}: cannot read ({error}); the file is damaged or incomplete") from None
