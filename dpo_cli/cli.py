"""The `dpo-cli` command line: parses flags, builds the recipe, calls the work; no logic a test would want."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from dpo_cli.errors import UserError

app = typer.Typer(
    help="Align causal language models to human preferences with DPO: 4-bit base, LoRA adapters, fused log-probs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=False)


FORMAT_HELP = "Data format: auto, explicit, hh-rlhf, conversational, openai, sharegpt, oasst or stack-exchange."
COLUMNS_HELP = "Map names: prompt=question,chosen=response_j,rejected=response_k."
ON_INVALID_HELP = "error: stop at the first bad record; skip: set bad records aside, count and write them."
CHAT_TEMPLATE_HELP = "Jinja chat template file for conversational data when the tokenizer has none."
TRUST_HELP = "Run the model's own Python code (auto_map) if it has any; only this flag allows it, never a recipe."
REPORT_TO_HELP = "Also log to tensorboard and/or wandb (repeatable or comma-separated); default: none."
TOKEN_BUDGET_HELP = "Micro-batches of up to N tokens of similar-length pairs, instead of --batch-size pairs."
LAYOUT_HELP = (
    "Batch layout: auto (default: shared-prompt where the model allows it), padded (TRL's), packed or shared-prompt."
)
data_app = typer.Typer(help="Look at preference data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.callback()
def root() -> None:
    """dpo-cli: train, evaluate and merge DPO LoRA adapters."""


def _overrides_from_flags(**flags) -> dict[str, dict]:
    """Map command-line flags onto recipe sections; flags left unset (None) keep the recipe's value."""
    mapping = {
        "model": ("model", "path"),
        "data": ("data", "train"),
        "eval_data": ("data", "eval"),
        "max_length": ("data", "max_length"),
        "data_format": ("data", "format"),
        "columns": ("data", "columns"),
        "on_invalid": ("data", "on_invalid"),
        "chat_template": ("data", "chat_template"),
        "eval_split": ("data", "eval_split"),
        "layout": ("data", "layout"),
        "max_tokens_per_batch": ("training", "max_tokens_per_batch"),
        "output_dir": ("training", "output_dir"),
        "max_steps": ("training", "max_steps"),
        "epochs": ("training", "epochs"),
        "batch_size": ("training", "batch_size"),
        "grad_accum": ("training", "grad_accum"),
        "lr": ("training", "lr"),
        "seed": ("training", "seed"),
        "beta": ("dpo", "beta"),
        "report_to": ("report", "trackers"),
        "project": ("report", "project"),
        "run_name": ("report", "run_name"),
    }
    overrides: dict[str, dict] = {}
    for flag, value in flags.items():
        if value is None or value == []:
            continue
        section, key = mapping[flag]
        overrides.setdefault(section, {})[key] = [str(v) for v in value] if isinstance(value, list) else value
    return overrides


@app.command()
def train(
    recipe: Path | None = typer.Argument(None, help="YAML recipe; flags below override its values."),
    model: str | None = typer.Option(None, "--model", help="Base model: Hugging Face id or local folder."),
    data: list[Path] | None = typer.Option(None, "--data", help="Training preference file (repeatable)."),
    eval_data: list[Path] | None = typer.Option(None, "--eval-data", help="Held-out preference file (repeatable)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", help="Where the adapter, checkpoints and metrics go."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Optimizer steps (0: use --epochs)."),
    epochs: float | None = typer.Option(None, "--epochs", help="Passes over the training data."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Pairs per micro-batch."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    beta: float | None = typer.Option(None, "--beta", help="DPO beta: higher keeps the policy closer to the base."),
    max_length: int | None = typer.Option(None, "--max-length", help="Tokens kept of prompt+completion."),
    data_format: str | None = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: str | None = typer.Option(None, "--columns", help=COLUMNS_HELP),
    on_invalid: str | None = typer.Option(None, "--on-invalid", help=ON_INVALID_HELP),
    chat_template: Path | None = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
    eval_split: float | None = typer.Option(None, "--eval-split", help="Without --eval-data: hold out this fraction."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for data order and initialisation."),
    layout: str | None = typer.Option(None, "--layout", help=LAYOUT_HELP),
    max_tokens_per_batch: int | None = typer.Option(None, "--max-tokens-per-batch", help=TOKEN_BUDGET_HELP),
    no_quantize: bool = typer.Option(False, "--no-quantize", help="Train LoRA on a bf16/fp32 base instead of 4-bit."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --output-dir."),
    report_to: list[str] | None = typer.Option(None, "--report-to", help=REPORT_TO_HELP),
    project: str | None = typer.Option(
        None, "--project", help="The wandb project (default: $WANDB_PROJECT or dpo-cli)."
    ),
    run_name: str | None = typer.Option(
        None, "--run-name", help="The run's name in the trackers (default: the folder's)."
    ),
    set_: list[str] | None = typer.Option(None, "--set", help="Any recipe key: --set section.key=value (repeatable)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
):
    """Fine-tune a causal LM with DPO; writes a PEFT adapter folder, the resolved recipe, metrics.jsonl, report.png
    and a model card (README.md)."""
    from dpo_cli.config import load_recipe, parse_set_option
    from dpo_cli.run.loop import train as run_training
    from dpo_cli.run.model_card import write_model_card

    overrides = _overrides_from_flags(
        model=model,
        data=data,
        eval_data=eval_data,
        output_dir=str(output_dir) if output_dir is not None else None,
        max_steps=max_steps,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        beta=beta,
        max_length=max_length,
        data_format=data_format,
        columns=columns,
        on_invalid=on_invalid,
        chat_template=str(chat_template) if chat_template is not None else None,
        eval_split=eval_split,
        seed=seed,
        report_to=report_to,
        project=project,
        run_name=run_name,
        layout=layout,
        max_tokens_per_batch=max_tokens_per_batch,
    )
    if no_quantize:
        overrides.setdefault("model", {})["quantize"] = False
    for option in set_ or []:
        section, key, value = parse_set_option(option)
        overrides.setdefault(section, {})[key] = value
    resolved = load_recipe(recipe, overrides)
    result = run_training(resolved, resume=resume, console=console, trust_remote_code=trust_remote_code)
    write_model_card(result.output_dir, command=shlex.join(["dpo-cli", *sys.argv[1:]]))
    last = result.records[-1] if result.records else {}
    summary = f"done: {result.steps} steps, adapter in {result.output_dir}"
    if last:
        summary += f"; last loss {last['loss']:.4f}, reward accuracy {last['rewards/accuracies']:.2f}"
    console.print(summary)


@data_app.command("check")
def data_check(
    files: list[Path] = typer.Argument(..., help="Preference files (any format and container) to check."),
    model: str | None = typer.Option(None, "--model", help="Model whose tokenizer measures token lengths."),
    max_length: int | None = typer.Option(None, "--max-length", help="How many pairs this would cut or drop."),
    data_format: str | None = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: str | None = typer.Option(None, "--columns", help=COLUMNS_HELP),
    chat_template: Path | None = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
):
    """Formats, counts, invalid records per reason, token lengths, duplicates; exits 1 when a record is invalid."""
    import json

    from dpo_cli.config import DataSection
    from dpo_cli.data.check import check_files, has_problems
    from dpo_cli.model.load import load_tokenizer
    from dpo_cli.run.data_report import print_check_report, progress_to

    flags = {"max_length": max_length, "format": data_format, "columns": columns, "chat_template": chat_template}
    data = DataSection(**{key: str(v) if isinstance(v, Path) else v for key, v in flags.items() if v is not None})
    progress = Console(stderr=True, quiet=as_json)  # progress lines never mix into the JSON on stdout
    tokenizer = load_tokenizer(model, trust_remote_code) if model is not None else None
    report = check_files([str(f) for f in files], data, tokenizer, model, progress_to(progress))
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_check_report(report, console)
    if has_problems(report):
        sys.exit(1)


@app.command("eval")
def eval_(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder written by `dpo-cli train`."),
    data: list[Path] = typer.Option(..., "--data", help="Held-out preference file (repeatable)."),
    model: str | None = typer.Option(None, "--model", help="Base model; default: the one the adapter was trained on."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Pairs per forward pass (memory grows with it)."),
    max_length: int | None = typer.Option(None, "--max-length", help="Tokens kept of prompt+completion."),
    output: Path | None = typer.Option(None, "--output", help="Write the metrics as JSON here."),
    per_example: Path | None = typer.Option(None, "--per-example", help="Write one JSON line per pair here."),
    generate: int = typer.Option(0, "--generate", help="Sample completions for this many prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Length limit of each sample."),
    samples: Path | None = typer.Option(None, "--samples", help="JSONL file for the --generate samples."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --generate samples."),
    data_format: str | None = typer.Option(None, "--format", help=FORMAT_HELP),
    columns: str | None = typer.Option(None, "--columns", help=COLUMNS_HELP),
    on_invalid: str | None = typer.Option(None, "--on-invalid", help=ON_INVALID_HELP),
    chat_template: Path | None = typer.Option(None, "--chat-template", help=CHAT_TEMPLATE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
):
    """Score an adapter on held-out pairs: policy (base + adapter) against reference (the base), TRL's metrics."""
    from dpo_cli.run.eval_adapter import EvalOptions, run_eval

    reading = {"format": data_format, "columns": columns, "on_invalid": on_invalid, "chat_template": chat_template}
    options = EvalOptions(
        adapter=adapter,
        data=[str(path) for path in data],
        model=model,
        batch_size=batch_size,
        max_length=max_length,
        output=output,
        per_example=per_example,
        generate=generate,
        max_new_tokens=max_new_tokens,
        samples=samples,
        seed=seed,
        reading={key: str(value) for key, value in reading.items() if value is not None},
        trust_remote_code=trust_remote_code,
    )
    run_eval(options, console)


@app.command("merge-adapter")
def merge_adapter(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter folder written by `dpo-cli train`."),
    output: Path = typer.Option(..., "--output", help="Folder for the merged model."),
    model: str | None = typer.Option(None, "--model", help="Base model; default: the one the adapter was trained on."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16, float16 or float32."),
    base_weights: str = typer.Option(
        "nf4", "--base-weights", help="nf4: the dequantized 4-bit weights the adapter was trained on; original."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --output if it holds an earlier merge-adapter output."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors file, e.g. 5GB."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
):
    """Fold the adapter into its base: a plain Transformers model, loadable without PEFT or bitsandbytes."""
    from dpo_cli.model.merge import MergeOptions
    from dpo_cli.model.merge import merge_adapter as run_merge

    options = MergeOptions(adapter, output, model, dtype, base_weights, force, max_shard_size, trust_remote_code)
    run_merge(options, console)


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
):
    """Draw a run's curves (or overlay several runs) and print a summary table: steps, final and best eval, speed."""
    from dpo_cli.run.report import REPORT_FILE, print_summary, report_runs

    if output is None:
        output = runs[0] / REPORT_FILE if len(runs) == 1 else Path("comparison.png")
    figure, summaries = report_runs(runs, output)
    print_summary(summaries, console)
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
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)


def _main() -> None:
    _quiet_libraries()
    usage_errors, aborts = _click_exception_classes()
    try:
        code = app(prog_name="dpo-cli", standalone_mode=False)  # not "python -m dpo_cli" in the usage line
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except usage_errors as error:  # a mistyped command, option or value: the usage line, exit 2 (its own code)
        error.show()
        sys.exit(error.exit_code)
    except aborts:
        sys.exit(130)
    # Outside standalone mode typer turns Ctrl-C into Exit(130) and *returns* that code rather than exiting with it.
    if code == 130:
        print("error: interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)
