"""Where prepared (read, checked, tokenized) data is kept between runs, and the fingerprints that name it.

A prepared split is a folder named by a hash of everything its content depends on: the bytes of every input file
(not its modification time, so a copy or a touch reuses it and an edit does not), how the files are read (format,
column mapping), the tokenizer (vocabulary, merges, special tokens, chat template) and `max_length`. A rerun with
the same inputs finds the folder and memory-maps it, so training starts in seconds; change any input and the name
changes. Folders are built under a temporary name and renamed into place, so an interrupted build leaves nothing
that a later run could mistake for a finished one.

The root is `data.cache_dir`, else `$DPO_CLI_CACHE`, else `$XDG_CACHE_HOME/dpo-cli` (`~/.cache/dpo-cli`). Nothing
is ever evicted automatically: delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_VERSION = "1"
"""Bump when the layout or the meaning of a prepared folder changes, so older folders are not reused."""
HASH_CHUNK = 1 << 22


def cache_root(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("DPO_CLI_CACHE"):
        return Path(os.environ["DPO_CLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpo-cli"


def file_fingerprint(path: Path) -> str:
    """A hash of the content of a file, or of every file (with its relative name) in a folder."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the serialized fast tokenizer (vocabulary, merges, normalizer,
    post-processor and its BOS/EOS rules) or a slow one's vocabulary, plus special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = backend.to_str()
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
