"""Every real file in ../shared/data loads with the right prompt/chosen/rejected, and tokenizes as TRL 1.16 does.

The pinned examples were read off the files by hand; several hold non-ASCII text (’, “, è) on purpose.
"""

from __future__ import annotations

import gzip
import json

import pytest

from dpo_cli.config import DataSection
from dpo_cli.data.formats import parse_columns
from dpo_cli.data.load import load_tokenized_split
from dpo_cli.data.records import ReadOptions, ReadResult, iter_file_pairs
from dpo_cli.data.split import SplitRequest
from dpo_cli.data.tokenize import tokenize_pairs
from dpo_cli.errors import UserError
from tests.conftest import SHARED_DATA, STORIES_MODEL, require_shared

# A minimal template; TRL renders conversations with whatever template the tokenizer has, so any will do.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def shared(relative: str):
    return require_shared(SHARED_DATA / relative)


def read_all(relative: str, **options) -> tuple[list, ReadResult]:
    result = ReadResult()
    options.setdefault("on_invalid", "skip")
    pairs = list(iter_file_pairs(shared(relative), ReadOptions(**options), result))
    return pairs, result


@pytest.fixture
def tokenizer():
    """A fresh tokenizer per test: --chat-template sets the template on the tokenizer object."""
    from dpo_cli.model.load import load_tokenizer

    return load_tokenizer(str(require_shared(STORIES_MODEL)))


@pytest.fixture
def chat_template(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("relative", "expected_format", "records", "pairs", "invalid"),
    [
        ("hh-rlhf/helpful-base-test.jsonl.gz", "hh-rlhf", 2354, 2352, {"chosen equals rejected": [722, 2169]}),
        ("hh-rlhf/helpful-online-test.jsonl.gz", "hh-rlhf", 1137, 1135, {"chosen equals rejected": None}),
        ("openai-dpo/validation.jsonl", "openai", 284, 284, {}),
        ("sharegpt/dpo_en_demo.json", "sharegpt", 300, 300, {}),
        ("oasst/en_100_tree.jsonl", "oasst", 100, 754, {}),
        ("stack-exchange/stack_exchange_paired_tiny.json", "stack-exchange", 25, 25, {}),
        ("stories-happy/train.jsonl", "explicit", 468, 468, {}),
        ("stories-happy/test.jsonl", "explicit", 117, 117, {}),
    ],
)
def test_each_shared_file_is_detected_and_read(relative, expected_format, records, pairs, invalid):
    read, result = read_all(relative)
    (report,) = result.files
    assert (report.format, report.records, report.pairs, len(read)) == (expected_format, records, pairs, pairs)
    reasons = {r.reason for r in result.invalid}
    assert reasons == set(invalid)
    for reason, lines in invalid.items():
        if lines is not None:  # the real HH-RLHF test file holds two pairs whose answers are the same text
            found = [int(r.source.rsplit(":", 1)[1]) for r in result.invalid if r.reason == reason]
            assert found == lines


def test_hh_rlhf_prompt_is_the_dialogue_up_to_the_last_assistant_turn():
    pairs, _ = read_all("hh-rlhf/helpful-base-test.jsonl.gz")
    first = pairs[0]
    assert first.source.endswith("helpful-base-test.jsonl.gz:1")
    assert first.prompt == (
        "\n\nHuman: Do you know why turkeys became the official food of thanksgiving?\n\nAssistant:"
    )
    assert first.chosen.startswith(" To be honest, I don’t know anything about that. I know that I’m meant")
    assert first.rejected.startswith(" I know that the American Indians were the first to celebrate")
    multi_turn = next(p for p in pairs if p.prompt.count("\n\nAssistant:") >= 3)
    assert multi_turn.prompt.endswith("\n\nAssistant:")
    assert "\n\nHuman:" not in multi_turn.chosen and "\n\nHuman:" not in multi_turn.rejected
    assert all(p.prompt.startswith("\n\nHuman:") and p.prompt.endswith("\n\nAssistant:") for p in pairs)


def test_openai_messages_become_a_conversation():
    pairs, _ = read_all("openai-dpo/validation.jsonl")
    first = pairs[0]
    assert [m["role"] for m in first.prompt] == ["system", "user"]
    assert first.prompt[1]["content"].startswith("MM. Georges Colombier, Samad Seyidov (pour un rappel au Règlement)")
    assert first.chosen[0]["role"] == "assistant" and len(first.chosen) == 1
    assert first.chosen[0]["content"].startswith("Step 1: Identify the names and phrases in the given text.")
    assert first.rejected[0]["content"].startswith("Sure, I'd be happy to help! The task you have given me")


def test_sharegpt_roles_are_mapped_to_chat_roles():
    pairs, _ = read_all("sharegpt/dpo_en_demo.json")
    first = pairs[0]
    assert first.source.endswith("dpo_en_demo.json:2 (record 0)")
    assert first.prompt == [
        {
            "role": "user",
            "content": "Hi! I'd like to create a new language game simulating the first person perspective of a "
            "character named Angela.",
        }
    ]
    assert first.chosen[0]["content"].startswith("That sounds like a fun and engaging idea!")
    with_system = next(p for p in pairs if p.prompt[0]["role"] == "system")
    assert [m["role"] for m in with_system.prompt][1:] == ["user"]
    multi_turn = next(p for p in pairs if len(p.prompt) == 5)
    assert [m["role"] for m in multi_turn.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert any("’" in m["content"] or "é" in m["content"] for p in pairs for m in p.prompt + p.chosen)


def test_oasst_tree_gives_every_ranked_sibling_pair_with_the_conversation_so_far():
    pairs, _ = read_all("oasst/en_100_tree.jsonl")
    first_tree = [p for p in pairs if p.source.endswith("en_100_tree.jsonl:1")]
    question = [{"role": "user", "content": "How can I find the best 401k plan for my needs?"}]
    at_root = [p for p in first_tree if p.prompt == question]
    assert len(at_root) == 3  # three replies ranked 0, 1, 2: (0,1), (0,2), (1,2)
    assert at_root[0].chosen[0]["content"].startswith("The first step is to research your options.")
    assert at_root[0].rejected[0]["content"].startswith("The first step is to determine your financial goals.")
    assert at_root[2].chosen == at_root[0].rejected
    deeper = [p for p in pairs if len(p.prompt) >= 3]
    assert deeper and all(p.prompt[-1]["role"] == "user" and p.prompt[-2]["role"] == "assistant" for p in deeper)
    assert any("’" in json.dumps(p.chosen, ensure_ascii=False) for p in pairs)


def test_stack_exchange_reads_the_same_by_detection_and_by_column_mapping():
    detected, _ = read_all("stack-exchange/stack_exchange_paired_tiny.json")
    columns = parse_columns("prompt=question,chosen=response_j,rejected=response_k")
    mapped, result = read_all("stack-exchange/stack_exchange_paired_tiny.json", columns=columns)
    assert result.files[0].format == "explicit"
    assert [(p.prompt, p.chosen, p.rejected) for p in mapped] == [(p.prompt, p.chosen, p.rejected) for p in detected]
    assert detected[7].chosen.startswith("I see a\n\n```\nwhile (Height > 0)")
    assert not (detected[7].prompt + detected[7].rejected).isascii()


def test_explicit_stories_pin_with_typographic_quotes():
    pairs, _ = read_all("stories-happy/test.jsonl")
    pair = pairs[28]
    assert pair.prompt == "One day, Mia went to the beach."
    assert pair.rejected.endswith(" \n“Wh")


# Tokenization --------------------------------------------------------------------------------------------------------


def _load(tokenizer, path, max_length: int, **data):
    """The pairs of one file as `train` loads them, and the report (nothing is printed)."""
    request = SplitRequest([str(path)], "train", DataSection(max_length=max_length, **data))
    return load_tokenized_split(tokenizer, request)


def test_decoded_token_ids_of_text_and_chat_pairs(tokenizer, chat_template):
    hh, _ = _load(tokenizer, shared("hh-rlhf/helpful-base-test.jsonl.gz"), 100_000, on_invalid="skip")
    assert tokenizer.decode(hh[0]["prompt_ids"]) == (
        "<s> \n\nHuman: Do you know why turkeys became the official food of thanksgiving?\n\nAssistant:"
    )
    chosen = tokenizer.decode(hh[0]["chosen_ids"])
    assert chosen.startswith("To be honest, I don’t know anything") and chosen.endswith("particular facts, sorry.</s>")

    chat, _ = _load(tokenizer, shared("openai-dpo/validation.jsonl"), 100_000, chat_template=str(chat_template))
    prompt = tokenizer.decode(chat[0]["prompt_ids"])
    assert prompt.startswith("<|system|>\nYou are an AI assistant.")
    assert "(pour un rappel au Règlement)" in prompt and prompt.endswith("to English</s> \n<|assistant|>\n")
    chosen = tokenizer.decode(chat[0]["chosen_ids"])
    assert chosen.startswith("Step 1: Identify") and chosen.endswith("Mr. Serhiy Holovaty.</s> \n")


def _trl_prepare(tokenizer, records: list[dict], tmp_path):
    """TRL 1.16's own `_prepare_dataset` on `records`, with the stories model as the policy."""
    import torch
    from datasets import Dataset

    from dpo_cli.config import ModelSection
    from dpo_cli.model.load import load_base_model
    from tests.trl_oracle import make_trl_trainer

    model = load_base_model(ModelSection(path=str(STORIES_MODEL)), torch.device("cpu"))
    trainer = make_trl_trainer(model, tokenizer, records[:2], tmp_path / "trl", max_length=None)
    return trainer._prepare_dataset(Dataset.from_list(records), tokenizer, trainer.args, "check")


def _assert_same_ids(ours, theirs):
    assert len(ours) == len(theirs)
    for mine, trl in zip(ours, theirs, strict=True):
        assert mine["prompt_ids"] == trl["prompt_ids"]
        assert mine["chosen_ids"] == trl["chosen_ids"]
        assert mine["rejected_ids"] == trl["rejected_ids"]


def test_conversational_ids_equal_trl_with_explicit_and_implicit_prompts(tokenizer, chat_template, tmp_path):
    """OpenAI records as TRL's conversational format, once with a prompt and once with whole conversations."""
    pytest.importorskip("trl")
    pairs, _ = read_all("openai-dpo/validation.jsonl")
    pairs = [p for p in pairs if len(json.dumps(p.prompt)) < 600][:12]  # short ones: TRL tokenizes without limit
    assert len(pairs) == 12
    explicit = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    implicit = [{"chosen": p.prompt + p.chosen, "rejected": p.prompt + p.rejected} for p in pairs]
    for name, records in (("explicit", explicit), ("implicit", implicit)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        ours, _ = _load(tokenizer, path, 100_000, chat_template=str(chat_template))
        _assert_same_ids(ours, _trl_prepare(tokenizer, records, tmp_path))


def test_batched_text_path_equals_trl_on_hh_rlhf_prompts(tokenizer, tmp_path):
    """Our HH-RLHF prompts given to TRL as explicit pairs: the cached, batched path gives TRL's ids."""
    pytest.importorskip("trl")
    pairs, _ = read_all("hh-rlhf/helpful-base-test.jsonl.gz")
    pairs = [p for p in pairs if len(p.prompt) + max(len(p.chosen), len(p.rejected)) < 600][:24]
    assert len(pairs) == 24
    records = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
    path = tmp_path / "hh.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    ours, _ = _load(tokenizer, path, 100_000)
    _assert_same_ids(ours, _trl_prepare(tokenizer, records, tmp_path))
    in_memory, _ = tokenize_pairs(tokenizer, pairs, 100_000)
    _assert_same_ids(ours, [vars(p) for p in in_memory])


def test_conversational_data_without_a_chat_template_says_how_to_give_one(tokenizer):
    with pytest.raises(UserError, match=r"validation\.jsonl:1: openai data is a conversation.*--chat-template"):
        _load(tokenizer, shared("openai-dpo/validation.jsonl"), 1024)


def test_a_template_that_refuses_a_conversation_is_a_record_problem(tokenizer, tmp_path):
    strict = tmp_path / "no-system.jinja"
    strict.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}",
        encoding="utf-8",
    )
    path = tmp_path / "chat.jsonl"
    good = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}]}
    good["rejected"] = [{"role": "assistant", "content": "Go away"}]
    bad = {**good, "prompt": [{"role": "system", "content": "Be nice"}, *good["prompt"]]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"chat\.jsonl:2: the chat template refused it \(no system role\)"):
        _load(tokenizer, path, 64, chat_template=str(strict))
    pairs, summary = _load(tokenizer, path, 64, chat_template=str(strict), on_invalid="skip")
    assert len(pairs) == 1 and [r.reason for r in summary.skipped] == ["chat template error"]
