"""`dpo-cli train --sharding fsdp` under `torchrun --nproc-per-node 2` (CPU, gloo) on 4-bit stories260K, against one
process with the same global batch, and resumed across world sizes and between ddp and fsdp.

One torchrun launch (`sharded_runs`) runs every 2-process command one after another (tests/run/ddp_driver.py, as in
test_distributed.py): `fsdp` (4 steps: live reference with the adapters off, gradient checkpointing, evaluation at
step 2 and the end with eval shares whose batch counts differ between the ranks), `cache` (token-budget batches, the
train and eval references precomputed after sharding, each rank a share, and cached, --layout shared-prompt,
evaluation), `ddp` then `to-fsdp` (3 steps with ddp, resumed with fsdp to step 4), `from-adapter` (train
--from-adapter: the reference is a frozen adapter, scored live in training, precomputed for evaluation), `sft`
(dpo-cli sft with evaluation), `compile` (--compile), and last `sigterm`, which the test stops with SIGTERM to the
launcher. Beside them run the 1-process runs of the same global batch. Every run uses a constant learning rate, so
that a run of 3 steps resumed to 4 meets a run of 4.

Tolerance: 1e-5 on losses, grad norms, eval metrics and adapter weights (log-probs, about 100 in size, to float32's
relative 1e-7). The sharded gradients are reduce-scattered once per step (after each rank's last micro-batch, as DDP
all-reduces them), so an fsdp run computes what a ddp run computes (bitwise on this machine); both differ from one
process only in the order the per-pair gradients are summed. AdamW divides each gradient element by its running RMS,
so an element with a tiny gradient still moves by up to the learning rate, and there that rounding shows at a size
proportional to the learning rate: at test_distributed.py's lr 2e-3 the adapters of 2 processes (ddp or fsdp alike)
and of 1 process differed by up to 3.8e-5 after 3 steps here, at lr 2e-4 by 5e-7. These runs use lr 2e-4.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_cli.errors import UserError
from tests.conftest import run_cli_inprocess
from tests.run.test_distributed import (
    PROCESSES,
    TOLERANCE,
    _finish,
    _log,
    _records,
    _single_process,
    _torchrun,
    _train_args,
    _train_records,
)

FSDP = ["--sharding", "fsdp"]
LR = "2e-4"
RELATIVE = 1e-5
"""Or within this fraction: grad norms near 10 are float32 sums; resumed from a ddp and an fsdp checkpoint of the
same step they agreed to 1.2e-6 of their size here."""


def _args(model, data, out, steps: int, *extra) -> list[str]:
    """test_distributed.py's train arguments at this file's learning rate."""
    args = _train_args(model, data, out, steps, *extra)
    args[args.index("--lr") + 1] = LR
    return args + ["--set", "training.scheduler=constant"]  # a run of 2 steps resumed to 4 meets a run of 4


def _eval_options(stories_data) -> list[str]:
    """Evaluation at step 2 and at the end, 29 pairs a batch: the ranks' shares of the 117 eval pairs (59 and 58)
    take 3 and 2 batches, so rank 1 scores one filler batch to keep the sharded forwards in step."""
    return [
        "--eval-data",
        str(stories_data["test"]),
        "--set",
        "training.eval_steps=2",
        "--set",
        "training.eval_batch_size=29",
    ]


def _cache_options(grad_accum: int, cache: Path, stories_data) -> list[str]:
    """Token-budget batches, the reference precomputed and cached (in `cache`, a folder of the run's own) before
    training, the shared-prompt layout, and evaluation (`_eval_options`: under fsdp the ranks' shares of the 117
    eval pairs' reference take 3 and 2 batches of 29, the 468 train pairs' 9 each)."""
    options = ["--max-tokens-per-batch", "400", "--grad-accum", str(grad_accum), "--layout", "shared-prompt"]
    return options + [
        "--set",
        "dpo.precompute_ref=true",
        "--set",
        f"data.cache_dir={cache}",
        *_eval_options(stories_data),
    ]


def _sigterm_at_step_3(process: subprocess.Popen, log: Path) -> None:
    """SIGTERM to the launcher once the last job's rank 0 has logged its start and two steps."""
    deadline = time.monotonic() + 1200  # the jobs before it take minutes on a loaded machine
    while time.monotonic() < deadline and process.poll() is None:
        if Path(f"{log}.rank0").is_file() and len(_log(log, 0)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)


@pytest.fixture(scope="module")
def sharded_runs(stories_model, stories_data, tmp_path_factory):
    """One launch, eight commands on 2 processes, the last stopped by SIGTERM; beside them the 1-process runs of the
    same global batches. (`single` is also the adapter `from-adapter` starts from, and `compile` meets its step 2.)"""
    tmp = tmp_path_factory.mktemp("fsdp")
    model, data = stories_model, stories_data["train"]
    evaluation = _eval_options(stories_data)
    keep_all = ["--set", "training.save_total_limit=4"]  # its step 2 is what `compile` is compared with
    _single_process(*_args(model, data, tmp / "single", 4, "--grad-accum", 4, *evaluation, *keep_all))
    _single_process(
        *_args(model, data, tmp / "cache-single", 2, *_cache_options(2, tmp / "cache-single-cache", stories_data))
    )
    start = ["--from-adapter", str(tmp / "single"), "--set", "model.gradient_checkpointing=true"]
    start += ["--eval-data", str(stories_data["test"])]  # its reference precomputed against the reference adapter
    _single_process(*_args(model, data, tmp / "from-adapter-single", 2, "--grad-accum", 4, *start))
    sft_eval = ["--eval-data", str(stories_data["test"])]
    _single_process(*_args(model, data, tmp / "sft-single", 3, "--grad-accum", 4, *sft_eval), command="sft")
    sigterm = _args(model, data, tmp / "sigterm", 500, "--grad-accum", 1, "--set", "training.save_steps=0", *FSDP)
    jobs = [
        {"args": _args(model, data, tmp / "fsdp", 4, "--grad-accum", 2, *FSDP, *evaluation)},
        {"args": _args(model, data, tmp / "cache", 2, *_cache_options(1, tmp / "cache-cache", stories_data), *FSDP)},
        {"args": _args(model, data, tmp / "to-fsdp", 3, "--grad-accum", 2)},
        {"args": _args(model, data, tmp / "to-fsdp", 4, "--grad-accum", 2, "--resume", *FSDP)},
        {"args": _args(model, data, tmp / "from-adapter", 2, "--grad-accum", 2, *start, *FSDP)},
        {"args": _args(model, data, tmp / "sft", 3, "--grad-accum", 2, *sft_eval, *FSDP), "command": "sft"},
        {"args": _args(model, data, tmp / "compile", 2, "--grad-accum", 2, "--compile", *FSDP)},
        {"args": sigterm},
    ]
    for number, job in enumerate(jobs):
        job["log"] = str(tmp / f"job{number}.log")
    process = _torchrun(tmp, jobs)
    _sigterm_at_step_3(process, Path(jobs[-1]["log"]))
    code, output = _finish(process, timeout=120)
    assert code != 0 and "interrupted at step" in output, output[-3000:]
    return {"tmp": tmp, "output": output}


def _assert_same_records(records: list[dict], expected: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for record, wanted in zip(records, expected, strict=True):
        assert record.keys() == wanted.keys()
        for key in keys:
            if key in wanted:
                assert record[key] == pytest.approx(wanted[key], abs=TOLERANCE, rel=RELATIVE), (record["step"], key)


def _assert_same_adapter(folder, expected_folder) -> None:
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    expected = load_file(str(expected_folder / "adapter_model.safetensors"))
    assert adapter.keys() == expected.keys()
    for key, value in adapter.items():
        torch.testing.assert_close(value, expected[key], atol=TOLERANCE, rtol=0)


KEYS = ("loss", "grad_norm", "rewards/margins", "num_tokens", "epoch")
EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_num_pairs")


def test_two_sharded_processes_train_exactly_as_one_with_evaluation(sharded_runs):
    tmp = sharded_runs["tmp"]
    records, expected = _records(tmp / "fsdp"), _records(tmp / "single")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4], "four steps, then the final evaluation"
    assert "eval_loss" in records[1] and records[-1]["eval_num_pairs"] == 117, "each eval pair once, filler not"
    _assert_same_records(records, expected, KEYS + EVAL_KEYS)
    assert records[1]["loss"] != records[0]["loss"], "the adapter learned"
    _assert_same_adapter(tmp / "fsdp", tmp / "single")
    ranks = [_log(tmp / "job0.log", rank) for rank in range(PROCESSES)]
    assert [e["adapter"] for e in ranks[0]] == [e["adapter"] for e in ranks[1]], "one adapter, gathered the same"
    assert len({e["adapter"] for e in ranks[0]}) == 5


def _cached_references(cache: Path) -> dict[int, torch.Tensor]:
    """{number of pairs: values} of the reference entries in a cache folder (one per split)."""
    entries = [load_file(str(path))["logps"] for path in (cache / "reference").glob("*/logps.safetensors")]
    return {len(values): values for values in entries}


def test_the_cached_reference_token_budget_batches_and_shared_prompts_match_one_process(sharded_runs):
    tmp = sharded_runs["tmp"]
    _assert_same_records(_records(tmp / "cache"), _records(tmp / "cache-single"), KEYS + EVAL_KEYS)
    _assert_same_adapter(tmp / "cache", tmp / "cache-single")
    # Scored after sharding, each rank a share, gathered and cached by rank 0 (the 4-bit storage dtype is part of the
    # cache's fingerprint, so these are not the 1-process run's entries): the same values as one process's.
    output = sharded_runs["output"]
    assert "reference log-probs: computed 468 pairs" in output and "eval reference log-probs: computed 117" in output
    sharded, single = _cached_references(tmp / "cache-cache"), _cached_references(tmp / "cache-single-cache")
    assert sorted(sharded) == sorted(single) == [117, 468], "the train and eval splits' entries"
    for num_pairs, values in sharded.items():
        torch.testing.assert_close(values, single[num_pairs], atol=TOLERANCE, rtol=RELATIVE)  # sums near -100


def test_checkpoints_are_plain_adapter_folders_with_the_whole_optimizer_state(sharded_runs):
    checkpoint = sharded_runs["tmp"] / "fsdp" / "checkpoints" / "step-000004"
    single = sharded_runs["tmp"] / "single" / "checkpoints" / "step-000004"
    assert load_file(str(checkpoint / "adapter_model.safetensors")).keys() == (
        load_file(str(single / "adapter_model.safetensors")).keys()
    )
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    expected = torch.load(single / "optimizer.pt", weights_only=True)
    assert optimizer["state"].keys() == expected["state"].keys(), "keyed by parameter name, whole"
    for name, state in optimizer["state"].items():
        torch.testing.assert_close(state["exp_avg"], expected["state"][name]["exp_avg"], atol=TOLERANCE, rtol=0)


def test_a_ddp_run_resumes_sharded(sharded_runs):
    tmp, output = sharded_runs["tmp"], sharded_runs["output"]
    assert "training.sharding 'ddp' -> 'fsdp'" in output
    resumed, uninterrupted = _train_records(tmp / "to-fsdp"), _train_records(tmp / "fsdp")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4], "steps 1-3 with ddp, step 4 with fsdp"
    for record, expected in zip(resumed, uninterrupted, strict=True):
        for key in ("loss", "grad_norm"):
            assert record[key] == pytest.approx(expected[key], abs=TOLERANCE), (record["step"], key)
    _assert_same_adapter(tmp / "to-fsdp", tmp / "fsdp")


def _resumed_on_one_process(run, stories_model, stories_data, out) -> str:
    """Run `run` (a 4-step 2-process run), cut back to its step-3 checkpoint, resumed to step 4 on one process."""
    shutil.copytree(run, out)
    shutil.rmtree(out / "checkpoints" / "step-000004")
    return _single_process(*_args(stories_model, stories_data["train"], out, 4, "--grad-accum", 2, "--resume"))


def test_a_sharded_run_resumes_on_one_process(sharded_runs, stories_model, stories_data, tmp_path):
    """Batch size and grad_accum are fixed on resume, so one process continues with half the global batch: it is
    compared with the same resume of a ddp checkpoint of the same step (to-fsdp's step 3 is ddp's)."""
    tmp = sharded_runs["tmp"]
    stdout = _resumed_on_one_process(tmp / "fsdp", stories_model, stories_data, tmp_path / "from-fsdp")
    said = " ".join(stdout.split())  # the console wraps long lines
    assert "world size 2 -> 1" in said and "training.sharding 'fsdp' -> 'ddp'" in said, stdout
    _resumed_on_one_process(tmp / "to-fsdp", stories_model, stories_data, tmp_path / "from-ddp")
    from_fsdp, from_ddp = _train_records(tmp_path / "from-fsdp"), _train_records(tmp_path / "from-ddp")
    assert [r["step"] for r in from_fsdp] == [1, 2, 3, 4]
    _assert_same_records(from_fsdp[3:], from_ddp[3:], ("loss", "grad_norm", "rewards/margins"))
    _assert_same_adapter(tmp_path / "from-fsdp", tmp_path / "from-ddp")
    state = json.loads((tmp_path / "from-fsdp" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["micro_batches_done"] == 3 * 4 + 2, "step 4 read on from micro-batch 12, two of them"


def test_sigterm_stops_every_sharded_rank_before_the_same_step_and_saves_it(sharded_runs):
    tmp = sharded_runs["tmp"]
    checkpoints = list((tmp / "sigterm" / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["step"] >= 2 and state["micro_batches_done"] == 2 * state["step"], "the last complete step"
    assert [r["step"] for r in _records(tmp / "sigterm")] == list(range(1, state["step"] + 1))
    ranks = [_log(tmp / "job7.log", rank) for rank in range(PROCESSES)]
    assert ranks[0][-1]["step"] == ranks[1][-1]["step"] == state["step"], "both ranks stopped after that step"
    assert load_file(str(checkpoints[0] / "adapter_model.safetensors")), "the gathered adapter"


def test_a_sharded_run_from_an_adapter_refers_to_that_adapter_as_one_process_does(sharded_runs):
    """The reference pass switches the active PEFT adapter to the frozen reference, which flips requires_grad on
    sharded parameters and back (load._active_adapter); FSDP2 takes the flags again at each gather. Scored live in
    training, with gradient checkpointing; for evaluation precomputed after sharding, each rank a share."""
    tmp = sharded_runs["tmp"]
    records, expected = _records(tmp / "from-adapter"), _records(tmp / "from-adapter-single")
    first = records[0]
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6) and first["loss"] == pytest.approx(0.6931472), "ref"
    assert [r["step"] for r in records] == [1, 2, 2] and records[-1]["eval_num_pairs"] == 117
    _assert_same_records(records, expected, KEYS + EVAL_KEYS)
    assert "eval reference log-probs: computed 117 pairs" in sharded_runs["output"]
    _assert_same_adapter(tmp / "from-adapter", tmp / "from-adapter-single")
    assert (tmp / "from-adapter" / "reference-adapter" / "adapter_model.safetensors").is_file()


def test_sharded_sft_trains_and_evaluates_as_one_process(sharded_runs):
    tmp = sharded_runs["tmp"]
    records, expected = _records(tmp / "sft"), _records(tmp / "sft-single")
    assert [r["step"] for r in records] == [1, 2, 3, 3], "three steps, then the final evaluation"
    sft_keys = ("loss", "mean_token_accuracy", "grad_norm", "eval_loss", "eval_perplexity", "eval_num_tokens")
    _assert_same_records(records, expected, sft_keys)
    _assert_same_adapter(tmp / "sft", tmp / "sft-single")


def test_compiled_sharded_layers_train_as_one_uncompiled_process(sharded_runs):
    """`--compile` compiles each decoder layer before fully_shard wraps it (torchtitan's order); compared with the
    first two steps of the 1-process run (constant learning rate), adapter against its step-2 checkpoint."""
    tmp = sharded_runs["tmp"]
    records, expected = _train_records(tmp / "compile"), _train_records(tmp / "single")[:2]
    assert [r["step"] for r in records] == [1, 2]
    for record, wanted in zip(records, expected, strict=True):  # the 1-process step 2 also holds its evaluation
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert record[key] == pytest.approx(wanted[key], abs=TOLERANCE, rel=RELATIVE), (record["step"], key)
    _assert_same_adapter(tmp / "compile", tmp / "single" / "checkpoints" / "step-000002")
    assert "compiling 5 decoder layers" in sharded_runs["output"]


# Bad input, without torchrun ------------------------------------------------------------------------------------


def test_fsdp_without_a_launcher_is_refused_in_one_line(stories_model, stories_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    code, stdout, stderr = run_cli_inprocess(
        capsys, "train", *_args(stories_model, stories_data["train"], out, 1, *FSDP)
    )
    assert code == 2, stdout + stderr
    assert stderr.count("error:") == 1 and "--sharding fsdp" in stderr and "torchrun" in stderr, stderr
    assert "Traceback" not in stderr and not out.exists(), "nothing written"


def test_a_skeleton_base_has_the_modules_and_no_weights(stories_model):
    """What the processes other than rank 0 build under fsdp (sharding.load_base): the same 4-bit layers on the
    meta device, no quantization state yet (it comes from rank 0), and the compute dtype of the real device."""
    from bitsandbytes.nn import Linear4bit

    from dpo_cli.config import recipe_from_dict
    from dpo_cli.model.load import load_base_model

    config = recipe_from_dict({"model": {"path": str(stories_model)}}).model
    whole = load_base_model(config, torch.device("cpu"), shardable=True)
    skeleton = load_base_model(config, torch.device("cpu"), shardable=True, skeleton=True)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    names = [name for name, module in skeleton.named_modules() if isinstance(module, Linear4bit)]
    assert names == [name for name, module in whole.named_modules() if isinstance(module, Linear4bit)] and names
    assert all(module.weight.quant_state is None for module in skeleton.modules() if isinstance(module, Linear4bit))
    assert skeleton.get_input_embeddings().weight.dtype == whole.get_input_embeddings().weight.dtype


def test_a_model_without_decoder_layers_cannot_be_sharded():
    from dpo_cli.run.sharding import decoder_layers

    with pytest.raises(UserError, match="keeps no decoder layers in `.layers`.*--sharding ddp"):
        decoder_layers(torch.nn.Linear(2, 2))
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    holder = torch.nn.Module()
    holder.layers = layers
    assert decoder_layers(holder) is layers


def test_a_bitsandbytes_too_old_for_float_storage_is_refused():
    from dpo_cli.run.sharding import _check_bitsandbytes

    with pytest.raises(UserError, match=r"bitsandbytes 0\.42\.0 cannot store 4-bit weights.*>=0\.43\.0"):
        _check_bitsandbytes("0.42.0")
    _check_bitsandbytes("0.43.0")
    _check_bitsandbytes("0.50.2")


def test_every_rank_scores_as_many_eval_batches_as_the_largest_share(monkeypatch):
    from dpo_cli.run import sharding

    monkeypatch.setattr(sharding, "is_sharded", lambda model: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sharding.eval_batches(None, 117, 29) == 3  # shares of 59 and 58 pairs: 3 and 2 batches
    assert sharding.eval_batches(None, 1, 8) == 1  # one rank has no pair: it scores the filler once
    monkeypatch.setattr(sharding, "is_sharded", lambda model: False)
    assert sharding.eval_batches(None, 117, 29) == 0
