"""The `dpo-cli` command line: parses flags, builds the recipe, calls the work; no logic a test would want."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from dpo_cli.errors import UserError
from dpo_cli.flags import every_flagged_key, options_flags, recipe_flags
from dpo_cli.online.sampling_options import SamplingOptions

app = typer.Typer(
    help="Align causal language models to human preferences with DPO: 4-bit base, LoRA adapters, fused log-probs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)


TRUST_HELP = "Run the model's own Python code (auto_map) if it has any; only this flag allows it, never a recipe."
data_app = typer.Typer(help="Look at preference data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def root() -> None:
    """dpo-cli: train, evaluate and merge DPO LoRA adapters."""


READS_DATA = ("data.max_length", "data.format", "data.columns", "data.chat_template")
"""The recipe keys of reading and tokenizing preference files, which every command that reads data accepts."""


def _train_command(objective: str, recipe: Path | None, resume: bool, trust_remote_code: bool, overrides: dict):
    """What `train` and `sft` share: the recipe, with its objective; the run (run/loop.py); its last line."""
    from dpo_cli.config import load_recipe
    from dpo_cli.run.distributed import is_main_process
    from dpo_cli.run.loop import train as run_training

    resolved = load_recipe(recipe, overrides)
    if recipe is not None and resolved.training.objective != objective:
        other = "sft" if resolved.training.objective == "sft" else "train"
        raise UserError(
            f"{recipe}: is a recipe of `dpo-cli {other}` (training.objective: {resolved.training.objective}); "
            f"run it with `dpo-cli {other}`, or set training.objective: {objective}"
        )
    resolved.training.objective = objective
    if objective == "sft" and resolved.model.from_adapter:
        raise UserError(
            "model.from_adapter: sft starts from the base model; --from-adapter is for `dpo-cli train`, which starts "
            "DPO from an sft adapter"
        )
    if objective == "sft" and resolved.model.reference_adapter:
        raise UserError("model.reference_adapter: sft has no reference policy; the key is for `dpo-cli train`")
    command = shlex.join(["dpo-cli", *sys.argv[1:]])
    result = run_training(
        resolved, resume=resume, console=console, trust_remote_code=trust_remote_code, command=command
    )
    if not is_main_process():  # under torchrun the main process reports for the job
        return
    last = result.records[-1] if result.records else {}
    summary = f"done: {result.steps} steps, adapter in {result.output_dir}"
    if last and objective == "sft":
        summary += f"; last loss {last['loss']:.4f}, token accuracy {last['mean_token_accuracy']:.2f}"
    elif last:
        summary += f"; last loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}"
    if result.final_eval and objective == "sft":
        summary += (
            f"; eval loss {result.final_eval['eval_loss']:.4f}, perplexity {result.final_eval['eval_perplexity']:.2f}"
        )
    console.print(summary)


RECIPE_HELP = "YAML recipe; flags below override its values."
RESUME_HELP = "Continue from the latest checkpoint in --output-dir."


@app.command()
@recipe_flags("train", *every_flagged_key("train", except_sections=("sft",)))
def train(
    recipe: Path | None = typer.Argument(None, help=RECIPE_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    *,
    overrides: dict,
):
    """Fine-tune a causal LM with DPO; writes a PEFT adapter folder, the resolved recipe, metrics.jsonl, report.png
    and a model card (README.md)."""
    _train_command("dpo", recipe, resume, trust_remote_code, overrides)


SFT_LEAVES_OUT = ("model.from_adapter", "model.reference_adapter")
"""Train-only keys sft does not take: an SFT run starts from the base (its adapter is what DPO starts from)."""


@app.command()
@recipe_flags("sft", *(key for key in every_flagged_key("sft", except_sections=("dpo",)) if key not in SFT_LEAVES_OUT))
def sft(
    recipe: Path | None = typer.Argument(None, help=RECIPE_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    *,
    overrides: dict,
):
    """Supervised fine-tuning (the stage before DPO): the mean negative log-likelihood of the completion tokens, as
    TRL's SFTTrainer. Reads prompt/completion, messages (the last assistant turn is learnt), text (all of it), or
    any preference file (its chosen completions: preferred-FT). The same run folder as `train`: a PEFT adapter,
    checkpoints and --resume, metrics.jsonl (loss, mean_token_accuracy; eval_loss and eval_perplexity with
    --eval-data or --eval-split), report.png and a model card."""
    _train_command("sft", recipe, resume, trust_remote_code, overrides)


@data_app.command("check")
@recipe_flags("data check", "model.path", *READS_DATA)
def data_check(
    files: list[Path] = typer.Argument(..., help="Preference files (any format and container) to check."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    show: int = typer.Option(
        0, "--show", help="Print the first N pairs as the model sees them: template applied, trained part marked."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    *,
    overrides: dict,
):
    """Formats, counts, invalid records per reason, token lengths, duplicates; exits 1 when a record is invalid.
    With --model, token lengths by that model's tokenizer, and --show N prints examples."""
    import json

    from dpo_cli.config import recipe_from_dict
    from dpo_cli.data.check import check_files, has_problems
    from dpo_cli.files import standard_json
    from dpo_cli.model.load import load_tokenizer
    from dpo_cli.run.data_report import print_check_report, print_examples, progress_to

    recipe = recipe_from_dict(overrides)
    if show < 0 or (show and not recipe.model.path):
        raise UserError(f"--show {show}: pass a number of pairs to show, with --model (its tokenizer renders them)")
    progress = Console(stderr=True, quiet=as_json)  # progress lines never mix into the JSON on stdout
    model = recipe.model.path or None
    tokenizer = load_tokenizer(model, trust_remote_code) if model is not None else None
    report = check_files([str(f) for f in files], recipe.data, tokenizer, model, progress_to(progress), show)
    if as_json:
        print(json.dumps(standard_json(report), indent=2, ensure_ascii=False, allow_nan=False))
    else:
        print_examples(report.get("examples", []), console)
        print_check_report(report, console)
    if has_problems(report):
        sys.exit(1)


@app.command("eval")
@recipe_flags(
    "eval",
    "model.path",
    "data.eval",
    "training.eval_batch_size",
    *READS_DATA,
    "data.on_invalid",
    "data.layout",
    "dpo.beta",
    required=("data.eval",),
)
def eval_(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder written by `dpo-cli train`."),
    output: Path | None = typer.Option(None, "--output", help="Write the metrics as JSON here."),
    per_example: Path | None = typer.Option(None, "--per-example", help="Write one JSON line per pair here."),
    generate: int = typer.Option(0, "--generate", help="Sample completions for this many prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Length limit of each sample."),
    samples: Path | None = typer.Option(None, "--samples", help="JSONL file for the --generate samples."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --generate samples."),
    reward: list[str] = typer.Option(
        [], "--reward", help="Score the --generate samples of policy and reference: reward, win rate, sampled KL."
    ),
    reward_weights: list[float] = typer.Option([], "--reward-weights", help="One weight per --reward (default 1)."),
    reward_4bit: bool = typer.Option(False, "--reward-4bit", help="Load a reward model 4-bit (NF4)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    *,
    overrides: dict,
):
    """Score an adapter on held-out pairs: policy (base + adapter) against reference (the base, or base + the
    reference-adapter/ of a run started --from-adapter), TRL's metrics.
    Settings come from the adapter's recipe.yaml (--model: another base); the flags and --set override them."""
    from dpo_cli.run.distributed import refuse_several_processes
    from dpo_cli.run.eval_adapter import EvalOptions, metrics_table, run_eval

    refuse_several_processes("eval")
    scorer = None
    if reward:
        from dpo_cli.online.policy_eval import reward_scorer
        from dpo_cli.online.rewards import load_rewards

        if generate <= 0:
            raise UserError("--reward scores samples: pass --generate N, the number of prompts to sample")
        rewards = load_rewards(reward, reward_weights, trust_remote_code, reward_4bit)
        scorer = reward_scorer(rewards, generate, max_new_tokens, seed)

    options = EvalOptions(
        adapter=adapter,
        overrides=overrides,
        output=output,
        per_example=per_example,
        generate=generate,
        max_new_tokens=max_new_tokens,
        samples=samples,
        seed=seed,
        trust_remote_code=trust_remote_code,
        sample_scorer=scorer,
    )
    report = run_eval(options, console)
    result, metrics = report.result, report.result["metrics"]
    settings = f"loss_type {'+'.join(result['dpo']['loss_type'])}, beta {result['dpo']['beta']}"
    settings += f", reference {result['reference']}"
    console.print(f"{result['adapter']} on {metrics['num_pairs']} pairs ({settings})", markup=False)
    console.print(metrics_table(metrics))
    for line in report.written:
        console.print(line)


REWARD_OPTION_HELP = (
    "FILE.py:FUNC, package.module:FUNC (TRL's reward function contract) or a local sequence-classification reward "
    "model folder; repeatable. Runs only because it is named here."
)


@app.command()
@recipe_flags("sample", "model.path", "model.quantize", "data.format", "data.columns", "data.chat_template")
@options_flags(SamplingOptions, "sample", "sampling", panel="Sampling and pairing")
def sample(
    prompts: list[Path] = typer.Option(..., "--prompts", help="Prompt file, or any pair or conversation file."),
    reward: list[str] = typer.Option(..., "--reward", help=REWARD_OPTION_HELP),
    output_dir: Path = typer.Option(..., "--output-dir", help="Folder for candidates.jsonl, pairs.jsonl, summary."),
    adapter: Path | None = typer.Option(None, "--adapter", help="Sample base + this adapter (a train output)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    *,
    sampling: SamplingOptions,
    overrides: dict,
):
    """Sample N completions per prompt, score them with --reward, and pair best against worst for `train`.
    Rerun into the same --output-dir to continue after the last complete prompt."""
    from dpo_cli.online.sample import SampleOptions, print_summary, run_sample
    from dpo_cli.run.distributed import refuse_several_processes

    refuse_several_processes("sample")
    options = SampleOptions(
        prompts=prompts,
        rewards=reward,
        output_dir=output_dir,
        sampling=sampling,
        adapter=adapter,
        overrides=overrides,
        trust_remote_code=trust_remote_code,
    )
    report = run_sample(options, console)
    print_summary(report, console)


@app.command()
@recipe_flags(
    "iterate", "model.path", "model.quantize", "training.max_steps", "training.batch_size", "training.lr",
    "dpo.beta", "data.max_length",
)  # fmt: skip
@options_flags(SamplingOptions, "iterate", "sampling", panel="Sampling and pairing")
def iterate(
    recipe: Path | None = typer.Argument(None, help="YAML recipe of each round's training; flags override it."),
    prompts: list[Path] = typer.Option(..., "--prompts", help="Prompt file, or any pair or conversation file."),
    reward: list[str] = typer.Option([], "--reward", help=REWARD_OPTION_HELP),
    rounds: int = typer.Option(..., "--rounds", help="Rounds of sample, pair, train, eval."),
    output_dir: Path = typer.Option(..., "--output-dir", help="Folder for round-NN/ folders, state and report.png."),
    eval_prompts: list[Path] = typer.Option([], "--eval-prompts", help="Held-out prompts for reward, win rate, KL."),
    prompts_per_round: int = typer.Option(0, "--prompts-per-round", help="0: all prompts each round; N: a slice."),
    reference: str = typer.Option(
        "previous", "--reference", help="previous: each round refers to the last round's policy; initial: to round 1's."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue where an earlier iterate into DIR stopped."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    *,
    sampling: SamplingOptions,
    overrides: dict,
):
    """Iterative DPO: each round samples the current policy, pairs best against worst by --reward, trains from the
    previous round's adapter (the reference: that adapter, or with --reference initial round 1's starting policy),
    and evaluates on --eval-prompts. Resumable with --resume."""
    from dpo_cli.online.iterate import IterateOptions, run_iterate
    from dpo_cli.run.distributed import refuse_several_processes

    refuse_several_processes("iterate")
    options = IterateOptions(
        recipe=recipe, prompts=prompts, rewards=reward, output_dir=output_dir, rounds=rounds, overrides=overrides,
        eval_prompts=eval_prompts, prompts_per_round=prompts_per_round, reference=reference, sampling=sampling,
        trust_remote_code=trust_remote_code, resume=resume, command=shlex.join(["dpo-cli", *sys.argv[1:]]),
    )  # fmt: skip
    run_iterate(options, console)
    console.print(f"done: {rounds} rounds in {output_dir}")


@app.command("merge-adapter")
@recipe_flags("merge-adapter", "model.path")
def merge_adapter(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder written by `dpo-cli train`."),
    output: Path = typer.Option(..., "--output", help="Folder for the merged model."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32."),
    base_weights: str = typer.Option(
        "nf4", "--base-weights", help="nf4: the dequantized 4-bit weights the adapter was trained on; original."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --output if it holds an earlier merge-adapter output."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors file, e.g. 5GB."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    *,
    overrides: dict,
):
    """Fold the adapter into its base: a plain Transformers model, loadable without PEFT or bitsandbytes.
    The base is the adapter's recipe's (--model: another); --set overrides its settings, e.g. model.device."""
    from dpo_cli.model.merge import MergeOptions
    from dpo_cli.model.merge import merge_adapter as run_merge
    from dpo_cli.run.distributed import refuse_several_processes

    refuse_several_processes("merge-adapter")

    options = MergeOptions(
        adapter=adapter,
        output=output,
        overrides=overrides,
        dtype=dtype,
        base_weights=base_weights,
        force=force,
        max_shard_size=max_shard_size,
        trust_remote_code=trust_remote_code,
    )
    result = run_merge(options, console)
    console.print(
        f"merged the adapter into {result.merged} weights ({result.dequantized} NF4 weights dequantized), "
        f"{result.dtype}, written to {result.output}"
    )
    base = "4-bit base" if result.base_quantized else "base"
    console.print(f"self-check: max |logit difference| against the {base} + adapter = {result.max_abs_logit_diff:.3g}")
    if result.base_weights == "original" and result.base_quantized:
        console.print("(with --base-weights original this includes NF4's rounding of the base, by design)")


@app.command()
def report(
    runs: list[Path] = typer.Argument(
        ..., metavar="DIR", help="Run folders written by `dpo-cli train` (finished or running)."
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        help="Figure file: .png, .svg or .pdf (default: DIR/report.png, or comparison.png for several).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace --output even if it is not a report dpo-cli drew."),
):
    """Draw a run's curves (or overlay several runs) and print a summary table: steps, final and best eval, speed."""
    from dpo_cli.online.iterate import draw_frontier, read_state
    from dpo_cli.run.report import REPORT_FILE, print_summary, report_runs

    states = [read_state(run) for run in runs]
    if all(states):  # iterate folders: their reward-against-KL frontiers, one line per run
        output = output or (runs[0] / REPORT_FILE if len(runs) == 1 else Path("comparison.png"))
        draw_frontier(output, states, [run.name for run in runs])
        console.print(f"reward-against-KL frontier of {len(runs)} iterate runs written to {output}", soft_wrap=True)
        return
    if output is None:
        output = runs[0] / REPORT_FILE if len(runs) == 1 else Path("comparison.png")
    result = report_runs(runs, output, force)
    figure = result.figure
    for note in result.notes:
        Console(stderr=True).print(note, style="yellow", markup=False, highlight=False, soft_wrap=True)
    print_summary(result.summaries, console)
    runs_drawn = f"{len(figure.runs)} run{'s' if len(figure.runs) > 1 else ''}"
    console.print(f"report of {runs_drawn} written to {figure.path}", soft_wrap=True)  # a path to copy, unbroken


def _quiet_libraries() -> None:
    """Keep the terminal for our own progress and errors: libraries' info chatter and deprecation notes go."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(peft|transformers|bitsandbytes|torch)")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _click_exception_classes() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(usage errors, aborts) of every click that typer may parse with.

    typer 0.29 parses with its own vendored copy of click, whose exceptions are not click's; older typers use click
    itself. `typer.BadParameter` is always the parsing click's, so its module names the right classes either way.
    """
    modules = [sys.modules[typer.BadParameter.__module__]]
    try:
        import click.exceptions

        modules.append(click.exceptions)
    except ImportError:  # typer 0.29 needs no click at all
        pass
    usage_errors = tuple(module.ClickException for module in modules)
    aborts = tuple({typer.Abort, *(module.Abort for module in modules if hasattr(module, "Abort"))})
    return usage_errors, aborts


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback; an interrupt
    (Ctrl-C, SIGTERM) at any moment ends in 130, even when a library swallowed or converted it on the way."""
    from dpo_cli.run import interrupts

    previous_handlers = interrupts.install()
    try:
        _main()
        if interrupts.received():
            _exit_interrupted()
    except SystemExit as exit_:
        if interrupts.received() and exit_.code in (0, None):
            _exit_interrupted()
        raise
    except BaseException:
        if interrupts.received():
            _exit_interrupted()
        raise
    finally:
        interrupts.restore(previous_handlers)


def _exit_interrupted() -> None:
    from dpo_cli.run import interrupts

    interrupts.exit_interrupted()


MAX_ERROR_CHARS = 2000


def _one_line(message: str) -> str:
    """A last guard on what reaches the terminal: values inside messages are cut short where they are written
    (errors.shown); this keeps a message that missed it from flooding stderr."""
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 3] + "..."


def _main() -> None:
    _quiet_libraries()
    usage_errors, aborts = _click_exception_classes()
    try:
        code = app(prog_name="dpo-cli", standalone_mode=False)  # not "python -m dpo_cli" in the usage line
    except UserError as error:
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        details = getattr(error, "details", None)  # a user's reward raised: under our line, its own traceback
        if details:
            print(details, file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        _exit_interrupted()
    except usage_errors as error:  # a mistyped command, option or value: the usage line, exit 2 (its own code)
        error.show()
        sys.exit(error.exit_code)
    except aborts:
        _exit_interrupted()
    # Outside standalone mode typer turns Ctrl-C into Exit(130) and *returns* that code rather than exiting with it.
    # Every interrupt ends through _exit_interrupted: it also clears CPython's note of a KeyboardInterrupt that left
    # exec'd code, which otherwise turns the exit into a SIGINT (-2; seen for a Ctrl-C 0.45 s after the start).
    if code == 130:
        _exit_interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)
