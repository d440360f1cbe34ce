"""One spec per loss: its function, the options it reads, whether it needs the reference, and its valid ranges.

This module is the table the recipe checks ask (`dpo_settings_problem`) and `losses.py` resolves to functions. It
imports only the standard library, so reading a recipe never imports torch. Adding a loss is one `LossSpec` entry
here, its function in `losses.py`, and one test.

The spec names are TRL 1.16's DPO loss names, plus `simpo`: a recipe selects SimPO with `dpo.reference_free: true`
and `loss_type: sigmoid` (TRL's spelling), which `loss_names` resolves to the `simpo` entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class OptionRange:
    """Where a loss needs an option to lie: low < value (or <=) and value < high; `message` says why otherwise.

    `message` is formatted with key (the recipe key), value and losses (the losses in use that need the range)."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    message: str = ""

    def holds(self, value: float) -> bool:
        above = self.low is None or (value >= self.low if self.low_inclusive else value > self.low)
        return above and (self.high is None or value < self.high)


# label_smoothing as the probability that a label is flipped: from 0.5 on the rejected completion would be preferred.
FLIP_PROBABILITY = OptionRange(
    high=0.5,
    message="{key}: {value} must be below 0.5 for {losses}: it is the probability that a label is flipped, and "
    "from 0.5 on the rejected completion would be preferred",
)
EXO_EPSILON = OptionRange(
    low=0.0,
    low_inclusive=False,
    message="{key}: exo_pair needs it above 0 (log ε would be -inf); the EXO paper uses 1e-3",
)
WPO_SORTED = (
    "recipe key dpo.use_weighting: WPO weights are per pair, but aot and aot_unpaired sort pairs over the batch; use "
    "another loss or turn use_weighting off"
)
WPO_PER_BATCH = (
    "recipe key dpo.use_weighting: sft is one number per batch, not per pair, so WPO has no weight for it (TRL 1.16 "
    "fails on this combination too); drop sft or turn use_weighting off"
)


@dataclass(frozen=True)
class LossSpec:
    function: str
    """The name of the loss function `(PairLogps, LossOptions) -> (P,)` in dpo/losses.py."""
    needs_reference: bool = True
    reads: tuple[str, ...] = ()
    """The dpo options besides beta that change this loss; setting one that no loss in use reads is an error."""
    f_divergence: bool = True
    """The f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in a chosen-minus-rejected difference,
    so only losses of that difference (or none at all, sft) take another f_divergence_type."""
    ranges: Mapping[str, OptionRange] = field(default_factory=dict)
    conflicts: Mapping[str, str] = field(default_factory=dict)
    """option -> the one-line error (formatted with value) when that option is away from its default."""
    rewards: str = "implicit"
    """Which rewards the metrics report: implicit β·log(πθ/πref), or simpo's length-normalised β·log πθ / |y|."""


LOSS_SPECS: dict[str, LossSpec] = {
    "sigmoid": LossSpec("sigmoid_loss", reads=("label_smoothing",), ranges={"label_smoothing": FLIP_PROBABILITY}),
    "hinge": LossSpec("hinge_loss"),
    "ipo": LossSpec("ipo_loss"),
    "exo_pair": LossSpec("exo_pair_loss", reads=("label_smoothing",), ranges={"label_smoothing": EXO_EPSILON}),
    "nca_pair": LossSpec("nca_pair_loss", f_divergence=False),
    "robust": LossSpec("robust_loss", reads=("label_smoothing",), ranges={"label_smoothing": FLIP_PROBABILITY}),
    "bco_pair": LossSpec("bco_pair_loss", f_divergence=False),
    "sppo_hard": LossSpec("sppo_hard_loss", f_divergence=False),
    # Sorting over the batch would misalign WPO's per-pair weights.
    "aot": LossSpec(
        "aot_loss",
        reads=("label_smoothing",),
        f_divergence=False,
        ranges={"label_smoothing": FLIP_PROBABILITY},
        conflicts={"use_weighting": WPO_SORTED},
    ),
    "aot_unpaired": LossSpec(
        "aot_unpaired_loss",
        reads=("label_smoothing",),
        f_divergence=False,
        ranges={"label_smoothing": FLIP_PROBABILITY},
        conflicts={"use_weighting": WPO_SORTED},
    ),
    "apo_zero": LossSpec("apo_zero_loss", f_divergence=False),
    "apo_down": LossSpec("apo_down_loss", f_divergence=False),
    "discopop": LossSpec("discopop_loss", reads=("discopop_tau",)),
    "sft": LossSpec("sft_loss", needs_reference=False, conflicts={"use_weighting": WPO_PER_BATCH}),
    "sigmoid_norm": LossSpec("sigmoid_norm_loss"),
    "simpo": LossSpec(
        "simpo_loss",
        needs_reference=False,
        reads=("gamma",),
        f_divergence=False,
        rewards="simpo",
        conflicts={
            "precompute_ref": "there is no reference to precompute",
            "f_divergence_type": "f-divergences act on reference log-ratios",
            "ld_alpha": "SimPO already normalises by length",
            "use_weighting": "WPO-weighted SimPO has no TRL counterpart to check it",
        },
    ),
}

# The names a recipe's dpo.loss_type takes (TRL's); `simpo` is reached through dpo.reference_free.
RECIPE_LOSS_TYPES = tuple(name for name in LOSS_SPECS if name != "simpo")
REFERENCE_FREE_REPLACES = {"sigmoid": "simpo"}
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES = tuple(name for name in RECIPE_LOSS_TYPES if LOSS_SPECS[name].f_divergence)
LABEL_SMOOTHING_LOSSES = tuple(name for name in RECIPE_LOSS_TYPES if "label_smoothing" in LOSS_SPECS[name].reads)

UNSET_VALUES = {"precompute_ref": ("auto", "false")}
"""Values that ask for nothing, besides the default: with no reference, `auto` and `false` both precompute none."""

# What to say when an option is set away from its default but no loss in use reads it.
UNREAD_OPTION = {
    "label_smoothing": "recipe key dpo.label_smoothing: {value} has no effect on {loss_type}; only {readers} read it",
    "discopop_tau": "recipe key dpo.discopop_tau: read only by loss_type {readers}, not {loss_type}",
    "gamma": "recipe key dpo.gamma: SimPO's margin is read only with dpo.reference_free: true",
}


def loss_names(loss_type: list[str], reference_free: bool) -> list[str]:
    """The spec names a recipe's losses run as: with reference_free, sigmoid is SimPO."""
    if not reference_free:
        return list(loss_type)
    return [REFERENCE_FREE_REPLACES.get(name, name) for name in loss_type]


def dpo_settings_problem(settings, defaults: Mapping[str, object]) -> str | None:
    """The first thing wrong with a recipe's dpo section, as one line naming the key, or None.

    `settings` has the DpoSection's attributes; `defaults` its field defaults (an option is "set" when it differs).
    """
    for check in (_basic_problem, _reference_free_problem, _option_problem, _divergence_problem):
        problem = check(settings, defaults)
        if problem:
            return problem
    return None


def _basic_problem(settings, defaults) -> str | None:
    if not settings.loss_type:
        return "recipe key dpo.loss_type: empty; name at least one loss, e.g. [sigmoid]"
    for name in settings.loss_type:
        if name not in RECIPE_LOSS_TYPES:
            return f"recipe key dpo.loss_type: {name!r} is not one of {', '.join(RECIPE_LOSS_TYPES)}"
    if settings.f_divergence_type not in F_DIVERGENCE_TYPES:
        return (
            f"recipe key dpo.f_divergence_type: {settings.f_divergence_type!r} is not one of "
            f"{', '.join(F_DIVERGENCE_TYPES)}"
        )
    if settings.beta <= 0:
        return f"recipe key dpo.beta: {settings.beta} must be positive, e.g. 0.1"
    weights, losses = settings.loss_weights, settings.loss_type
    if weights is not None and len(weights) != len(losses):
        return (
            f"recipe key dpo.loss_weights: {len(weights)} weights for {len(losses)} losses {losses}; give one "
            "weight per loss_type entry"
        )
    return None


def _reference_free_problem(settings, defaults) -> str | None:
    if not settings.reference_free:
        return None
    names = loss_names(settings.loss_type, True)
    if "simpo" not in names or any(LOSS_SPECS[name].needs_reference for name in names):
        return (
            "recipe key dpo.reference_free: runs SimPO, whose loss is loss_type sigmoid (optionally with sft, as "
            f"CPO-SimPO); {settings.loss_type} needs a reference"
        )
    for option, why in LOSS_SPECS["simpo"].conflicts.items():
        value = getattr(settings, option)
        if value != defaults[option] and value not in UNSET_VALUES.get(option, ()):
            return f"recipe key dpo.reference_free: cannot be combined with dpo.{option}={value}: {why}"
    return None


def _option_problem(settings, defaults) -> str | None:
    """Options no loss in use reads, values outside a loss's range, and options a loss cannot be combined with."""
    names = loss_names(settings.loss_type, settings.reference_free)
    if settings.discopop_tau <= 0:
        return f"recipe key dpo.discopop_tau: {settings.discopop_tau} must be positive, e.g. 0.05"
    for option, message in UNREAD_OPTION.items():
        value = getattr(settings, option)
        readers = [name for name in LOSS_SPECS if option in LOSS_SPECS[name].reads and name != "simpo"]
        if value != defaults[option] and not any(option in LOSS_SPECS[name].reads for name in names):
            # The losses as they run: with reference_free, sigmoid is simpo, which reads no label_smoothing.
            return message.format(value=value, loss_type=names, readers=", ".join(readers))
    for option in ("label_smoothing",):
        problem = _range_problem(option, getattr(settings, option), names)
        if problem:
            return problem
    if settings.ld_alpha is not None and not 0.0 <= settings.ld_alpha <= 1.0:
        return f"recipe key dpo.ld_alpha: {settings.ld_alpha} is outside [0, 1]; 1 is plain DPO"
    for name in names:
        for option, message in LOSS_SPECS[name].conflicts.items():
            if name != "simpo" and getattr(settings, option) != defaults[option]:
                return message
    return None


def _range_problem(option: str, value: float, names: list[str]) -> str | None:
    """Every range a loss in use sets on `option`, each reported once with all the losses that set it."""
    key = f"recipe key dpo.{option}"
    if not 0.0 <= value < 1.0:
        return f"{key}: {value} is outside [0, 1)"
    ranges: dict[OptionRange, list[str]] = {}
    for name in names:
        bound = LOSS_SPECS[name].ranges.get(option)
        if bound is not None and not bound.holds(value):
            ranges.setdefault(bound, []).append(name)
    for bound, losses in ranges.items():
        return bound.message.format(key=key, value=value, losses=", ".join(losses))
    return None


def _divergence_problem(settings, defaults) -> str | None:
    names = loss_names(settings.loss_type, settings.reference_free)
    if settings.f_divergence_type != "reverse_kl" and not all(LOSS_SPECS[name].f_divergence for name in names):
        others = sorted(name for name in set(names) if not LOSS_SPECS[name].f_divergence)
        return (
            f"recipe key dpo.f_divergence_type: {settings.f_divergence_type} has no valid form for "
            f"{', '.join(others)}; it works with {', '.join(F_DIVERGENCE_LOSSES)}, or use reverse_kl"
        )
    if settings.f_alpha_divergence_coef != defaults["f_alpha_divergence_coef"]:
        if settings.f_divergence_type != "alpha_divergence":
            return (
                "recipe key dpo.f_alpha_divergence_coef: read only with f_divergence_type alpha_divergence, "
                f"not {settings.f_divergence_type}"
            )
    return None
