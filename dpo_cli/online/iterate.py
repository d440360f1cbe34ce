"""`dpo-cli iterate`: rounds of sample -> pair -> train -> eval, as one resumable command (RLHFlow's iterative DPO).

    dpo-cli iterate RECIPE --prompts FILE --reward happy.py:score --rounds 3 --output-dir DIR --eval-prompts TEST

Round r samples from the current policy (the base, or the recipe's model.from_adapter, in round 1; round r-1's
adapter after), on its slice of the prompts (`--prompts-per-round`) or all of them; pairs the samples; trains with
`train --from-adapter` the previous round's adapter; then samples the new policy and the base on the held-out prompts
for reward, win rate and sampled KL against the base. The reference of round r's training (`--reference`):
- `previous` (RLHFlow): the policy round r starts from, i.e. a frozen copy of round r-1's adapter;
- `initial` (OpenRLHF): round 1's starting policy in every round, i.e. the recipe's model.from_adapter if it has one,
  else the bare base (model.reference_adapter: base), so nothing lets the rounds drift from it unpenalised.

It calls the functions `sample`, `train` and `eval` call. DIR/round-NN/ holds the round's prompts.jsonl, samples/
(a `dpo-cli sample` folder) and run/ (a `dpo-cli train` folder). DIR/iterate-state.json, written atomically after
each phase, says where the run is; `--resume` continues there: a sample folder continues after its last complete
prompt, a run folder from its last checkpoint, an eval is done again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dpo_cli.config import REFERENCE_IS_BASE, merge_overrides, read_recipe_file, recipe_from_dict
from dpo_cli.data.records import json_line
from dpo_cli.errors import UserError, shown
from dpo_cli.files import write_bytes_atomic, write_text_atomic
from dpo_cli.model.adapter import load_base_tokenizer, load_policy, open_adapter
from dpo_cli.online.policy_eval import evaluate_samples, sample_metrics
from dpo_cli.online.prompts import Prompt, read_prompts
from dpo_cli.online.rewards import RewardSet, load_rewards
from dpo_cli.online.sample import PAIRS, SUMMARY, SampleOptions, run_sample
from dpo_cli.online.sampling_options import SamplingOptions
from dpo_cli.output_folder import check_folder_is_ours, claimed_folder
from dpo_cli.run.loop import train

STATE = "iterate-state.json"
REPORT = "report.png"
KIND = "iterate"
PHASES = ("sample", "train", "eval", "done")
PREVIOUS, INITIAL = "previous", "initial"
REFERENCES = (PREVIOUS, INITIAL)
SETTINGS_BEFORE = {"reference": PREVIOUS}
"""Settings a state file written before they existed holds implicitly: what those runs did."""


@dataclasses.dataclass
class IterateOptions:
    recipe: Path | None
    prompts: list[Path]
    rewards: list[str]
    output_dir: Path
    rounds: int
    overrides: dict[str, dict] = dataclasses.field(default_factory=dict)
    eval_prompts: list[Path] = dataclasses.field(default_factory=list)
    prompts_per_round: int = 0
    reference: str = "previous"
    """previous: round r refers to round r-1's policy; initial: every round refers to round 1's starting policy."""
    """0: every round samples all the prompts; N: round r takes the r-th slice of N (wrapping around)."""
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)
    """Each round's sampling and pairing, as `dpo-cli sample` takes them (its batch_size is --sample-batch-size)."""
    trust_remote_code: bool = False
    resume: bool = False
    command: str | None = None

    def settings(self) -> dict:
        """What a resumed run must share with the run it continues."""
        fields = dataclasses.asdict(self)
        for name in ("resume", "command", "output_dir", "trust_remote_code"):
            fields.pop(name)
        sampling = fields.pop("sampling")
        sampling["sample_batch_size"] = sampling.pop("batch_size")  # the names state files have always used
        return json.loads(json.dumps({**fields, **sampling}, default=str))


def recipe_values(options: IterateOptions) -> dict:
    """The recipe mapping under the flags; a reward it names runs only when --reward names it too."""
    values = read_recipe_file(options.recipe) if options.recipe is not None else {}
    named = values.pop("reward", None)
    if named is not None and not options.rewards:
        raise UserError(
            f"{options.recipe}: names the reward {shown(named)}; a reward is code and runs only when named on the "
            "command line: pass --reward SPEC if you trust it"
        )
    return merge_overrides(values, options.overrides)


def round_prompts(prompts: list[Prompt], per_round: int, round_number: int) -> list[Prompt]:
    """Round r's prompts: all of them, or the r-th slice of `per_round`, wrapping around the list."""
    if not per_round:
        return prompts
    start = (round_number - 1) * per_round
    return [prompts[(start + i) % len(prompts)] for i in range(min(per_round, len(prompts)))]


@dataclasses.dataclass
class Iteration:
    options: IterateOptions
    values: dict
    rewards: RewardSet
    state: dict
    console: Console

    @property
    def folder(self) -> Path:
        return Path(self.options.output_dir)

    def save(self) -> None:
        write_text_atomic(self.folder / STATE, json.dumps(self.state, indent=2) + "\n")

    def round_dir(self, number: int) -> Path:
        return self.folder / f"round-{number:02d}"

    def policy_adapter(self, number: int) -> Path | None:
        """The adapter round `number` starts from: the previous round's, or in round 1 the recipe's own (if any)."""
        if number == 1:
            start = (self.values.get("model") or {}).get("from_adapter")
            return Path(start) if start else None
        return self.round_dir(number - 1) / "run"

    def reference_adapter(self, number: int) -> str:
        """model.reference_adapter of round `number`'s training: "" (the adapter it starts from) for `previous`
        and in round 1; for `initial`, round 1's starting adapter, or the bare base."""
        if self.options.reference == PREVIOUS or number == 1:
            return ""
        start = self.policy_adapter(1)
        return str(start) if start else REFERENCE_IS_BASE

    def sample(self, number: int, prompts: list[Prompt]) -> None:
        folder = self.round_dir(number)
        prompt_file = folder / "prompts.jsonl"
        write_text_atomic(prompt_file, "".join(json_line({"prompt": p.text, **p.columns}) + "\n" for p in prompts))
        options = self.options
        model = self.values.get("model") or {}
        report = run_sample(
            SampleOptions(
                prompts=[prompt_file], rewards=options.rewards, output_dir=folder / "samples",
                sampling=dataclasses.replace(options.sampling, seed=options.sampling.seed + number),
                adapter=self.policy_adapter(number),
                overrides={"model": {k: model[k] for k in ("path", "quantize", "device") if k in model}},
                trust_remote_code=options.trust_remote_code,
            ),
            self.console,
            self.rewards,
        )  # fmt: skip
        if report.resumed_prompts:
            self.console.print(f"round {number}: continued after {report.resumed_prompts} prompts sampled before")
        summary = report.summary
        self.console.print(
            f"round {number}: {summary['samples']} samples, reward mean {summary['reward_mean']:.4f}; "
            f"{summary['pairs']} pairs, {summary['ties']} ties dropped"
        )
        if not report.summary["pairs"]:
            raise UserError(
                f"round {number}: the samples gave no pair (all ties or below --min-margin; see "
                f"{folder / 'samples' / SUMMARY}); raise --num-samples or --temperature, or lower --min-margin"
            )

    def train(self, number: int) -> None:
        run_dir = self.round_dir(number) / "run"
        start = self.policy_adapter(number)
        values = merge_overrides(
            self.values,
            {
                "data": {"train": [str(self.round_dir(number) / "samples" / PAIRS)], "eval": [], "eval_split": 0.0},
                "training": {"output_dir": str(run_dir)},
                "model": {"from_adapter": str(start or ""), "reference_adapter": self.reference_adapter(number)},
            },
        )
        resume = run_dir.is_dir() and any(run_dir.iterdir())
        train(recipe_from_dict(values), resume=resume, console=self.console,
              trust_remote_code=self.options.trust_remote_code, command=self.options.command)  # fmt: skip

    def evaluate(self, number: int, eval_prompts: list[Prompt]) -> dict:
        adapter = open_adapter(self.round_dir(number) / "run", None, self.console, self.options.trust_remote_code)
        model, tokenizer = load_policy(adapter), load_base_tokenizer(adapter)
        batch_size = adapter.recipe.training.eval_batch_size
        sampling = self.options.sampling
        results = evaluate_samples(
            model, tokenizer, eval_prompts, self.rewards, sampling.max_new_tokens, sampling.seed, batch_size
        )
        return sample_metrics(results, adapter.recipe.dpo.beta)


def run_iterate(options: IterateOptions, console: Console) -> dict:
    if options.rounds <= 0:
        raise UserError(f"--rounds {options.rounds}: must be at least 1")
    if options.reference not in REFERENCES:
        raise UserError(f"--reference {shown(options.reference)}: must be one of {', '.join(REFERENCES)}")
    if options.prompts_per_round < 0:
        raise UserError(f"--prompts-per-round {options.prompts_per_round}: must be 0 (all) or a number of prompts")
    values = recipe_values(options)
    recipe = recipe_from_dict(values)  # every key checked before anything runs
    sampling = options.sampling
    sampling.check()  # before the rewards and prompts load
    rewards = load_rewards(
        options.rewards, sampling.reward_weights, options.trust_remote_code, sampling.reward_quantize
    )
    prompts = read_prompts([str(p) for p in options.prompts], recipe.data)
    eval_prompts = read_prompts([str(p) for p in options.eval_prompts], recipe.data) if options.eval_prompts else []
    folder = Path(options.output_dir)
    check_folder_is_ours(folder, KIND, "--output-dir", "; or pass --resume with the folder of an earlier iterate")
    with claimed_folder(folder, KIND, "--output-dir"):
        state = _start_state(folder, options)
        iteration = Iteration(options, values, rewards, state, console)
        iteration.save()
        for number in range(1, options.rounds + 1):
            record = _round_record(state, number)
            iteration.save()  # the round is under way: a resumed run finds it, whatever phase it dies in
            if record["phase"] == "sample":
                console.print(f"round {number}: sampling")
                iteration.sample(number, round_prompts(prompts, options.prompts_per_round, number))
                record["phase"] = "train"
                iteration.save()
            if record["phase"] == "train":
                console.print(f"round {number}: training")
                iteration.train(number)
                record["phase"] = "eval"
                iteration.save()
            if record["phase"] == "eval":
                if eval_prompts:
                    console.print(f"round {number}: evaluating on {len(eval_prompts)} held-out prompts")
                    record["eval"] = iteration.evaluate(number, eval_prompts)
                record["pairs"] = json.loads((iteration.round_dir(number) / "samples" / SUMMARY).read_text())
                record["phase"] = "done"
                iteration.save()
                if eval_prompts:
                    draw_frontier(folder / REPORT, [state], [folder.name])
            console.print(round_table(state))
    return state


def _start_state(folder: Path, options: IterateOptions) -> dict:
    path = folder / STATE
    if not path.is_file():
        return {"settings": options.settings(), "rounds": []}
    if not options.resume:
        raise UserError(f"--output-dir {folder}: holds an iterate run; pass --resume to continue it, or pick another")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable; the folder is damaged, pick another --output-dir") from None
    saved, now = state.get("settings", {}), options.settings()
    for key, value in now.items():
        before = saved.get(key, SETTINGS_BEFORE.get(key))
        if key != "rounds" and before != value:
            raise UserError(
                f"--resume: {key} was {before!r} in {folder}, and this run asks for {value!r}; resume with "
                "the same settings (only --rounds may change)"
            )
    state["settings"] = now
    return state


def _round_record(state: dict, number: int) -> dict:
    while len(state["rounds"]) < number:
        state["rounds"].append({"round": len(state["rounds"]) + 1, "phase": "sample"})
    return state["rounds"][number - 1]


def round_table(state: dict) -> Table:
    table = Table(title="iterate: one row per round")
    for column in ("round", "pairs", "ties", "train reward mean", "eval reward", "win rate vs base", "KL vs base"):
        table.add_column(column, justify="right")
    for record in state["rounds"]:
        pairs, scores = record.get("pairs") or {}, record.get("eval") or {}

        def number(value, digits=4):
            return "-" if value is None else f"{value:.{digits}f}"

        table.add_row(
            str(record["round"]), str(pairs.get("pairs", "-")), str(pairs.get("ties", "-")),
            number(pairs.get("reward_mean")), number(scores.get("samples/reward_policy")),
            number(scores.get("samples/win_rate"), 3), number(scores.get("samples/kl"), 3),
        )  # fmt: skip
    return table


def frontier_points(state: dict) -> list[tuple[float, float]]:
    """(sampled KL against the base, mean reward) per evaluated round, after the base's own point (0, its reward)."""
    evals = [record["eval"] for record in state["rounds"] if record.get("eval")]
    if not evals:
        return []
    base = statistics.fmean(e["samples/reward_reference"] for e in evals)  # the same samples every round
    return [(0.0, base)] + [(e["samples/kl"], e["samples/reward_policy"]) for e in evals]


def draw_frontier(path: Path, states: list[dict], names: list[str]) -> None:
    """Reward against sampled KL, one marker per round, a line per run; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4.5))
    for state, name in zip(states, names, strict=True):
        points = frontier_points(state)
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=name)
            for index, (kl, reward) in enumerate(points):
                axes.annotate(str(index), (kl, reward), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel("sampled KL(policy || base), nats")
    axes.set_ylabel("mean reward on held-out prompts")
    axes.set_title("reward against KL, one point per round (0: the base)")
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    write_bytes_atomic(Path(path), buffer.getvalue())


def read_state(folder: Path) -> dict | None:
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{path}: unreadable; the iterate folder is damaged") from None
