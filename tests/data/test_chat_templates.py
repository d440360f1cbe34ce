"""Chat templates: the built-in names render their models' official text, our bounded renderer gives the ids
transformers' apply_chat_template gives, hostile templates end in one line, and the template is resolved by name,
file or tokenizer with one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from dpo_cli.data.templates import (
    BUILTIN_NAMES,
    ChatTemplate,
    builtin_template_text,
    resolve_chat_template,
    use_chat_template,
)
from dpo_cli.data.templates.sandbox import RenderLimits, TemplateBoundExceeded, render
from dpo_cli.data.tokenize import chat_ids
from dpo_cli.errors import UserError
from tests.conftest import REPO, STORIES_MODEL, require_shared, run_cli_inprocess

SYSTEM = [{"role": "system", "content": "You are kind."}]
TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Bye."},
]
IM = "<|im_start|>"
OFFICIAL = {
    # name: (bos, eos, with a system message?, the official template's text for [system +] TURNS)
    "chatml": (
        "<s>",
        "<|im_end|>",
        True,
        "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\nBye.<|im_end|>\n",
    ),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        True,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are kind.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nBye.<|eot_id|>",
    ),
    "qwen2.5": (
        None,
        "<|im_end|>",
        False,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
        "<|im_start|>assistant\nBye.<|im_end|>\n",
    ),
    "qwen3": (
        None,
        "<|im_end|>",
        True,
        "<|im_start|>system\nYou are kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "Bye.<|im_end|>\n",
    ),
    "gemma": (
        "<bos>",
        "<eos>",
        False,
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye?<end_of_turn>\n<start_of_turn>model\nBye.<end_of_turn>\n",
    ),
    "gemma3": (
        "<bos>",
        "<eos>",
        True,
        "<bos><start_of_turn>user\nYou are kind.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye?<end_of_turn>\n<start_of_turn>model\nBye.<end_of_turn>\n",
    ),
    "mistral": ("<s>", "</s>", False, "<s>[INST] Hi [/INST]Hello!</s>[INST] Bye? [/INST]Bye.</s>"),
    "phi3": (
        "<s>",
        "<|endoftext|>",
        True,
        "<|system|>\nYou are kind.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye?<|end|>\n"
        "<|assistant|>\nBye.<|end|>\n<|endoftext|>",
    ),
    "phi4": (
        "<|endoftext|>",
        "<|im_end|>",
        True,
        "<|im_start|>system<|im_sep|>You are kind.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hello!<|im_end|><|im_start|>user<|im_sep|>Bye?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Bye.<|im_end|>",
    ),
    "deepseek3": (
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        True,
        "<｜begin▁of▁sentence｜>You are kind.<｜User｜>Hi<｜Assistant｜>Hello!<｜end▁of▁sentence｜><｜User｜>Bye?"
        "<｜Assistant｜>Bye.<｜end▁of▁sentence｜>",
    ),
    "zephyr": (
        "<s>",
        "</s>",
        True,
        "<|system|>\nYou are kind.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nBye?</s>\n"
        "<|assistant|>\nBye.</s>\n",
    ),
    "alpaca": (
        "<s>",
        "</s>",
        True,
        "You are kind.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\nBye?\n\n"
        "### Response:\nBye.</s>\n\n",
    ),
}


def _special(bos, eos):
    return SimpleNamespace(special_tokens_map={"bos_token": bos, "eos_token": eos} if bos else {"eos_token": eos})


def _conversation(name):
    return (SYSTEM if OFFICIAL[name][2] else []) + TURNS


def test_every_built_in_name_is_tested():
    assert sorted(OFFICIAL) == sorted(BUILTIN_NAMES)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_built_in_template_renders_the_official_text(name):
    bos, eos, _, expected = OFFICIAL[name]
    template = ChatTemplate(builtin_template_text(name), name)
    assert template.render(_special(bos, eos), _conversation(name), add_generation_prompt=False) == expected


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_the_generation_prompt_is_where_the_last_answer_starts(name):
    """The prompt as DPO renders it (add_generation_prompt) ends where the official text's last answer begins;
    Qwen3 writes an empty think block before an answer after the last question, so its answer starts later."""
    bos, eos, _, expected = OFFICIAL[name]
    template = ChatTemplate(builtin_template_text(name), name)
    prompt = template.render(_special(bos, eos), _conversation(name)[:-1], add_generation_prompt=True)
    if name == "qwen3":
        assert expected.startswith(prompt + "<think>\n\n</think>\n\n")
    else:
        assert prompt == expected[: expected.rindex("Bye.")]


@pytest.fixture
def tokenizer():
    from dpo_cli.model.load import load_tokenizer

    return load_tokenizer(str(require_shared(STORIES_MODEL)))


README_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize("name", [*BUILTIN_NAMES, "readme"])
def test_ids_equal_transformers_apply_chat_template(tokenizer, name):
    """Our renderer + tokenizer call gives apply_chat_template's text and ids (what TRL tokenizes with)."""
    text = README_TEMPLATE if name == "readme" else builtin_template_text(name)
    messages = _conversation(name) if name != "readme" else SYSTEM + TURNS
    for conversation, generation in ((messages, False), (messages[:-1], True)):
        theirs = tokenizer.apply_chat_template(
            conversation, chat_template=text, add_generation_prompt=generation, tokenize=True, return_dict=True
        )["input_ids"]
        ours = chat_ids(tokenizer, conversation, generation, ChatTemplate(text, name))
        assert ours == list(theirs)
        assert ChatTemplate(text, name).render(tokenizer, conversation, generation) == tokenizer.apply_chat_template(
            conversation, chat_template=text, add_generation_prompt=generation, tokenize=False
        )


def _trl_templates():
    try:
        import trl
    except ImportError:
        return []
    from pathlib import Path

    return sorted((Path(trl.__file__).parent / "chat_templates").glob("*.jinja"))


def _rendered(text, messages, generation, renderer):
    try:
        return renderer(text, messages, generation)
    except Exception as error:  # both must refuse the same conversations
        return f"error {error.__class__.__name__}"


@pytest.mark.parametrize("path", _trl_templates(), ids=lambda p: p.name)
def test_real_templates_render_as_transformers_renders_them(path):
    """TRL ships 70-odd real models' templates (tools, dates, thinking, {% generation %} blocks): each renders the
    same text in our sandbox as in transformers' environment, or both refuse the conversation."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def ours(text, messages, generation):
        return render(text, RenderLimits(), messages=messages, add_generation_prompt=generation, tools=None,
                      documents=None, bos_token="<s>", eos_token="</s>")  # fmt: skip

    def theirs(text, messages, generation):
        rendered, _ = render_jinja_template(
            [messages], chat_template=text, add_generation_prompt=generation, bos_token="<s>", eos_token="</s>"
        )
        return rendered[0]

    text = path.read_text(encoding="utf-8")
    for messages, generation in ((SYSTEM + TURNS, False), (SYSTEM + TURNS[:-1], True), (TURNS, False)):
        assert _rendered(text, messages, generation, ours) == _rendered(text, messages, generation, theirs)


@pytest.mark.parametrize(
    ("name", "trl_name"),
    [("qwen2.5", "qwen2_5"), ("qwen3", "qwen3"), ("gemma", "gemma"), ("gemma3", "gemma3"), ("phi3", "phi3"),
     ("llama3", "llama3")],
)  # fmt: skip
def test_built_in_templates_render_as_trl_s_copies_of_the_originals(name, trl_name):
    """Where TRL keeps a copy of the model's original template, ours renders every conversation without tools the
    same (DeepSeek's there is R1's, which opens a <think> block: ours is V3's own)."""
    copies = {path.stem: path for path in _trl_templates()}
    if trl_name not in copies:
        pytest.skip("needs TRL's chat_templates")
    bos, eos = "<B>", "<E>"

    def rendered(text, messages, generation):
        return _rendered(
            text, messages, generation, lambda t, m, g: ChatTemplate(t, name).render(_special(bos, eos), m, g)
        )

    original = copies[trl_name].read_text(encoding="utf-8")
    for messages in (SYSTEM + TURNS, TURNS, TURNS[:1], SYSTEM + TURNS[:1]):
        for generation in (False, True):
            assert rendered(builtin_template_text(name), messages, generation) == rendered(
                original, messages, generation
            )


# Resolving --chat-template ----------------------------------------------------------------------------------------


def test_an_unknown_name_is_one_line_listing_the_names(tokenizer):
    with pytest.raises(UserError) as error:
        resolve_chat_template("chatm", tokenizer)
    assert str(error.value).startswith("--chat-template chatm: no such built-in template or file")
    assert ", ".join(BUILTIN_NAMES) in str(error.value) and "\n" not in str(error.value)


def test_a_missing_template_file_is_one_line(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"none\.jinja: chat template file not found"):
        resolve_chat_template(str(tmp_path / "none.jinja"), tokenizer)


def test_tokenizer_means_the_models_own_template(tokenizer):
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    for spec in ("", "tokenizer"):
        template = resolve_chat_template(spec, tokenizer)
        assert template.text == tokenizer.chat_template and "the model's own chat template" in template.origin


def test_special_tokens_the_tokenizer_lacks_are_refused_in_one_line(tokenizer):
    with pytest.raises(UserError) as error:
        use_chat_template(tokenizer, "chatml")
    message = str(error.value)
    assert message.startswith("built-in chat template 'chatml': writes <|im_start|>, <|im_end|>, which the tokenizer")
    assert "\n" not in message and tokenizer.chat_template is None  # nothing given to the tokenizer


def test_a_template_file_that_writes_a_missing_special_token_is_refused(tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}", encoding="utf-8")
    with pytest.raises(UserError, match=r"mine\.jinja: writes <\|im_start\|>, which the tokenizer"):
        use_chat_template(tokenizer, str(path))


def test_with_the_tokens_added_the_template_is_used_and_they_stay_whole(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    template = use_chat_template(tokenizer, "chatml")
    assert tokenizer.chat_template == builtin_template_text("chatml") == template.text
    ids = chat_ids(tokenizer, TURNS[:1], True, template)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2


def test_data_check_unknown_name_exits_2_in_one_line(capsys, tmp_path):
    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps({"prompt": TURNS[:1], "chosen": [TURNS[1]], "rejected": [TURNS[3]]}) + "\n")
    code, out, err = run_cli_inprocess(
        capsys, "data", "check", data, "--model", require_shared(STORIES_MODEL), "--chat-template", "llama-3"
    )
    assert code == 2 and out == ""
    assert err.startswith("error: --chat-template llama-3: no such built-in template") and err.count("\n") == 1


def test_data_check_show_prints_the_rendered_pairs_with_the_trained_part_marked(capsys, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(README_TEMPLATE, encoding="utf-8")
    data = tmp_path / "conv.jsonl"
    record = {"prompt": TURNS[:1], "chosen": [TURNS[1]], "rejected": [{"role": "assistant", "content": "Go."}]}
    data.write_text(json.dumps(record) + "\n" + json.dumps(record | {"chosen": [TURNS[3]]}) + "\n", encoding="utf-8")
    model = require_shared(STORIES_MODEL)
    args = ("data", "check", data, "--model", model, "--chat-template", template, "--show", "1")
    code, out, _ = run_cli_inprocess(capsys, *args)
    assert code == 0
    assert f"example 1 ({data}:1): prompt " in out and "example 2" not in out
    assert "<|user|>\nHi</s> \n<|assistant|>\n⟦Hello!</s> \n⟧" in out
    assert "<|assistant|>\n⟦Go.</s> \n⟧" in out
    code, out, _ = run_cli_inprocess(capsys, *args[:-1], "2", "--json")
    examples = json.loads(out)["examples"]
    assert [e["completions"]["chosen"] for e in examples] == ["Hello!</s> \n", "Bye.</s> \n"]
    assert examples[0]["tokens"]["prompt"] > 0 and set(examples[0]["tokens"]) == {"prompt", "chosen", "rejected"}


def test_the_prepared_data_key_follows_the_template_text_not_its_name(tokenizer, tmp_path):
    from dpo_cli.config import DataSection
    from dpo_cli.data.prepare import prepare_split

    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps({"prompt": TURNS[:1], "chosen": [TURNS[1]], "rejected": [TURNS[3]]}) + "\n")
    same = tmp_path / "same.jinja"
    same.write_text(builtin_template_text("chatml"), encoding="utf-8")
    edited = tmp_path / "edited.jinja"
    edited.write_text(builtin_template_text("chatml").replace("\\n", "\\n\\n"), encoding="utf-8")

    def key(spec):
        return prepare_split(tokenizer, [str(data)], DataSection(chat_template=spec, max_length=64), "train").key

    assert key("chatml") == key(str(same)) != key(str(edited))


# Hostile templates ------------------------------------------------------------------------------------------------

LIMITS = RenderLimits(max_chars=100_000, max_steps=200_000, seconds=2)
BOMBS = {
    "string times a huge number": "{{ 'x' * 2000000000 }}",
    "list times a huge number": "{{ ([1] * 1000000000)|length }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s~ns.s %}{% endfor %}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s+ns.s %}{% endfor %}",
    "doubling with |join": (
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = [ns.s, ns.s]|join %}{% endfor %}"
    ),
    "doubling with str.join": (
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s.join(['a', 'b']) %}"
        "{% set ns.s = ns.s.join([ns.s, ns.s]) %}{% endfor %}"
    ),
    "a list of the same big string": (
        "{% set ns = namespace(l=['x' * 50000]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}"
    ),
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops writing": "{% for i in range(100000) %}{% for j in range(100000) %}xxxx{% endfor %}{% endfor %}",
    "nested loops into a set block": (
        "{% set x %}{% for i in range(100000) %}{% for j in range(100000) %}xx{% endfor %}{% endfor %}{% endset %}"
    ),
    "exponential macro": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "huge power": "{{ 9 ** 999999999 }}",
    "center filter": "{{ 'x'|center(1000000000) }}",
    "ljust method": "{{ 'x'.ljust(1000000000) }}",
    "percent width": "{{ '%1000000000s' % 'x' }}",
    "format filter width": "{{ '%1000000000s'|format('x') }}",
    "str.format width": "{{ '{:>1000000000}'.format('x') }}",
    "indent width": "{{ ('a\n' * 1000)|indent(1000000) }}",
    "replace growth": "{% set s = 'x' * 1000 %}{{ s|replace('x', s) }}",
    "replace method growth": "{% set s = 'x' * 1000 %}{{ s.replace('x', s) }}",
    "int to_bytes": "{{ (1).to_bytes(1000000000, 'big')|length }}",
    "recursive loop": "{% for x in [1, 2] recursive %}{{ loop([1, 2]) }}{% endfor %}",
    "translate": "{{ 'x'.translate({120: 'yyyyyyyyyy'}) }}",
    "sum of lists": "{{ ([[1] * 1000] * 50)|sum(start=[]) }}",
}


@pytest.mark.parametrize("name", BOMBS)
def test_a_hostile_template_stops_at_its_limits_in_a_second(name):
    import time

    started = time.perf_counter()
    with pytest.raises(TemplateBoundExceeded):
        render(BOMBS[name], LIMITS, messages=TURNS, add_generation_prompt=False)
    assert time.perf_counter() - started < 4  # the 2 s deadline at the latest, on a loaded machine


@pytest.mark.parametrize(
    "text",
    [
        "{{ messages|map(attribute='content')|join(', ') }}",
        "{{ ', '.join(messages|map(attribute='content')) }}",
        "{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|join }}",
        "{{ messages[0]|tojson(indent=2) }}{{ messages|map(attribute='role')|list|tojson }}",
    ],
)
def test_checked_filters_and_methods_render_as_jinja_does(text):
    """The checks before `join` must not use up a lazy `|map` (which would join nothing)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    (theirs,), _ = render_jinja_template([TURNS], chat_template=text)
    assert render(text, LIMITS, messages=TURNS) == theirs and "Hi" in theirs


def test_a_huge_template_is_refused_before_it_is_compiled():
    from dpo_cli.data.templates.sandbox import MAX_TEMPLATE_CHARS

    with pytest.raises(TemplateBoundExceeded, match="characters long"):
        render("x" * (MAX_TEMPLATE_CHARS + 1), LIMITS, messages=TURNS)


def test_lipsum_is_not_there():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        render("{{ lipsum(100000000) }}", LIMITS, messages=TURNS)


def test_the_rendered_text_is_bounded_before_the_tokenizer_sees_it():
    huge = [{"role": "user", "content": "x" * 200_000}]
    with pytest.raises(TemplateBoundExceeded, match="over the 100,000"):
        render("{{ messages[0]['content'] }}", LIMITS, messages=huge)


def test_the_sandbox_still_refuses_python_internals():
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{{ ''.__class__.__mro__ }}{{ cycler.__init__.__globals__ }}", LIMITS, messages=TURNS)


def test_a_bound_is_one_line_naming_the_template(tokenizer):
    template = ChatTemplate("{{ 'x' * 2000000000 }}", "m/tokenizer_config.json (the model's own chat template)")
    with pytest.raises(UserError) as error:
        chat_ids(tokenizer, TURNS, False, template)
    assert str(error.value).startswith(
        "m/tokenizer_config.json (the model's own chat template): the chat template builds a repeated value of "
        "2,000,000,000 characters"
    )


BOMB_RUNS = textwrap.dedent(
    """
    import json, resource, shutil, sys, time
    from pathlib import Path
    from dpo_cli.cli import main

    root, stories = Path(sys.argv[1]), sys.argv[2]
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    results = {}
    for name, args in json.loads(sys.argv[3]).items():
        sys.argv = ["dpo-cli", *args]
        started = time.perf_counter()
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        results[name] = {"code": code, "seconds": time.perf_counter() - started, "peak_mb": peak()}
    print("RESULTS " + json.dumps(results))
    """
)


def test_template_bombs_end_in_one_line_within_seconds_and_bounded_memory(tmp_path):
    """In a model folder's tokenizer_config.json and in --chat-template FILE, the string-multiplication and the
    nested-loop bombs each stop the check in one line, exit 2, in seconds, and the process never grows by more
    than a few hundred MB (it reached 19 GB before the sandbox)."""
    stories = require_shared(STORIES_MODEL)
    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps({"prompt": TURNS[:1], "chosen": [TURNS[1]], "rejected": [TURNS[3]]}) + "\n")
    messages_loop = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    bombs = {
        "multiply": "{{ 'x' * 100000000 }}",
        "multiply more": "{{ 'x' * 2000000000 }}",
        "loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    }
    plain = tmp_path / "plain.jinja"
    plain.write_text(messages_loop)
    runs = {"a plain template first": ["data", "check", str(data), "--model", str(stories), "--chat-template"]}
    runs["a plain template first"].append(str(plain))  # every import done: the baseline of memory
    for name, bomb in bombs.items():
        folder = tmp_path / f"model-{name.replace(' ', '-')}"
        shutil.copytree(stories, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": bomb + messages_loop}))
        runs[f"{name} in the model folder"] = ["data", "check", str(data), "--model", str(folder)]
        file = tmp_path / f"{name.replace(' ', '-')}.jinja"
        file.write_text(bomb + messages_loop)
        runs[f"{name} in --chat-template"] = ["data", "check", str(data), "--model", str(stories), "--chat-template"]
        runs[f"{name} in --chat-template"].append(str(file))
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DPO_CLI_CACHE": str(tmp_path / "cache"), "PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", BOMB_RUNS, str(tmp_path), str(stories), json.dumps(runs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    results = json.loads(done.stdout.split("RESULTS ")[-1])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert results.pop("a plain template first")["code"] == 0
    assert len(errors) == len(results) and "Traceback" not in done.stderr, done.stderr
    for name, where in zip(results, errors, strict=True):
        result = results[name]
        assert result["code"] == 2, (name, done.stderr)
        assert result["seconds"] < 20, (name, result)
        assert "the chat template" in where and ("model-" in where or ".jinja" in where), where
    baseline = json.loads(done.stdout.split("RESULTS ")[-1])["a plain template first"]["peak_mb"]
    assert results[list(runs)[-1]]["peak_mb"] - baseline < 300, (baseline, results)
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 1  # the plain one's: the bombs wrote nothing


@pytest.mark.slow
def test_train_eval_and_resume_with_a_built_in_name(tmp_path, capsys):
    """A name is not a file: train and eval take it (the adapter's recipe keeps it), and --resume with another
    template is refused like a changed template file."""
    stories = require_shared(STORIES_MODEL)
    data = tmp_path / "conv.jsonl"
    records = [{"prompt": [{"role": "user", "content": f"Tell me story {i}."}]} for i in range(8)]
    for i, record in enumerate(records):
        record["chosen"] = [{"role": "assistant", "content": f"Once upon a time there was a happy cat {i}."}]
        record["rejected"] = [{"role": "assistant", "content": f"No {i}."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "run"
    train = ("train", "--model", stories, "--data", data, "--output-dir", out, "--batch-size", 4, "--max-steps", 2)
    settings = ("--set", "model.gradient_checkpointing=false", "--set", "training.save_steps=1")
    code, _, stderr = run_cli_inprocess(capsys, *train, *settings, "--chat-template", "zephyr")
    assert code == 0, stderr
    assert "chat_template: zephyr" in (out / "recipe.yaml").read_text(encoding="utf-8")
    code, stdout, stderr = run_cli_inprocess(capsys, "eval", "--adapter", out, "--data", data)
    assert code == 0, stderr
    assert "eval data: 8 pairs" in stdout
    code, _, stderr = run_cli_inprocess(capsys, *train, *settings, "--chat-template", "alpaca", "--resume")
    assert code == 2 and "data.chat_template was zephyr [content " in stderr and "now alpaca [content " in stderr
