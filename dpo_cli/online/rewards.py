"""`--reward SPEC`: what scores a sample, named on the command line and nowhere else.

A spec is one of:
- `FILE.py:FUNC` or `package.module:FUNC`: a function with TRL's reward contract,
  `func(prompts=[...], completions=[...], **columns) -> list[float | None]`, so a TRL user's file carries over.
  Prompts and completions are strings, or message lists for conversational data; `None` means "no opinion".
- a local folder holding an `AutoModelForSequenceClassification` with one label: its logit is the reward.

User code runs because the user named it here. When it raises, the user needs *their* traceback, so a
`RewardFailed` carries it (as `details`, printed under our one line); a wrong count, a NaN or a non-number is one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dpo_cli.errors import UserError
from dpo_cli.model.load import resolve_compute_dtype, resolve_device

Text = str | list  # a string, or a list of {"role", "content"} messages

SPEC_HELP = (
    "FILE.py:FUNC, package.module:FUNC (TRL's reward function contract) or a local sequence-classification reward "
    "model folder; repeatable"
)


class RewardFailed(UserError):
    """A user's reward function raised: our line says which and where, `details` is its own traceback."""

    def __init__(self, message: str, details: str):
        super().__init__(message)
        self.details = details


@dataclass
class Reward:
    """One named scorer: `score(prompts, completions, columns, where)` -> one float or None per completion."""

    name: str
    score: Callable[[list[Text], list[Text], dict[str, list], str], list[float | None]]


@dataclass
class RewardSet:
    """The rewards of one command and their weights; `combined` is what pairing and eval use."""

    rewards: list[Reward]
    weights: list[float] = field(default_factory=list)

    def __post_init__(self):
        if not self.weights:
            self.weights = [1.0] * len(self.rewards)

    @property
    def names(self) -> list[str]:
        return [reward.name for reward in self.rewards]

    def score(
        self, prompts: list[Text], completions: list[Text], columns: dict[str, list], where: str
    ) -> tuple[list[float | None], list[dict[str, float | None]]]:
        """(combined reward per completion, {reward name: its value} per completion).

        The combined reward is the weighted sum; a completion any reward has no opinion on (None) gets None: it is
        counted, and left out of pairing and means, rather than scored as if that reward had said 0."""
        each = [reward.score(prompts, completions, columns, where) for reward in self.rewards]
        combined: list[float | None] = []
        per_completion: list[dict[str, float | None]] = []
        for i in range(len(completions)):
            values = [values[i] for values in each]
            per_completion.append(dict(zip(self.names, values, strict=True)))
            if any(value is None for value in values):
                combined.append(None)
            else:
                combined.append(sum(w * v for w, v in zip(self.weights, values, strict=True)))
        return combined, per_completion


def load_rewards(
    specs: Sequence[str],
    weights: Sequence[float] | None = None,
    trust_remote_code: bool = False,
    quantize: bool = False,
    batch_size: int = 16,
    device: str = "auto",
) -> RewardSet:
    """Every `--reward`, loaded and checked before any model or data: a wrong spec costs milliseconds."""
    if not specs:
        raise UserError("no reward: pass --reward FILE.py:FUNC, --reward package.module:FUNC or --reward MODEL_DIR")
    weights = list(weights or [])
    if weights and len(weights) != len(specs):
        raise UserError(
            f"--reward-weights: {len(weights)} weights for {len(specs)} rewards; give one weight per --reward"
        )
    for weight in weights:
        if not math.isfinite(weight):
            raise UserError(f"--reward-weights: {weight} is not a finite number")
    rewards = [load_reward(spec, trust_remote_code, quantize, batch_size, device) for spec in specs]
    names = [reward.name for reward in rewards]
    if len(set(names)) != len(names):
        raise UserError(f"--reward: {', '.join(names)}: the same reward is named twice; name each once")
    return RewardSet(rewards, weights)


def load_reward(spec: str, trust_remote_code: bool, quantize: bool, batch_size: int, device: str) -> Reward:
    path = Path(spec)
    if path.is_dir():
        return _model_reward(path, trust_remote_code, quantize, batch_size, device)
    module_part, colon, function_name = spec.rpartition(":")
    if not colon or not module_part or not function_name:
        raise UserError(
            f"--reward {spec}: not FILE.py:FUNC, package.module:FUNC or a reward model folder (no such folder)"
        )
    if module_part.endswith(".py"):
        module = _import_file(Path(module_part), spec)
    else:
        module = _import_module(module_part, spec)
    function = getattr(module, function_name, None)
    if function is None:
        raise UserError(f"--reward {spec}: {module_part} has no function {function_name!r}; check the name")
    if not callable(function):
        raise UserError(f"--reward {spec}: {function_name} in {module_part} is not a function")
    return Reward(spec, _function_scorer(spec, function))


def _import_file(path: Path, spec: str):
    if not path.is_file():
        raise UserError(f"--reward {spec}: {path} not found; pass the path of a Python file")
    name = f"dpo_cli_reward_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"--reward {spec}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:  # their file: their traceback
        raise RewardFailed(
            f"--reward {spec}: importing {path} raised {type(error).__name__}", _user_traceback(error)
        ) from None
    return module


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and name.startswith(error.name):
            raise UserError(
                f"--reward {spec}: no module named {error.name!r}; is it installed, or on PYTHONPATH?"
            ) from None
        raise RewardFailed(
            f"--reward {spec}: importing {name} raised {type(error).__name__}", _user_traceback(error)
        ) from None
    except Exception as error:
        raise RewardFailed(
            f"--reward {spec}: importing {name} raised {type(error).__name__}", _user_traceback(error)
        ) from None


def _user_traceback(error: BaseException) -> str:
    """The traceback from the user's code on: the frame of ours that called it is left out."""
    tb = error.__traceback__.tb_next if error.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(error), error, tb)).rstrip()


def _function_scorer(name: str, function: Callable) -> Callable:
    def score(prompts: list[Text], completions: list[Text], columns: dict[str, list], where: str):
        try:
            values = function(prompts=prompts, completions=completions, **columns)
        except Exception as error:
            raise RewardFailed(
                f"reward {name} raised {type(error).__name__} on the prompt of {where}; its traceback follows",
                _user_traceback(error),
            ) from None
        return checked_values(name, values, len(completions), where)

    return score


def checked_values(name: str, values: object, count: int, where: str) -> list[float | None]:
    """`values` as floats (None kept): one per completion, each a finite real number or None."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "tolist"):
        raise UserError(f"reward {name} returned {type(values).__name__} on {where}; it must return a list")
    if hasattr(values, "tolist") and not isinstance(values, Sequence):
        values = values.tolist()  # a tensor or an array
    if len(values) != count:
        raise UserError(
            f"reward {name} returned {len(values)} values for {count} completions on {where}; return one per completion"
        )
    checked: list[float | None] = []
    for index, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(
                f"reward {name} returned {type(value).__name__} {value!r:.40} for completion {index} on {where}; "
                "rewards are numbers (or None for no opinion)"
            )
        if not math.isfinite(float(value)):
            raise UserError(
                f"reward {name} returned {float(value)} for completion {index} on {where}; rewards must be finite "
                "(return None for no opinion)"
            )
        checked.append(float(value))
    return checked


# Reward models ------------------------------------------------------------------------------------------------------


def _model_reward(folder: Path, trust_remote_code: bool, quantize: bool, batch_size: int, device: str) -> Reward:
    """A local sequence-classification model with one label, checked from its config.json before it loads."""
    config = _read_config(folder)
    architectures = config.get("architectures") or []
    if not any(str(name).endswith("ForSequenceClassification") for name in architectures):
        kind = ", ".join(map(str, architectures)) or "no architectures in config.json"
        raise UserError(
            f"--reward {folder}: is a {kind}, not a sequence-classification reward model "
            "(AutoModelForSequenceClassification with one label)"
        )
    labels = config.get("num_labels", len(config.get("id2label") or {}) or 2)
    if labels != 1:
        raise UserError(f"--reward {folder}: the model has {labels} labels; a reward model has one (its score)")
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(
            f"--reward {folder}: this model needs its own Python code (auto_map in its config) to load; read that "
            "code and pass --trust-remote-code if you trust it"
        )
    scorer = _ModelScorer(folder, trust_remote_code, quantize, batch_size, device)
    return Reward(str(folder), scorer)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"--reward {folder}: a folder without config.json; pass a reward model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not valid JSON ({error}); the reward model folder is damaged") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a JSON object; the reward model folder is damaged")
    return config


class _ModelScorer:
    """Loads on first use (after the data has been checked), then scores prompt+completion texts in batches."""

    def __init__(self, folder: Path, trust_remote_code: bool, quantize: bool, batch_size: int, device: str):
        self.folder, self.trust_remote_code, self.quantize = folder, trust_remote_code, quantize
        self.batch_size, self.device_name = batch_size, device
        self.model = self.tokenizer = None

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

        device = resolve_device(self.device_name)
        dtype = resolve_compute_dtype("auto", device)
        kwargs: dict = {"dtype": dtype, "trust_remote_code": self.trust_remote_code}
        if self.quantize:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
            kwargs["device_map"] = {"": device}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=self.trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(self.folder, **kwargs)
        except (OSError, ValueError) as error:
            raise UserError(f"--reward {self.folder}: cannot load the reward model ({error})") from None
        if not self.quantize:
            model.to(device)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.eval()
        self.device = device
        self.max_length = getattr(model.config, "max_position_embeddings", None)

    def texts(self, prompts: list[Text], completions: list[Text]) -> list[str]:
        if prompts and isinstance(prompts[0], list):  # conversational: the chat template renders the exchange
            pairs = zip(prompts, completions, strict=True)
            return [self.tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in pairs]
        return [p + c for p, c in zip(prompts, completions, strict=True)]

    def __call__(self, prompts: list[Text], completions: list[Text], columns: dict, where: str) -> list[float | None]:
        import torch

        if self.model is None:
            self.load()
        texts = self.texts(prompts, completions)
        scores: list[float | None] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                batch = self.tokenizer(
                    chunk,
                    return_tensors="pt",
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                )
                logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits  # (B, 1)
                scores.extend(float(value) for value in logits[:, 0].float().cpu())
        return checked_values(str(self.folder), scores, len(completions), where)
