"""The recipe: every setting of a run, as YAML over typed dataclasses.

A recipe file has one mapping per section (`model`, `lora`, `data`, `training`, `dpo`, `report`). Keys not declared
here are an error naming the key, never ignored: a misspelled `learnig_rate` silently falling back to the default is
the worst kind of bug in a training run. Command-line flags and `--set section.key=value` override the file; the fully
resolved recipe is saved beside the adapter so `eval` and `merge-adapter` need only `--adapter DIR`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Config composes the rules its sections' owners keep beside their code, in leaf modules that import only the
# standard library (and errors): no torch, and nothing that imports this module back.
from dpo_cli.data.formats import FORMAT_CHOICES, parse_columns
from dpo_cli.data.sft_formats import SFT_FORMAT_NAMES
from dpo_cli.dpo.loss_specs import dpo_settings_problem
from dpo_cli.errors import UserError, shown
from dpo_cli.files import read_user_text, write_text_atomic

RECIPE_FILENAME = "recipe.yaml"
SCALAR_KEYS = ("reward",)
"""Top-level recipe keys that are not sections: `iterate`'s reward spec (run only when --reward names it too)."""
REFERENCE_COPY = "reference-adapter"
"""The folder, inside a run started `--from-adapter`, holding a copy of that adapter: the run's reference."""
PRECOMPUTE_REF_CHOICES = ("auto", "true", "false")
"""dpo.precompute_ref: precompute (and cache) the reference when it pays, always, or never."""
OBJECTIVES = ("dpo", "sft")
"""training.objective: what a run trains, set by its command (train: dpo, sft: sft)."""
ON_INVALID_CHOICES = ("error", "skip")
"""data.on_invalid: stop at the first bad record, or set bad records aside and count them."""
SHARDING_CHOICES = ("ddp", "fsdp")
"""training.sharding: under a launcher, a whole model per process (DDP) or the model sharded over them (FSDP2)."""
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
"""The devices model.resolve_device understands: auto, cpu, cuda, cuda:N."""


@dataclass
class ModelSection:
    path: str = field(default="", metadata={"flag": "--model"})
    """Hugging Face model id or local folder of the base model."""
    quantize: bool = field(default=True, metadata={"flag": "--no-quantize"})
    """Load the base 4-bit (bitsandbytes NF4, double quantization); false (--no-quantize): LoRA on a bf16/fp32 base."""
    compute_dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32."""
    gradient_checkpointing: bool = field(
        default=True, metadata={"flag": "--gradient-checkpointing/--no-gradient-checkpointing"}
    )
    """Recompute activations in backward: much less memory for about a third more compute; off
    (--no-gradient-checkpointing) when the activations fit, for speed."""
    compile: bool = field(default=False, metadata={"flag": "--compile"})
    """train: torch.compile each decoder layer (the 4-bit matmuls stay bitsandbytes' own kernels). The first steps
    pay the compile; it pays off on long runs on a GPU, not on CPU (bench/RESULTS.md)."""
    device: str = "auto"
    """auto (cuda if present, else cpu), cpu, cuda or cuda:N."""
    trust_remote_code: bool = False
    from_adapter: str = field(default="", metadata={"flag": "--from-adapter"})
    """train: a LoRA adapter folder (from `dpo-cli sft`, or any PEFT LoRA adapter of this base with the `lora`
    section's rank, alpha and modules) that the policy starts from and that, frozen, is the reference: base + this
    adapter, never the bare base, unless model.reference_adapter names another. The run keeps a copy of its
    reference in its reference-adapter/ folder."""
    reference_adapter: str = field(default="", metadata={"flag": "--reference-adapter"})
    """train: the reference policy. Unset: the model the run starts from (base + model.from_adapter, or the base);
    `base`: the bare base (every adapter off), even for a run started --from-adapter; a LoRA adapter folder: base +
    that adapter, frozen (iterate --reference initial: each round starts from the last round's adapter and refers
    to the first round's). A folder named base is written ./base."""

    def __post_init__(self):
        _check_finite_floats("model", self)
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise UserError(f"recipe key model.device: {shown(self.device)} is not one of auto, cpu, cuda, cuda:N")
        _check_choice("model.compute_dtype", self.compute_dtype, ("auto", "bfloat16", "float16", "float32"))


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ["all-linear"] adapts every linear layer but the LM head."""

    def __post_init__(self):
        _check_finite_floats("lora", self)
        _check_positive("lora.r", self.r)
        _check_positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"recipe key lora.dropout: {self.dropout} is outside [0, 1); use e.g. 0.0 or 0.05")
        if "lm_head" in self.target_modules:
            raise UserError(
                "recipe key lora.target_modules: 'lm_head' cannot be adapted, log-probs are computed from the "
                "LM head weight directly; remove it"
            )


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list, metadata={"flag": "--data"})
    """Files to train on: preference data (sft also reads prompt/completion, messages and text)."""
    eval: list[str] = field(default_factory=list, metadata={"flag": "--eval-data", "flag_in": {"eval": "--data"}})
    """Held-out files (as --data): evaluated every `training.eval_steps` and at the end of training."""
    max_length: int = field(default=1024, metadata={"flag": "--max-length"})
    """Prompt+completion tokens kept per sequence (the start is kept); a pair whose prompt alone fills it is invalid."""
    format: str = field(default="auto", metadata={"flag": "--format"})
    """auto (detect each file's format from its first record), explicit, hh-rlhf, conversational, openai, sharegpt,
    oasst or stack-exchange (dpo_cli.data.formats.FORMATS); for sft also prompt-completion, messages or text."""
    columns: str = field(default="", metadata={"flag": "--columns"})
    """Map the file's names onto the pair's: "prompt=question,chosen=response_j,rejected=response_k"."""
    on_invalid: str = field(default="error", metadata={"flag": "--on-invalid"})
    """error: the first bad record stops the run with its file and line; skip: set bad records aside, count them and
    write them to skipped-{split}.jsonl in the output folder."""
    chat_template: str = field(default="", metadata={"flag": "--chat-template"})
    """The chat template of conversational data: tokenizer (the model's own, the default), a built-in name (chatml,
    llama3, qwen2.5, qwen3, gemma, gemma3, mistral, phi3, phi4, deepseek3, zephyr, alpaca) or a Jinja file."""
    eval_split: float = field(default=0.0, metadata={"flag": "--eval-split"})
    """With no eval files: hold out this fraction of the training pairs (the same ones for the same data) as eval."""
    cache_dir: str = ""
    """Where prepared (tokenized) data is kept between runs; empty: $DPO_CLI_CACHE or ~/.cache/dpo-cli."""
    layout: str = field(default="auto", metadata={"flag": "--layout"})
    """How a micro-batch's sequences sit in rows: padded (TRL's, one sequence per row), packed (end to end, no
    padding), shared-prompt (each prompt once, [prompt | chosen | rejected]) or auto (shared-prompt where the model's
    attention can take its mask, else padded). Same numbers in every layout, to float rounding."""

    def __post_init__(self):
        _check_finite_floats("data", self)
        _check_positive("data.max_length", self.max_length)
        _check_choice("data.format", self.format, (*FORMAT_CHOICES, *SFT_FORMAT_NAMES))
        _check_choice("data.on_invalid", self.on_invalid, ON_INVALID_CHOICES)
        _check_choice("data.layout", self.layout, ("auto", "padded", "packed", "shared-prompt"))
        parse_columns(self.columns)
        if not 0.0 <= self.eval_split < 1.0:
            raise UserError(f"recipe key data.eval_split: {self.eval_split} is outside [0, 1); e.g. 0.05")
        if self.eval_split and self.eval:
            raise UserError("recipe keys data.eval and data.eval_split are both set; use eval files or a split")


@dataclass
class TrainingSection:
    output_dir: str = field(default="", metadata={"flag": "--output-dir"})
    """Where the adapter, checkpoints and metrics go."""
    max_steps: int = field(default=0, metadata={"flag": "--max-steps"})
    """Optimizer steps to run; 0 means `epochs` passes over the data."""
    epochs: float = field(default=1.0, metadata={"flag": "--epochs"})
    """Passes over the training data (when max_steps is 0)."""
    batch_size: int = field(default=4, metadata={"flag": "--batch-size"})
    """Preference pairs per micro-batch (each pair is two sequences)."""
    grad_accum: int = field(default=1, metadata={"flag": "--grad-accum"})
    """Micro-batches per optimizer step."""
    lr: float = field(default=5e-5, metadata={"flag": "--lr"})
    """Peak learning rate, reached after the warmup."""
    scheduler: str = "cosine"
    """cosine, linear or constant, after the warmup."""
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = field(default=42, metadata={"flag": "--seed"})
    """Seed for data order and initialisation."""
    save_steps: int = 100
    """Write a resumable checkpoint every N optimizer steps (0: only at the end)."""
    save_total_limit: int = 2
    """Checkpoints kept; older ones are deleted once a newer one is complete."""
    eval_steps: int = 0
    """Evaluate on `data.eval` every N steps (0: only at the end)."""
    objective: str = "dpo"
    """What the run trains: dpo (`dpo-cli train`) or sft (`dpo-cli sft`); each command sets it."""
    eval_batch_size: int = field(default=8, metadata={"flag_in": {"eval": "--batch-size"}})
    """Pairs per forward pass when evaluating (memory grows with it)."""
    max_tokens_per_batch: int = field(default=0, metadata={"flag": "--max-tokens-per-batch"})
    """0: micro-batches of `batch_size` pairs. N: micro-batches of up to N tokens (prompt+chosen + prompt+rejected
    per pair), pairs of similar length together, the same micro-batches each epoch in a seeded order. The loss is
    still the mean over the pairs of an optimizer step."""
    sharding: str = field(default="ddp", metadata={"flag": "--sharding"})
    """Under a launcher (torchrun): ddp keeps a whole copy of the model in each process (speed); fsdp shards the 4-bit
    base, the adapter and its optimizer state over the processes (FSDP2), for a model larger than one GPU."""

    def __post_init__(self):
        _check_finite_floats("training", self)
        for key in ("batch_size", "grad_accum", "eval_batch_size"):
            _check_positive(f"training.{key}", getattr(self, key))
        for key in ("max_steps", "save_steps", "eval_steps", "save_total_limit", "max_tokens_per_batch"):
            if getattr(self, key) < 0:
                raise UserError(f"recipe key training.{key}: {shown(getattr(self, key))} is negative; use 0 or more")
        for key in ("epochs", "weight_decay"):
            if getattr(self, key) < 0:
                raise UserError(f"recipe key training.{key}: {shown(getattr(self, key))} is negative; use 0 or more")
        # Clipping to a norm of 0 would zero every gradient; a large value turns clipping off instead.
        _check_positive("training.max_grad_norm", self.max_grad_norm)
        if not 0 <= self.seed < 2**63:  # torch seeds are 64-bit; each epoch's order uses seed + epoch
            raise UserError(f"recipe key training.seed: {shown(self.seed)} is outside [0, 2**63); use e.g. 42")
        if self.max_steps == 0 and self.epochs == 0:
            raise UserError("recipe keys training.max_steps and training.epochs are both 0; set one of them")
        if self.lr <= 0:
            raise UserError(f"recipe key training.lr: {self.lr} must be positive, e.g. 5e-5")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"recipe key training.warmup_ratio: {self.warmup_ratio} is outside [0, 1)")
        _check_choice("training.scheduler", self.scheduler, ("cosine", "linear", "constant"))
        _check_choice("training.objective", self.objective, OBJECTIVES)
        _check_choice("training.sharding", self.sharding, SHARDING_CHOICES)


@dataclass
class DpoSection:
    """The objective; names and checks are TRL 1.16's DPOConfig's. The README's Losses section tables them."""

    beta: float = field(default=0.1, metadata={"flag": "--beta"})
    """Strength of the pull towards the reference: small beta lets the policy drift further (IPO's τ)."""
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    """One loss or several summed (e.g. MPO: [sigmoid, bco_pair, sft]); TRL's names."""
    loss_weights: list[float] | None = None
    """One weight per loss_type entry; none means 1.0 each."""
    label_smoothing: float = 0.0
    """ε: cDPO for sigmoid, aot, aot_unpaired; the label flip probability of robust; exo_pair's ε (> 0, e.g. 1e-3)."""
    discopop_tau: float = 0.05
    """DiscoPOP's temperature of the logistic/exponential mix."""
    ld_alpha: float | None = None
    """LD-DPO: weight in [0, 1] of the tokens by which one completion outruns the other; none: plain sums."""
    use_weighting: bool = False
    """WPO: weight each pair by how likely the policy is to sample both completions."""
    f_divergence_type: str = "reverse_kl"
    """f-DPO: reverse_kl (plain DPO), forward_kl, js_divergence or alpha_divergence."""
    f_alpha_divergence_coef: float = 0.5
    """α of alpha_divergence."""
    reference_free: bool = False
    """SimPO: no reference model at all; length-normalised policy log-probs with a target margin `gamma`."""
    gamma: float = 0.5
    """SimPO's target reward margin (only with reference_free)."""
    precompute_ref: str | bool = "auto"
    """auto, true or false. true: score the reference once over the training data before the first step and keep
    the values in the reference cache beside the prepared data, so each step (and every later run, resume or eval on
    the same inputs) runs only the policy; false: score it live in each step; auto: true when the run visits every
    training pair at least once or the cache already holds them, else false."""

    def __post_init__(self):
        _check_finite_floats("dpo", self)
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if isinstance(self.precompute_ref, bool):  # recipes from before `auto` said true or false
            self.precompute_ref = str(self.precompute_ref).lower()
        _check_choice("dpo.precompute_ref", self.precompute_ref, PRECOMPUTE_REF_CHOICES)
        # The rules of each loss live with the losses, in dpo/loss_specs.py (no torch).
        defaults = {item.name: item.default for item in dataclasses.fields(self)}
        problem = dpo_settings_problem(self, defaults)
        if problem is not None:
            raise UserError(problem)


@dataclass
class SftSection:
    """Supervised fine-tuning (`dpo-cli sft`): which tokens the loss is on."""

    loss_on_prompt: bool = field(default=False, metadata={"flag": "--loss-on-prompt"})
    """sft: train on the prompt's tokens too (text: the whole sequence; messages: the whole conversation); by
    default the loss is on the completion only (the last assistant turn of a conversation)."""


TRACKERS = ("tensorboard", "wandb")


@dataclass
class ReportSection:
    """Where the metrics go besides metrics.jsonl and report.png, which every run writes."""

    trackers: list[str] = field(default_factory=list, metadata={"flag": "--report-to"})
    """tensorboard (event files in the output folder's tensorboard/), wandb, both, or none (the default)."""
    project: str = field(default="", metadata={"flag": "--project"})
    """The wandb project; empty: $WANDB_PROJECT, else dpo-cli."""
    run_name: str = field(default="", metadata={"flag": "--run-name"})
    """The run's name in the trackers; empty: the output folder's name."""

    def __post_init__(self):
        if isinstance(self.trackers, str):
            self.trackers = [self.trackers]
        names = [name.strip() for entry in self.trackers for name in entry.split(",") if name.strip()]
        self.trackers = list(dict.fromkeys(name for name in names if name != "none"))  # "none" is HF's spelling
        for name in self.trackers:
            _check_choice("report.trackers", name, TRACKERS)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    dpo: DpoSection = field(default_factory=DpoSection)
    sft: SftSection = field(default_factory=SftSection)
    report: ReportSection = field(default_factory=ReportSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        command = "sft" if self.training.objective == "sft" else "train"
        header = f"# The fully resolved recipe of this run: `dpo-cli {command} THIS_FILE` repeats it.\n"
        reference = reference_adapter_of(self.model)
        if reference:
            what = "model.from_adapter" if reference == self.model.from_adapter else "model.reference_adapter"
            header += (
                f"# The reference (base + {what}, frozen) is kept in {REFERENCE_COPY}/ beside this file;\n"
                "# eval and the model card read it there.\n"
            )
        elif self.model.from_adapter:
            header += "# The reference is the bare base (model.reference_adapter: base), every adapter off.\n"
        write_text_atomic(path, header + yaml.safe_dump(self.to_dict(), sort_keys=False))


REFERENCE_IS_BASE = "base"
"""model.reference_adapter's value for the bare base as the reference."""


def reference_adapter_of(model: ModelSection) -> str:
    """The adapter folder whose frozen copy is the run's reference, or "" when the reference is the bare base:
    model.reference_adapter's folder, or, unset, model.from_adapter's (the model the run starts from)."""
    if model.reference_adapter == REFERENCE_IS_BASE:
        return ""
    return model.reference_adapter or model.from_adapter


def _check_finite_floats(section: str, values: Any) -> None:
    """Refuse inf and nan in any float setting: they pass every range check (nan compares false to everything) and
    then poison the run, e.g. `--epochs inf` never ends and `lr: .nan` turns every weight into nan."""
    for item in dataclasses.fields(values):
        value = getattr(values, item.name)
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                example = f"; e.g. {item.default}" if isinstance(item.default, float) else ""
                raise UserError(f"recipe key {section}.{item.name}: {number} is not a finite number{example}")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise UserError(f"recipe key {key}: {shown(value)} must be positive")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"recipe key {key}: {shown(value)} is not one of {', '.join(choices)}")


def _did_you_mean(name: Any, options: typing.Iterable[str]) -> str:
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"recipe key {key}: expected a list, got {type(value).__name__} {shown(value)}")
        return [_coerce(key, item, item_type) for item in value]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, value, option)
            except UserError as error:
                errors.append(str(error))
        raise UserError(errors[0])
    if annotation is type(None):
        if value is None:
            return None
    elif annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif annotation is float and isinstance(value, str):
        # YAML 1.1 reads `1e-5` (no dot) as a string; a number is plainly what was meant.
        try:
            return float(value)
        except ValueError:
            pass
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif isinstance(value, annotation) and not (annotation is int and isinstance(value, bool)):
        return value
    expected = getattr(annotation, "__name__", str(annotation))
    raise UserError(f"recipe key {key}: expected {expected}, got {type(value).__name__} {shown(value)}")


def _build_section(cls: type, name: str, values: dict[str, Any]) -> Any:
    values = _section_mapping(name, values)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            written = key if isinstance(key, str) and len(key) <= 100 else shown(key, 100)
            raise UserError(f"unknown recipe key {name}.{written}{_did_you_mean(key, known)}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    sections = {f.name: f for f in dataclasses.fields(Recipe)}
    built = {}
    for name, section_values in values.items():
        if name not in sections:
            raise UserError(f"unknown recipe section {shown(name)}{_did_you_mean(name, sections)}")
        built[name] = _build_section(typing.get_type_hints(Recipe)[name], name, section_values)
    return Recipe(**built)


MAX_RECIPE_VALUES = 10_000
"""Values a recipe may hold once its YAML aliases are expanded; a whole recipe holds under a hundred."""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with a bound on what aliases expand to and one line for a value it cannot read.

    An alias is a reference, so loading `a: &a [x, x]`, `b: &b [*a, *a]`, ... costs nothing; but anything that walks
    the result (a copy, a repr in an error line) walks 2**levels items: 423 bytes once cost 2 GB. The composed
    document is measured before anything is built from it, counting each alias as what it expands to.
    """

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node, MAX_RECIPE_VALUES)
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as error:  # e.g. an integer of 5,000 digits, a 13th month
            problem = f"cannot read this value ({shown(str(error), 120)})"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _check_expanded_size(root: yaml.Node, limit: int) -> None:
    """Raise a YAML error (with the line) when `root`, aliases expanded, holds more than `limit` nodes or holds
    itself. Each node's expanded size is worked out once, so this costs the distinct nodes, not the expansion."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a value that holds it", node.start_mark)
        in_progress.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise yaml.composer.ComposerError(
                    None, None, f"expands to more than {limit:,} values (aliases within aliases)", node.start_mark
                )
        in_progress.discard(key)
        sizes[key] = total
        return total

    size(root)


MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a few kB; a recipe.yaml in a folder someone handed you could be anything."""


def _check_recipe_file(path: Path) -> None:
    """A pipe or a device would block or never end; a huge file would be read whole. One line each instead."""
    try:
        info = path.stat()
    except OSError:
        return  # read_user_text says why, in its words
    if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: not a regular file; pass a YAML recipe file")
    if info.st_size > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: {info.st_size:,} bytes, not a recipe (a few kB); pass a YAML recipe file")


def load_yaml(text: str) -> Any:
    """YAML read safely (no Python objects) with aliases bounded; raises yaml.YAMLError, or RecursionError when the
    nesting is deeper than Python's stack."""
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: plain data only


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a YAML recipe, with one-line errors for unreadable or malformed files."""
    _check_recipe_file(Path(path))
    text = read_user_text(path, "recipe file", "pass a YAML recipe file")
    try:
        values = load_yaml(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise UserError(f"{where}: {problem}; fix the YAML") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe; fix the YAML") from None
    if not isinstance(values, dict):
        sections = "model, lora, data, training, dpo, sft, report"
        raise UserError(f"{path}: a recipe must be a mapping of sections ({sections})")
    for name, section in values.items():
        if name not in SCALAR_KEYS and section is not None and not isinstance(section, dict):
            raise UserError(
                f"{path}: recipe section {shown(name, 60)} must be a mapping of keys to values, got "
                f"{type(section).__name__} {shown(section, 60)}; write its settings as indented `key: value` lines"
            )
    return values


def parse_set_option(option: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is read as YAML so `1e-5`, `true`, `[a, b]` work."""
    if "=" not in option or "." not in option.split("=", 1)[0]:
        raise UserError(f"--set {option!r}: expected section.key=value, e.g. --set training.warmup_ratio=0.05")
    dotted, raw = option.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return section, key, value


def merge_overrides(values: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Overlay {section: {key: value}} on a raw recipe mapping; None values (flags not given) are skipped."""
    merged = {name: _section_mapping(name, section) for name, section in values.items()}
    for section, keys in overrides.items():
        for key, value in keys.items():
            if value is not None:
                merged.setdefault(section, {})[key] = value
    return merged


def _section_mapping(name: Any, section: Any) -> dict[str, Any]:
    """A copy of one section's mapping (none: empty); anything else is one line naming the section."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise UserError(
            f"recipe section {shown(name)} must be a mapping of keys to values, got {type(section).__name__}"
        )
    return dict(section)


def load_recipe(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Recipe:
    values = read_recipe_file(path) if path is not None else {}
    return recipe_from_dict(merge_overrides(values, overrides or {}))
