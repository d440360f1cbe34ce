"""Where dpo-cli may write: output folders it owns, one run at a time, and output files that replace only its own.

A folder dpo-cli writes into is either new, empty, or one it wrote before for the same command: `train` output holds
a marker file saying `{"kind": "train"}`, `merge-adapter` output `{"kind": "merge"}`. Anything else (the base model's
folder, a folder of the user's files, the adapter folder as a merge target) is refused before any model loads, so no
user file is ever overwritten. While a command writes a folder it holds an exclusive `flock` on a lock file in it: a
second command into the same folder refuses at once, and a killed run's lock goes away with its process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from dpo_cli.errors import UserError
from dpo_cli.files import write_text_atomic

MARKER = ".dpo-cli.json"
LOCK = ".dpo-cli.lock"
_OWN_FILES = {MARKER, LOCK}
# A train run written before the marker existed: its recipe and at least one of the files only a run writes.
_LEGACY_TRAIN_FILES = ("metrics.jsonl", "adapter_config.json", "checkpoints")


def file_above(path: Path) -> Path | None:
    """The nearest existing part of `path` (itself included) that is not a folder, or None."""
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            return None if part.is_dir() else part
    return None


def check_placeable(path: Path, flag: str) -> None:
    """`path` could be created: no file is in the way above it, and the folder it would go in is writable."""
    blocker = file_above(Path(path).parent)
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, so nothing can be made below it; pick another path")
    existing = next(part for part in (Path(path).absolute().parent, *Path(path).absolute().parents) if part.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable (read-only or no permission); pick another path")


def is_within(path: Path | str, folder: Path | str) -> bool:
    """`path` is `folder` or lies below it, after resolving links."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def local_folder(path: str | None) -> Path | None:
    """A model argument that names a local folder, else None (a hub id)."""
    return Path(path) if path and Path(path).is_dir() else None


def written_kind(folder: Path) -> str | None:
    """ "train" or "merge" for a folder dpo-cli wrote; None for anything else."""
    try:
        kind = json.loads((folder / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind is None and (folder / "recipe.yaml").is_file():
        if any((folder / name).exists() for name in _LEGACY_TRAIN_FILES):
            return "train"
    return kind if isinstance(kind, str) else None


def user_entries(folder: Path) -> list[str]:
    """What a folder holds besides dpo-cli's own marker and lock file."""
    return sorted(entry.name for entry in folder.iterdir() if entry.name not in _OWN_FILES)


def check_folder_is_ours(folder: Path, kind: str, flag: str, hint: str) -> None:
    """A folder we may write `kind` output into: new, empty, or written by dpo-cli for the same command."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder; pick another path")
    if not folder.is_dir():
        return
    entries = user_entries(folder)
    if not entries:
        return
    found = written_kind(folder)
    if found == kind:
        return
    what = f"a dpo-cli {found} output" if found else f"files dpo-cli did not write ({', '.join(entries[:3])}"
    what += "" if found else (", ...)" if len(entries) > 3 else ")")
    raise UserError(f"{flag} {folder}: holds {what}; dpo-cli writes only into a new or empty folder{hint}")


def _lock(lock_path: Path, flag: str, folder: Path) -> int:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise UserError(
            f"{flag} {folder}: in use by another dpo-cli process (pid {holder}); wait for it to end or pick another "
            "folder"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def claimed_folder(folder: Path, kind: str, flag: str) -> Iterator[Path]:
    """Create `folder` if needed, hold its lock while the block runs, mark it as `kind` output.

    If the block fails and the folder holds nothing but the marker and the lock file, they go (and the folders made
    here too): a run refused for bad data leaves nothing behind.
    """
    folder = Path(folder)
    made = [part for part in (folder, *folder.parents) if not part.exists()]  # removed again on failure, if empty
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock(folder / LOCK, flag, folder)
    except OSError as error:
        raise UserError(f"{flag} {folder}: cannot write there ({error.strerror}); pick another folder") from None
    try:
        try:
            write_text_atomic(folder / MARKER, json.dumps({"kind": kind, "written_by": "dpo-cli"}) + "\n")
        except OSError as error:
            raise UserError(f"{flag} {folder}: cannot write there ({error.strerror}); pick another folder") from None
        yield folder
    except BaseException:
        if not user_entries(folder):
            for name in _OWN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            for part in made:
                try:
                    part.rmdir()
                except OSError:
                    break
        raise
    finally:
        os.close(fd)  # closing releases the flock; the kernel does the same for a killed process


def mark_folder(folder: Path, kind: str) -> None:
    """The marker alone, for a folder built under a temporary name and renamed into place (merge's)."""
    write_text_atomic(Path(folder) / MARKER, json.dumps({"kind": kind, "written_by": "dpo-cli"}) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give every file in `folder` the mode a plain open() would have (0666 minus the umask).

    safetensors writes its files 0600 (through a private temporary file); every other output is 0644 under the usual
    umask, and an adapter or merged model nobody else can read surprises whoever shares the folder.
    """
    mode = 0o666 & ~_umask()
    for entry in Path(folder).iterdir():
        if entry.is_file() and not entry.is_symlink() and stat.S_IMODE(entry.stat().st_mode) != mode:
            os.chmod(entry, mode)


# Output files (eval's) ----------------------------------------------------------------------------------------------

# The keys that show an existing file is an earlier output of the same kind, so replacing it loses nothing.
_OUTPUT_KEYS = {
    "--output": {"adapter", "metrics"},
    "--per-example": {"source", "index", "margin"},
    "--samples": {"index", "prompt", "policy", "reference"},
    "skipped": {"source", "reason", "record"},
}


def _first_json(path: Path, whole: bool) -> object:
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read() if whole else handle.readline(1 << 20)
    return json.loads(text) if text.strip() else {}


def is_replaceable_output(path: Path, kind: str) -> bool:
    """`path` is absent, empty, or an earlier dpo-cli output of this kind (checked on its first record)."""
    path = Path(path)
    if not path.exists() or (path.is_file() and path.stat().st_size == 0):
        return True
    if not path.is_file():
        return False
    try:
        first = _first_json(path, whole=kind == "--output" and path.stat().st_size < (1 << 24))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and _OUTPUT_KEYS[kind] <= first.keys()
