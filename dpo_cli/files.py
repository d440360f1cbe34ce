"""Writing outputs so that an interrupted run never leaves a half-written file or folder behind.

Every file goes to a temporary name in the same folder and is renamed over the target: a rename within one
filesystem is atomic, so readers see either the old file or the new one. Folders are built under a temporary
name and renamed into place the same way. Each file is fsynced before its rename and the folder after it, so a
power cut cannot leave a renamed-but-empty file either (the durable-write recipe).

Temporary names are `.{target}.{pid}.{random}.tmp`: a run that was killed leaves them behind, and the next run
removes the ones whose process is gone (`remove_stale_temporaries`), never anything of another name.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dpo_cli.errors import UserError

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28")


class DiskFull(UserError):
    """A write failed for lack of space; what was complete before it is intact."""


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def fsync_folder(folder: Path) -> None:
    """Make the renames and creations in `folder` durable (a file's fsync does not cover its directory entry)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder, deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(folder))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes files private (0600); ours read like any other file
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    """A plain write of a file inside a folder that `atomic_directory` will fsync and rename as a whole.

    Written by us rather than by a library so that a full disk surfaces as an OSError (ENOSPC) we can name.
    """
    with open(path, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_directory(target: Path, replace: bool = False, owner_in_name: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it is renamed to `target`, on failure removed.

    `owner_in_name` puts this process's id in the temporary name, so that `remove_stale_temporaries` can tell a
    killed writer's folder from a live one's. It is off by default because some readers derive names from the
    folder's (the `datasets` library refuses fingerprints over 64 characters).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = _temporary_prefix(target) if owner_in_name else f".{target.name}."
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private (0700); the renamed result should not be
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            if not replace:
                raise FileExistsError(target)
            # Killed between these two renames, the next start puts `old` back (see remove_stale_temporaries).
            old = target.with_name(f"{_temporary_prefix(target)}old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            fsync_folder(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_folder(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_folder(folder: Path) -> None:
    """Delete `folder` so that it is either whole or gone: renamed to a temporary name first (removed by the next
    start if this process is killed mid-way), never a half-deleted folder under its real name."""
    folder = Path(folder)
    doomed = folder.with_name(f"{_temporary_prefix(folder)}{secrets.token_hex(4)}.tmp")
    os.replace(folder, doomed)
    fsync_folder(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def move_files_into(source: Path, target: Path) -> None:
    """Rename each file of `source` into `target` (each rename atomic and durable), then remove `source`."""
    target.mkdir(parents=True, exist_ok=True)
    fsync_tree(source)
    for item in sorted(Path(source).iterdir()):
        os.replace(item, target / item.name)
    fsync_folder(target)
    Path(source).rmdir()


def _process_is_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def remove_stale_temporaries(folder: Path, target_names: str) -> list[Path]:
    """Remove what killed writes left in `folder`: temporary files and folders of targets whose name matches the
    regular expression `target_names`, made by a process that is gone. A folder set aside while being replaced
    (`.{target}.{pid}.old`) is put back when the replacement never landed, else removed. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # Ours: .{target}.{pid}.{8 random chars}.tmp and .{target}.{pid}.old; older dpo-cli wrote no pid.
    pattern = re.compile(rf"^\.(?P<target>{target_names})\.(?:(?P<pid>\d+)\.)?(?:[a-z0-9_]{{8}}\.tmp|(?P<old>old))$")
    removed = []
    for entry in sorted(folder.iterdir()):
        match = pattern.match(entry.name)
        if not match or (match["pid"] and not _process_is_gone(int(match["pid"]))):
            continue
        target = folder / match["target"]
        if match["old"] and not target.exists():
            os.replace(entry, target)
            fsync_folder(folder)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a write refused for lack of space; libraries word it their own way."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def disk_full_as_user_error(what: str, then: str) -> Iterator[None]:
    """Turn a full disk while writing `what` into one line saying so and what to do (`then`)."""
    try:
        yield
    except Exception as error:
        if is_disk_full(error):
            raise DiskFull(f"disk full while writing {what}; free space and {then}") from None
        raise


def read_user_text(path: Path | str, what: str, hint: str) -> str:
    """The UTF-8 text of a file the user named, or one line saying why it cannot be read and what to pass."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found; {hint}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read the {what} ({error.__class__.__name__}); {hint}") from None


def standard_json(value):
    """`value` with every NaN or infinity as None, so `json.dumps(..., allow_nan=False)` writes standard JSON:
    Python's default `NaN` and `Infinity` tokens are not JSON, and strict readers (jq, browsers, other languages)
    refuse the whole file. Dicts, lists and tuples are walked; anything else is returned as it is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: standard_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(item) for item in value]
    return value
