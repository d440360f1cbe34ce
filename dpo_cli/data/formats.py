"""The shapes preference data comes in, and how each becomes (prompt, chosen, rejected).

One decoded record goes in; a list of `Pair`s comes out, or a `RecordProblem` naming the field and what to do.
A pair's texts are plain strings, or, for chat data, lists of `{"role", "content"}` messages that tokenization
renders with the tokenizer's chat template as TRL does. The formats:

  explicit        {"prompt", "chosen", "rejected"} strings
  hh-rlhf         {"chosen", "rejected"} whole dialogues; the prompt is their shared prefix up to the last
                  "\\n\\nAssistant:" turn (Anthropic HH-RLHF)
  conversational  prompt/chosen/rejected as message lists; without "prompt", the shared leading messages are the
                  prompt (TRL's `extract_prompt`)
  openai          OpenAI fine-tuning DPO: {"input": {"messages"}, "preferred_output", "non_preferred_output"}
  sharegpt        {"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": {...}}
  oasst           Open Assistant message trees: every two sibling assistant replies with different human ranks
  stack-exchange  {"question", "response_j" (preferred), "response_k"}, read as explicit

Nothing here reads files or knows about tokenizers: it is pure functions of decoded records, easy to test alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from dpo_cli.errors import UserError, shown

Messages = list[dict[str, str]]
Text = str | Messages

HH_ASSISTANT = "\n\nAssistant:"
PAIR_FIELDS = ("prompt", "chosen", "rejected")
COLUMN_TARGETS = (*PAIR_FIELDS, "completion", "messages", "text")
"""What --columns can map a file's names onto: a pair's fields, and the SFT formats' (data/sft_formats.py)."""


@dataclass(frozen=True)
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


class RecordProblem(Exception):
    """What is wrong with one record: a reason to count it under, the field, the problem and the fix."""

    def __init__(self, reason: str, field: str | None, detail: str, fix: str):
        super().__init__(detail)
        self.reason = reason
        self.field = field
        self.detail = detail
        self.fix = fix

    def line(self, where: str) -> str:
        field = f" field '{self.field}':" if self.field else ""
        return f"{where}:{field} {self.detail}; {self.fix}"


def missing(field: str, needed: str) -> RecordProblem:
    return RecordProblem("missing field", field, "is missing", f"every record needs {needed}")


def wrong_type(field: str, value: Any, expected: str) -> RecordProblem:
    return RecordProblem(
        "wrong type", field, f"must be {expected}, got {_type_name(value)}", "fix the record or pass --format NAME"
    )


def empty(field: str) -> RecordProblem:
    return RecordProblem("empty", field, "is empty", "fill it in or remove the record")


def identical() -> RecordProblem:
    return RecordProblem(
        "chosen equals rejected", "chosen", "is identical to 'rejected', so the pair teaches nothing", "remove it"
    )


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# Field readers ------------------------------------------------------------------------------------------------------


def get_field(record: dict, path: str, needed: str) -> Any:
    """`record["a"]["b"]` for path "a.b", or a missing-field problem naming the whole path."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise missing(path, needed)
        value = value[part]
    return value


def text_field(record: dict, path: str, needed: str) -> str:
    value = get_field(record, path, needed)
    if not isinstance(value, str):
        raise wrong_type(path, value, "a string")
    if not value.strip():
        raise empty(path)
    return value


def check_messages(value: Any, field: str, role_key: str = "role", content_key: str = "content") -> Messages:
    """A non-empty list of {role, content} string messages, copied to exactly those two keys."""
    if not isinstance(value, list):
        raise wrong_type(field, value, "a list of messages")
    if not value:
        raise empty(field)
    messages = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise wrong_type(where, message, f"a message object with {role_key} and {content_key}")
        for key in (role_key, content_key):
            if key not in message:
                raise missing(f"{where}.{key}", f"{role_key} and {content_key} in every message")
        role, content = message[role_key], message[content_key]
        if not isinstance(role, str):
            raise wrong_type(f"{where}.{role_key}", role, "a string")
        if not isinstance(content, str):
            raise wrong_type(f"{where}.{content_key}", content, "a string")
        messages.append({"role": role, "content": content})
    return messages


def check_completion_messages(value: Any, field: str) -> Messages:
    messages = check_messages(value, field)
    if not any(m["content"].strip() for m in messages):
        raise empty(field)
    return messages


def checked_pair(prompt: Text, chosen: Text, rejected: Text) -> Pair:
    if chosen == rejected:
        raise identical()
    return Pair(prompt, chosen, rejected)


# One function per format: record -> pairs ---------------------------------------------------------------------------


def explicit_pairs(record: dict) -> list[Pair]:
    needed = "prompt, chosen and rejected strings"
    prompt = text_field(record, "prompt", needed)
    return [checked_pair(prompt, text_field(record, "chosen", needed), text_field(record, "rejected", needed))]


def hh_rlhf_pairs(record: dict) -> list[Pair]:
    """The prompt is the dialogue both answers share, up to and including the last '\\n\\nAssistant:'."""
    needed = "chosen and rejected dialogues"
    chosen = text_field(record, "chosen", needed)
    rejected = text_field(record, "rejected", needed)
    if chosen == rejected:
        raise identical()
    shared = common_prefix(chosen, rejected)
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RecordProblem(
            "no shared prompt",
            "chosen",
            "shares no '\\n\\nAssistant:' turn with 'rejected', so the prompt cannot be found",
            "add a 'prompt' field (explicit format) or fix the dialogue",
        )
    end = cut + len(HH_ASSISTANT)
    return [checked_pair(chosen[:end], chosen[end:], rejected[end:])]


def common_prefix(a: str, b: str, chunk: int = 4096) -> str:
    """`os.path.commonprefix([a, b])`, comparing slices rather than one character per Python step, so two long
    dialogues that agree for megabytes cost milliseconds."""
    end, start = min(len(a), len(b)), 0
    while start < end and a[start : start + chunk] == b[start : start + chunk]:
        start += chunk
    start = min(start, end)
    while start < end and a[start] == b[start]:
        start += 1
    return a[:start]


def conversational_pairs(record: dict) -> list[Pair]:
    chosen = check_completion_messages(get_field(record, "chosen", "chosen and rejected message lists"), "chosen")
    rejected = check_completion_messages(get_field(record, "rejected", "chosen and rejected message lists"), "rejected")
    if "prompt" in record:
        return [checked_pair(check_messages(record["prompt"], "prompt"), chosen, rejected)]
    if chosen == rejected:
        raise identical()
    prompt, chosen, rejected = extract_prompt_messages(chosen, rejected)
    if not prompt:
        raise RecordProblem(
            "no shared prompt",
            "chosen",
            "shares no leading messages with 'rejected', so the prompt cannot be found",
            "add a 'prompt' message list",
        )
    return [checked_pair(prompt, chosen, rejected)]


def extract_prompt_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    """TRL 1.16's `extract_prompt` on message lists, quirks included: when one list is a prefix of the other, the
    prompt stops one message short of the shorter list's end (its loop index never advances past it)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):  # noqa: B007 (the index after the loop is the point)
        if chosen[idx] != rejected[idx]:
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def openai_pairs(record: dict) -> list[Pair]:
    needed = "input.messages, preferred_output and non_preferred_output"
    prompt = check_messages(get_field(record, "input.messages", needed), "input.messages")
    chosen = check_completion_messages(get_field(record, "preferred_output", needed), "preferred_output")
    rejected = check_completion_messages(get_field(record, "non_preferred_output", needed), "non_preferred_output")
    return [checked_pair(prompt, chosen, rejected)]


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_pairs(record: dict) -> list[Pair]:
    needed = "conversations, chosen and rejected"
    prompt = _sharegpt_messages(get_field(record, "conversations", needed), "conversations")
    if isinstance(record.get("system"), str) and record["system"].strip():
        prompt = [{"role": "system", "content": record["system"]}, *prompt]
    chosen = _sharegpt_messages([get_field(record, "chosen", needed)], "chosen")
    rejected = _sharegpt_messages([get_field(record, "rejected", needed)], "rejected")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages[0]["content"].strip():
            raise empty(f"{field}.value")
    return [checked_pair(prompt, chosen, rejected)]


def _sharegpt_messages(value: Any, field: str) -> Messages:
    single = field != "conversations"  # chosen/rejected hold one message object, not a list
    messages = check_messages(value, field, role_key="from", content_key="value")
    for index, message in enumerate(messages):
        if message["role"] not in SHAREGPT_ROLES:
            where = f"{field}.from" if single else f"{field}[{index}].from"
            raise RecordProblem(
                "unsupported role",
                where,
                f"is {shown(message['role'], 60)}",
                f"use one of {', '.join(sorted(SHAREGPT_ROLES))}",
            )
        message["role"] = SHAREGPT_ROLES[message["role"]]
    return messages


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst_pairs(record: dict) -> list[Pair]:
    """Walk the tree; at each prompter message, every two ranked assistant replies with different ranks are a pair."""
    root = get_field(record, "prompt", "a 'prompt' message tree")
    pairs: list[Pair] = []
    _walk_oasst(root, "prompt", [], pairs)
    if not pairs:
        raise RecordProblem(
            "no ranked replies",
            "prompt",
            "holds no two sibling assistant replies with different ranks",
            "remove the tree; it gives no preference pair",
        )
    return pairs


def _walk_oasst(message: Any, field: str, history: Messages, pairs: list[Pair]) -> None:
    if not isinstance(message, dict):
        raise wrong_type(field, message, "a message object")
    role = get_field(message, "role", "role, text and replies in every message")
    text = text_field(message, "text", "role, text and replies in every message")
    if role not in OASST_ROLES:
        raise RecordProblem("unsupported role", f"{field}.role", f"is {shown(role, 60)}", "use prompter or assistant")
    conversation = [*history, {"role": OASST_ROLES[role], "content": text}]
    replies = message.get("replies", [])
    if not isinstance(replies, list):
        raise wrong_type(f"{field}.replies", replies, "a list")
    live = [(i, r) for i, r in enumerate(replies) if not (isinstance(r, dict) and r.get("deleted"))]
    if role == "prompter":
        ranked = []
        for i, reply in live:
            if isinstance(reply, dict) and reply.get("role") == "assistant" and reply.get("rank") is not None:
                if not isinstance(reply["rank"], int):
                    raise wrong_type(f"{field}.replies[{i}].rank", reply["rank"], "an integer")
                ranked.append((reply["rank"], text_field(reply, "text", "text in every message")))
        ranked.sort(key=lambda item: item[0])  # stable: equal ranks keep the file's order
        for (better_rank, better), (worse_rank, worse) in combinations(ranked, 2):
            if better_rank != worse_rank and better != worse:  # equal texts would teach nothing
                chosen = [{"role": "assistant", "content": better}]
                pairs.append(Pair(conversation, chosen, [{"role": "assistant", "content": worse}]))
    for i, reply in live:
        _walk_oasst(reply, f"{field}.replies[{i}]", conversation, pairs)


def stack_exchange_pairs(record: dict) -> list[Pair]:
    needed = "question, response_j and response_k strings"
    prompt = text_field(record, "question", needed)
    return [checked_pair(prompt, text_field(record, "response_j", needed), text_field(record, "response_k", needed))]


FORMATS: dict[str, Callable[[dict], list[Pair]]] = {
    "explicit": explicit_pairs,
    "hh-rlhf": hh_rlhf_pairs,
    "conversational": conversational_pairs,
    "openai": openai_pairs,
    "sharegpt": sharegpt_pairs,
    "oasst": oasst_pairs,
    "stack-exchange": stack_exchange_pairs,
}
FORMAT_CHOICES = ("auto", *FORMATS)


def detect_format(record: dict) -> str | None:
    """The format a record's keys point to, or None. Broken records still point somewhere (a record missing
    'rejected' is still explicit), so the problem is then reported field by field rather than as 'unknown'."""
    keys = set(record)
    if "message_tree_id" in keys or (isinstance(record.get("prompt"), dict) and "replies" in record["prompt"]):
        return "oasst"
    if keys & {"preferred_output", "non_preferred_output", "input"}:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"question", "response_j", "response_k"}:
        return "stack-exchange"
    if "prompt" in keys:
        return "conversational" if isinstance(record["prompt"], list) else "explicit"
    if keys & {"chosen", "rejected"}:
        sample = record.get("chosen", record.get("rejected"))
        return "conversational" if isinstance(sample, list) else "hh-rlhf"
    return None


def unknown_format_error(where: str, record: dict) -> UserError:
    keys = ", ".join(sorted(record)[:8]) or "none"
    return UserError(
        f"{where}: cannot tell the data format from the keys ({keys}); pass --format "
        f"({', '.join(FORMATS)}) or map names with --columns prompt=...,chosen=...,rejected=..."
    )


# Column mapping -----------------------------------------------------------------------------------------------------


def parse_columns(spec: str) -> dict[str, str]:
    """'prompt=question,chosen=response_j' -> {'prompt': 'question', 'chosen': 'response_j'}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        target, _, source = (s.strip() for s in item.partition("="))
        if not source or target not in COLUMN_TARGETS:
            raise UserError(
                f"--columns {spec!r}: {item!r} is not FIELD=COLUMN with FIELD one of {', '.join(COLUMN_TARGETS)}; "
                "e.g. --columns prompt=question,chosen=response_j,rejected=response_k"
            )
        if target in mapping:
            raise UserError(f"--columns {spec!r}: {target} is mapped twice; map each field once")
        mapping[target] = source
    return mapping


def rename_columns(record: dict, columns: dict[str, str]) -> dict:
    """The record with each mapped column also under its field name; a mapped column that is absent is a problem."""
    if not columns:
        return record
    for target, source in columns.items():
        if source not in record:
            raise missing(source, f"the column {source!r} (mapped to {target} by --columns)")
    sources = set(columns.values())
    renamed = {key: value for key, value in record.items() if key not in sources}
    renamed.update({target: record[source] for target, source in columns.items()})
    return renamed
