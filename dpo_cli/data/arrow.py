"""How prepared pairs sit in Arrow: the two tables of a prepared split and how a pair's texts are stored in them.

`texts.arrow` holds each pair as read (texts, whether it is chat, its source, which file, a hash to find exact
duplicates); `tokenized.arrow` holds, row for row, its cut ids, untruncated token counts and any problem.
"""

from __future__ import annotations

import hashlib
import json

from dpo_cli.data.formats import Text

TEXT_COLUMNS = ["prompt", "chosen", "rejected", "is_chat", "source", "file_index", "pair_hash"]
TOKENIZED_COLUMNS = [
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "prompt_tokens",
    "chosen_tokens",
    "rejected_tokens",
    "truncated",
    "problem",
    "problem_message",
]
"""What `tokenize.tokenize_batch` returns per pair; `file_index` and `pair_hash` are carried over from the texts."""


def text_features():
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


def tokenized_features():
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


def stored_text(text: Text) -> str:
    """Text pairs are stored as they are; chat pairs as JSON, so one Arrow schema holds both."""
    return json.dumps(text, ensure_ascii=False) if isinstance(text, list) else text


def loaded_text(stored: str, is_chat: bool) -> Text:
    return json.loads(stored) if is_chat else stored


def pair_hash(prompt: str, chosen: str, rejected: str, is_chat: bool) -> int:
    blob = "\0".join((str(is_chat), prompt, chosen, rejected)).encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little", signed=True)
