"""Where dpo-cli writes and whose code it runs: each bad place or hostile file ends in one line, before any model
loads, with no user file changed and nothing written outside the output folder.

Every test snapshots the folders it hands to dpo-cli (content and mode of each file) and compares after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli_inprocess

LOCK_HOLDER = """
import sys, time
from pathlib import Path
from dpo_cli.output_folder import claimed_folder
with claimed_folder(Path(sys.argv[1]), sys.argv[2], "--output"):
    print("locked", flush=True)
    time.sleep(600)
"""


def snapshot(*roots: Path) -> dict[str, tuple[str, int]]:
    """{path: (sha256, mode)} of every file and folder below `roots`."""
    found = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))]:
            if path.is_dir():
                found[str(path)] = ("dir", stat.S_IMODE(path.stat().st_mode))
            elif path.exists():
                found[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(path.stat().st_mode))
    return found


def refused(capsys, *args) -> str:
    """stderr of a command that must end in exit 2 and one line."""
    code, stdout, stderr = run_cli_inprocess(capsys, *args)
    assert code == 2, (args, stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def train_args(tiny: dict[str, Path], output: Path | None, *extra) -> list:
    args = ["train", "--model", tiny["model"], "--data", tiny["train"], "--max-steps", 1, "--batch-size", 4]
    args += ["--set", "model.gradient_checkpointing=false", "--set", "training.save_steps=0", *extra]
    return args + (["--output-dir", output] if output is not None else [])


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a tokenizer or model fails the test: refusals must come first."""
    import dpo_cli.model.merge
    import dpo_cli.run.eval_adapter
    import dpo_cli.run.setup

    def loaded(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the refusal")

    for module, name in (
        (dpo_cli.run.setup, "load_tokenizer"),
        (dpo_cli.run.eval_adapter, "load_base_tokenizer"),
        (dpo_cli.model.merge, "load_base_tokenizer"),
        (dpo_cli.model.merge, "load_policy"),
    ):
        monkeypatch.setattr(module, name, loaded)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a read-only tmpfs (writable by nobody, root included)."""
    target = tmp_path / "read-only"
    target.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()!r}")
    yield target
    subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def adapter_copy(tiny_adapter, tmp_path) -> Path:
    """A copy of the tiny adapter folder this test may damage."""
    return Path(shutil.copytree(tiny_adapter, tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoints")))


# 1. No output folder ------------------------------------------------------------------------------------------------


def test_train_without_output_dir_refuses_instead_of_writing_into_the_current_folder(
    untrained_tiny, tmp_path, capsys, monkeypatch
):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "README.md").write_text("mine")
    (project / "tokenizer.json").write_text("mine too")
    monkeypatch.chdir(project)
    before = snapshot(tmp_path, untrained_tiny["model"])
    line = refused(capsys, *train_args(untrained_tiny, None))
    assert line == "error: no output folder: pass --output-dir DIR or set training.output_dir in the recipe"
    assert "no output folder" in refused(capsys, *train_args(untrained_tiny, None), "--set", "training.output_dir= ")
    assert snapshot(tmp_path, untrained_tiny["model"]) == before


# 2. Folders that hold something else --------------------------------------------------------------------------------


def test_train_refuses_folders_holding_anything_but_its_own_run(untrained_tiny, tmp_path, capsys, no_model_loads):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    data_home = tmp_path / "data-home"
    data_home.mkdir()
    data = Path(shutil.copy(untrained_tiny["train"], data_home / "train.jsonl"))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / ".dpo-cli.json").write_text('{"kind": "merge"}')
    (merged / "config.json").write_text("{}")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    model = untrained_tiny["model"]
    cases = [
        (train_args(untrained_tiny, model), "is or holds the base model's folder"),
        (train_args(untrained_tiny, model / "run"), "is or holds the base model's folder"),
        (train_args(untrained_tiny, users), "holds files dpo-cli did not write (notes.txt)"),
        (train_args({**untrained_tiny, "train": data}, data_home), "holds the input file"),
        (train_args(untrained_tiny, merged), "holds a dpo-cli merge output"),
        (train_args(untrained_tiny, a_file), "exists and is not a folder"),
        (train_args(untrained_tiny, a_file / "run"), f"{a_file} is a file, so nothing can be made below it"),
    ]
    before = snapshot(tmp_path, model)
    for args, message in cases:
        assert message in refused(capsys, *args), args
    assert snapshot(tmp_path, model) == before


def test_train_accepts_an_empty_folder_and_writes_nothing_outside_it(untrained_tiny, tmp_path, capsys, monkeypatch):
    output = tmp_path / "empty"
    output.mkdir()
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, untrained_tiny["model"], untrained_tiny["train"].parent)
    code, _, stderr = run_cli_inprocess(capsys, *train_args(untrained_tiny, output))
    assert code == 0, stderr
    after = snapshot(tmp_path, untrained_tiny["model"], untrained_tiny["train"].parent)
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    assert changed and all(Path(path).is_relative_to(output) for path in changed), changed
    assert json.loads((output / ".dpo-cli.json").read_text())["kind"] == "train"
    # A finished run is kept: a fresh start refuses it, as before the marker existed.
    assert "holds an earlier run; pass --resume" in refused(capsys, *train_args(untrained_tiny, output))


def test_train_refused_for_bad_data_leaves_no_folder_behind(untrained_tiny, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b",\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    for output in (tmp_path / "new" / "run", empty):
        assert "invalid JSON" in refused(capsys, *train_args({**untrained_tiny, "train": bad}, output))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.jsonl", "empty"]


def test_merge_output_is_never_the_adapter_the_base_or_a_users_folder(
    adapter_copy, tiny_demo, tmp_path, capsys, no_model_loads
):
    users = tmp_path / "users"
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    train_run = tmp_path / "train-run"
    shutil.copytree(adapter_copy, train_run)
    base = tiny_demo["model"]
    cases = [
        (adapter_copy, "would replace the adapter folder"),
        (adapter_copy / "merged", "would replace the adapter folder"),
        (tmp_path, "would replace the adapter folder"),
        (base, "would replace the base model's folder"),
        (base / "merged", "would replace the base model's folder"),
        (users, "holds files dpo-cli did not write (keep.txt)"),
        (train_run, "holds a dpo-cli train output"),
        (tmp_path / "a-file" / "merged", "is a file, so nothing can be made below it"),
    ]
    (tmp_path / "a-file").write_text("x")
    before = snapshot(tmp_path, base)
    for output, message in cases:
        line = refused(capsys, "merge-adapter", "--adapter", adapter_copy, "--output", output, "--force")
        assert message in line, (output, line)
    assert snapshot(tmp_path, base) == before


def test_eval_outputs_never_replace_an_input_or_a_users_file(tiny_adapter, tiny_demo, tmp_path, capsys, no_model_loads):
    data = Path(shutil.copy(tiny_demo["test"], tmp_path / "test.jsonl"))
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    (tmp_path / "a-file").write_text("x")
    base = tiny_demo["model"]
    common = ("eval", "--adapter", tiny_adapter, "--data", data)
    cases = [
        (("--per-example", data), "is an input file of this evaluation"),
        (("--output", data), "is an input file of this evaluation"),
        (("--generate", 1, "--samples", data), "is an input file of this evaluation"),
        (("--output", notes), "exists and is not an earlier `dpo-cli eval --output` file"),
        (("--per-example", notes), "exists and is not an earlier `dpo-cli eval --per-example` file"),
        (("--output", tmp_path / "x.json", "--per-example", tmp_path / "x.json"), "is also --output"),
        (("--output", tiny_adapter / "eval.json"), "is inside the adapter folder"),
        (("--output", tiny_adapter / "recipe.yaml"), "exists and is not an earlier"),
        (("--output", base / "eval.json"), "is inside the base model's folder"),
        (("--output", tmp_path / "a-file" / "eval.json"), "is a file, so nothing can be made below it"),
    ]
    before = snapshot(tmp_path, tiny_adapter, base)
    for extra, message in cases:
        line = refused(capsys, *common, *extra)
        assert message in line, (extra, line)
    assert snapshot(tmp_path, tiny_adapter, base) == before


def test_eval_replaces_its_own_earlier_outputs(tiny_adapter, tiny_demo, tmp_path, capsys):
    outputs = ("--output", tmp_path / "eval.json", "--per-example", tmp_path / "pairs.jsonl")
    for _ in range(2):
        code, _, stderr = run_cli_inprocess(
            capsys, "eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], *outputs
        )
        assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "pairs.jsonl"]


def test_runs_written_before_the_marker_existed_still_count_as_train_runs(tmp_path):
    from dpo_cli.output_folder import written_kind

    (tmp_path / "recipe.yaml").write_text("training: {}\n")
    assert written_kind(tmp_path) is None  # a recipe alone is anybody's
    (tmp_path / "metrics.jsonl").write_text("")
    assert written_kind(tmp_path) == "train"
    (tmp_path / ".dpo-cli.json").write_text("not json")
    assert written_kind(tmp_path) == "train"
    (tmp_path / ".dpo-cli.json").write_text('{"kind": "merge"}')
    assert written_kind(tmp_path) == "merge"


# 3. eval --on-invalid skip with no output file ----------------------------------------------------------------------


def test_eval_skip_without_an_output_file_writes_nothing_and_names_the_places(
    tiny_adapter, tiny_demo, tmp_path, capsys, monkeypatch
):
    data = tmp_path / "mixed.jsonl"
    good = tiny_demo["test"].read_text(encoding="utf-8").splitlines()[:4]
    data.write_text("\n".join([good[0], '{"prompt": "p", "chosen": "same", "rejected": "same"}', *good[1:]]) + "\n")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(tmp_path, tiny_adapter)
    code, stdout, stderr = run_cli_inprocess(
        capsys, "eval", "--adapter", tiny_adapter, "--data", data, "--on-invalid", "skip"
    )
    assert code == 0, stderr
    assert "not written anywhere" in stdout and f"{data}:2 (chosen equals rejected)" in " ".join(stdout.split())
    assert snapshot(tmp_path, tiny_adapter) == before  # no skipped-eval.jsonl in the current folder or anywhere


def test_eval_skip_never_replaces_a_users_skipped_eval_file(tiny_adapter, tiny_demo, tmp_path, capsys, no_model_loads):
    (tmp_path / "skipped-eval.jsonl").write_text("my own notes\n")
    before = snapshot(tmp_path)
    line = refused(
        capsys, "eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--on-invalid", "skip",
        "--output", tmp_path / "eval.json",
    )  # fmt: skip
    assert "skipped-eval.jsonl: exists and is not an earlier dpo-cli skipped-records file" in line
    line = refused(
        capsys, "eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--on-invalid", "skip",
        "--output", tmp_path / "new" / "eval.json", "--per-example", tmp_path / "new" / "skipped-eval.jsonl",
    )  # fmt: skip
    assert "skipped-eval.jsonl: is where --on-invalid skip writes the skipped records" in line
    assert snapshot(tmp_path) == before


# 4. One run per output folder ---------------------------------------------------------------------------------------


def _hold_lock(folder: Path, kind: str) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a running dpo-cli command does."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(folder), kind], stdout=subprocess.PIPE, text=True, env=env
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _kill_9(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_a_second_train_into_a_busy_folder_refuses_and_a_killed_ones_lock_does_not_block(
    untrained_tiny, tmp_path, capsys
):
    output = tmp_path / "run"
    holder = _hold_lock(output, "train")
    try:
        before = snapshot(tmp_path)
        line = refused(capsys, *train_args(untrained_tiny, output))
        assert f"in use by another dpo-cli process (pid {holder.pid})" in line
        assert snapshot(tmp_path) == before
    finally:
        _kill_9(holder)
    code, _, stderr = run_cli_inprocess(capsys, *train_args(untrained_tiny, output))  # the stale lock is gone
    assert code == 0, stderr


def test_two_real_train_processes_into_one_folder(untrained_tiny, tmp_path, capsys):
    from dpo_cli.output_folder import claimed_folder

    output = tmp_path / "run"
    args = train_args(untrained_tiny, output)
    args[args.index("--max-steps") + 1] = 100_000
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, "-m", "dpo_cli", *map(str, args)], env=env, stdout=subprocess.PIPE)
    try:
        for line in first.stdout:  # "trainable LoRA parameters: ..." comes once the run holds the folder and starts
            if b"trainable LoRA parameters" in line:
                break
        assert first.poll() is None
        line = refused(capsys, *train_args(untrained_tiny, output), "--resume")
        assert f"in use by another dpo-cli process (pid {first.pid})" in line
    finally:
        _kill_9(first)
    with claimed_folder(output, "train", "--output-dir"):  # kill -9 released it
        pass


def test_a_second_merge_into_a_busy_folder_refuses(tiny_adapter, tmp_path, capsys, no_model_loads):
    output = tmp_path / "merged"
    holder = _hold_lock(output, "merge")
    try:
        line = refused(capsys, "merge-adapter", "--adapter", tiny_adapter, "--output", output)
        assert f"in use by another dpo-cli process (pid {holder.pid})" in line
    finally:
        _kill_9(holder)


# 5. Remote code only with --trust-remote-code on the command line -------------------------------------------------


@pytest.fixture
def remote_code_model(untrained_tiny, tmp_path) -> dict[str, Path]:
    """The tiny model, declared as a custom architecture whose code (marker.py) leaves a file behind if it runs."""
    folder = Path(shutil.copytree(untrained_tiny["model"], tmp_path / "remote-model"))
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="dpo_cli_marker_model",
        architectures=["MarkerModel"],
        auto_map={"AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerModel"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "REMOTE-CODE-RAN"
    (folder / "marker.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class MarkerConfig(LlamaConfig):\n    model_type = 'dpo_cli_marker_model'\n"
        "class MarkerModel(LlamaForCausalLM):\n    config_class = MarkerConfig\n"
    )
    return {"model": folder, "marker": marker}


def test_remote_code_never_runs_without_the_flag(
    remote_code_model, untrained_tiny, tiny_adapter, tiny_demo, tmp_path, capsys
):
    model, marker = remote_code_model["model"], remote_code_model["marker"]
    granting_recipe = tmp_path / "trusting.yaml"
    granting_recipe.write_text("model:\n  trust_remote_code: true\n")
    # A downloaded adapter whose recipe asks for remote code on a base that has it.
    adapter = Path(shutil.copytree(tiny_adapter, tmp_path / "adapter", ignore=shutil.ignore_patterns("checkpoints")))
    recipe = (adapter / "recipe.yaml").read_text().replace("trust_remote_code: false", "trust_remote_code: true")
    (adapter / "recipe.yaml").write_text(recipe.replace(f"path: {tiny_demo['model']}", f"path: {model}"))
    assert "trust_remote_code: true" in recipe and f"path: {model}" in (adapter / "recipe.yaml").read_text()
    needs = "needs its own Python code (auto_map in its config) to load; read that code and pass --trust-remote-code"
    tiny = {**untrained_tiny, "model": model}
    cases = [
        train_args(tiny, tmp_path / "run"),
        ["train", granting_recipe, *train_args(tiny, tmp_path / "run")[1:]],
        ["eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--model", model],
        ["eval", "--adapter", adapter, "--data", tiny_demo["test"]],
        ["merge-adapter", "--adapter", tiny_adapter, "--output", tmp_path / "merged", "--model", model],
        ["merge-adapter", "--adapter", adapter, "--output", tmp_path / "merged"],
    ]
    for args in cases:
        code, stdout, stderr = run_cli_inprocess(capsys, *args)
        assert code == 2 and needs in stderr and len(stderr.strip().splitlines()) == 1, (args, stderr)
        assert not marker.exists(), args
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()
    # The recipe's key is said to be ignored, not silently obeyed.
    _, stdout, _ = run_cli_inprocess(capsys, "eval", "--adapter", adapter, "--data", tiny_demo["test"])
    assert "recipe key model.trust_remote_code is ignored" in " ".join(stdout.split())


def test_the_flag_does_run_remote_code(remote_code_model, untrained_tiny, tmp_path):
    # The control for the test above: the same folder with --trust-remote-code runs marker.py, so its absence there
    # means the code was refused, not that it could never run. Transformers copies the code into HF_MODULES_CACHE,
    # kept inside tmp_path by running in a fresh process.
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-m", "dpo_cli", "data", "check", str(untrained_tiny["train"])]
    command += ["--model", str(remote_code_model["model"]), "--trust-remote-code"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert remote_code_model["marker"].read_text() == "ran"


# 6. Paths below files, read-only places, damaged adapters, bad sizes ------------------------------------------------


def test_paths_below_a_file_are_one_line(tiny_adapter, untrained_tiny, tiny_demo, tmp_path, capsys, no_model_loads):
    a_file = tmp_path / "somefile"
    a_file.write_text("x")
    before = snapshot(tmp_path)
    line = refused(capsys, "eval", "--adapter", a_file / "x", "--data", tiny_demo["test"])
    assert line.startswith(f"error: {a_file / 'x'}: adapter folder not found ({a_file} is a file); pass the")
    line = refused(capsys, "merge-adapter", "--adapter", a_file / "x", "--output", tmp_path / "m")
    assert f"({a_file} is a file)" in line
    assert snapshot(tmp_path) == before


def test_a_model_below_a_file_is_one_line(untrained_tiny, tiny_adapter, tiny_demo, tmp_path, capsys):
    a_file = tmp_path / "somefile"
    a_file.write_text("x")
    model = a_file / "x"
    line = refused(capsys, *train_args({**untrained_tiny, "model": model}, tmp_path / "run"))
    assert f"not a model folder ({a_file} is a file)" in line
    line = refused(capsys, "eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--model", model)
    assert f"not a model folder ({a_file} is a file)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["somefile"]


def test_read_only_outputs_are_refused_before_loading(
    read_only_dir, untrained_tiny, tiny_adapter, tiny_demo, capsys, no_model_loads
):
    cases = [
        train_args(untrained_tiny, read_only_dir / "run"),
        ["eval", "--adapter", tiny_adapter, "--data", tiny_demo["test"], "--output", read_only_dir / "e.json"],
        ["merge-adapter", "--adapter", tiny_adapter, "--output", read_only_dir / "merged"],
    ]
    for args in cases:
        assert "is not writable (read-only or no permission)" in refused(capsys, *args), args
    assert list(read_only_dir.iterdir()) == []


def _write_weights(adapter: Path, data: bytes) -> None:
    (adapter / "adapter_model.safetensors").write_bytes(data)


def _truncate_weights(adapter: Path) -> None:
    _write_weights(adapter, (adapter / "adapter_model.safetensors").read_bytes()[:-100])


def _weights_without_lora(adapter: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, str(adapter / "adapter_model.safetensors"))


def _edit_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda a: _write_weights(a, b""), "adapter_model.safetensors: not a readable safetensors file"),
        (_truncate_weights, "adapter_model.safetensors: not a readable safetensors file"),
        (lambda a: _write_weights(a, b"PK\x03\x04 a zip"), "adapter_model.safetensors: not a readable safetensors"),
        (_weights_without_lora, "adapter_model.safetensors: holds no LoRA weights"),
        (lambda a: (a / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
        (lambda a: (a / "adapter_config.json").write_text("{not json"), "adapter_config.json: not valid JSON"),
        (lambda a: (a / "adapter_config.json").write_text("[1, 2]"), "adapter_config.json: not a JSON object"),
        (lambda a: (a / "adapter_config.json").write_text(""), "adapter_config.json: not valid JSON"),
        (lambda a: _edit_config(a, r=None), "adapter_config.json: key r is None, not a positive integer"),
        (lambda a: _edit_config(a, r="8"), "adapter_config.json: key r is '8', not a positive integer"),
        (lambda a: _edit_config(a, lora_alpha=None), "key lora_alpha is None, not a positive number"),
        (lambda a: _edit_config(a, target_modules=None), "key target_modules is None"),
        (lambda a: _edit_config(a, peft_type="IA3"), "peft_type is 'IA3', not 'LORA'"),
        (lambda a: (a / "adapter_config.json").unlink(), "not an adapter folder (no adapter_config.json)"),
    ],
)
def test_damaged_adapters_are_one_line_for_eval_and_merge(
    adapter_copy, tiny_demo, tmp_path, capsys, no_model_loads, damage, message
):
    damage(adapter_copy)
    before = snapshot(tmp_path)
    assert message in refused(capsys, "eval", "--adapter", adapter_copy, "--data", tiny_demo["test"])
    assert message in refused(capsys, "merge-adapter", "--adapter", adapter_copy, "--output", tmp_path / "merged")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("size", ["lots", "0", "0KB", "5XB", "", "5 G B"])
def test_merge_max_shard_size_is_checked_before_loading(tiny_adapter, tmp_path, capsys, no_model_loads, size):
    line = refused(
        capsys, "merge-adapter", "--adapter", tiny_adapter, "--output", tmp_path / "m", "--max-shard-size", size
    )
    assert f"--max-shard-size {size}: not a size" in line
    assert list(tmp_path.iterdir()) == []


def test_shard_sizes_read_as_hugging_face_reads_them():
    from dpo_cli.model.merge import parse_shard_size

    assert parse_shard_size("5GB") == 5 * 10**9 and parse_shard_size("100kb") == 100_000
    assert parse_shard_size("1.5MB") == 1_500_000 and parse_shard_size("4096") == 4096


# 7. File modes ------------------------------------------------------------------------------------------------------


def test_written_weights_honour_the_umask_like_every_other_file(tiny_adapter, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        code, _, stderr = run_cli_inprocess(
            capsys, "merge-adapter", "--adapter", tiny_adapter, "--output", tmp_path / "merged", "--dtype", "float32"
        )
    finally:
        os.umask(old)
    assert code == 0, stderr
    merged_modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()}
    assert merged_modes["model.safetensors"] == 0o640 and set(merged_modes.values()) == {0o640}, merged_modes
    # The tiny adapter was trained in this process under its usual umask.
    expected = 0o666 & ~old
    adapter_modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tiny_adapter.iterdir() if p.is_file()}
    assert adapter_modes["adapter_model.safetensors"] == expected and set(adapter_modes.values()) == {expected}
