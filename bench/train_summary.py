"""bench_train.py's figures: the median over repeated runs of each tool, the check that both did the same work,
and the markdown table."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import benchlib
from train_workers import Spec, WorkerResult


@dataclass
class Summary:
    tool: str
    layout: str  # dpo-cli: the layout the runs resolved to; TRL: empty
    auto_layout: str  # dpo-cli: the layout `auto`, the default, resolves to for this model
    pairs_per_second: float
    tokens_per_second: float
    seconds_per_step: float  # median over the timed steps
    cpu_seconds_per_step: float  # median CPU time of the worker's threads per timed step
    peak_step_mib: float | None
    absolute_peak_mib: float
    rss_growth_mib: float | None  # CPU: peak RSS minus RSS before the first step
    first_loss: float
    last_loss: float
    runs: int


def summarize(spec: Spec, results: list[WorkerResult]) -> Summary:
    """Median over repeated runs of one tool."""
    pairs_s, tokens_s, step_s, cpu_s = [], [], [], []
    timed = slice(spec.warmup, spec.warmup + spec.steps)
    for result in results:
        ends = result.step_ends
        window = ends[spec.warmup + spec.steps - 1] - ends[spec.warmup - 1]
        pairs_s.append(sum(result.pairs_per_step[timed]) / window)
        tokens_s.append(sum(result.tokens_per_step[timed]) / window)
        step_s.append(_median_step(ends, spec))
        cpu_s.append(_median_step(result.cpu_ends, spec))
    peaks = [r.peak_step_mib for r in results if r.peak_step_mib is not None]
    return Summary(
        tool=results[0].tool,
        layout=results[0].layout,
        auto_layout=results[0].auto_layout,
        pairs_per_second=statistics.median(pairs_s),
        tokens_per_second=statistics.median(tokens_s),
        seconds_per_step=statistics.median(step_s),
        cpu_seconds_per_step=statistics.median(cpu_s),
        peak_step_mib=statistics.median(peaks) if peaks else None,
        absolute_peak_mib=statistics.median(r.absolute_peak_mib for r in results),
        rss_growth_mib=None
        if spec.device != "cpu"
        else statistics.median(r.absolute_peak_mib - r.rss_before_training_mib for r in results),
        first_loss=results[0].losses[0] if results[0].losses else float("nan"),
        last_loss=results[0].losses[-1] if results[0].losses else float("nan"),
        runs=len(results),
    )


def _median_step(ends: list[float], spec: Spec) -> float:
    timed = ends[spec.warmup - 1 : spec.warmup + spec.steps]
    return statistics.median(b - a for a, b in zip(timed, timed[1:], strict=False))


def check_same_work(by_label: dict[str, list[WorkerResult]]) -> None:
    """Every row must have seen the same token ids at every step, and trained the same number of parameters."""
    reference = next(iter(by_label.values()))[0]
    for tool, results in by_label.items():
        for result in results:
            if result.digests != reference.digests or result.tokens_per_step != reference.tokens_per_step:
                step = next(
                    (i for i, (a, b) in enumerate(zip(result.digests, reference.digests, strict=False)) if a != b), -1
                )
                raise SystemExit(f"{tool} and {reference.tool} saw different token ids (first at step {step + 1})")
            if result.trainable_params != reference.trainable_params:
                raise SystemExit(
                    f"{tool} trains {result.trainable_params:,} parameters, {reference.tool} "
                    f"{reference.trainable_params:,}: the adapters differ"
                )


def loss_disagreements(by_label: dict[str, list[WorkerResult]], rtol: float, later_rtol: float) -> list[str]:
    """One line per dpo-cli run whose step-1 loss is more than `rtol` (relative) from TRL's, or whose loss at a later
    step is more than `later_rtol` from TRL's at that step; [] without a TRL row.

    Step 1 alone proves little: LoRA's B starts at zero, so the policy equals the reference and the step-1 loss is
    log 2 for any pairs. From step 2 on the loss carries the updates, so it agrees only if both tools computed the
    same gradients and took the same AdamW steps; it is held to a looser bound because the tools' LoRA weights do
    not start bit for bit equal (TRL rounds them to bfloat16 on a quantized base; bench_train casts them back, the
    rounding stays) and float rounding compounds over the steps."""
    trl = by_label.get("trl")
    if not trl or not trl[0].losses:
        return []
    expected = trl[0].losses
    problems = []
    for label, results in by_label.items():
        for run, result in enumerate(results):
            if label == "trl":
                continue
            if len(result.losses) != len(expected):
                problems.append(f"{label} (run {run + 1}) logged {len(result.losses)} losses, TRL {len(expected)}")
                continue
            for step, (ours, theirs) in enumerate(zip(result.losses, expected, strict=True), start=1):
                gap = abs(ours - theirs) / max(abs(theirs), 1e-12)
                bound = rtol if step == 1 else later_rtol
                if not gap <= bound:  # also catches nan
                    problems.append(
                        f"{label} (run {run + 1}) step {step} loss {ours:.8g} vs TRL {theirs:.8g}, relative gap "
                        f"{gap:.2g} > {bound:g}"
                    )
                    break
    return problems


def max_loss_gaps(by_label: dict[str, list[WorkerResult]]) -> dict[str, tuple[float, float]]:
    """{dpo-cli label: (relative gap to TRL's step-1 loss, the largest relative gap at a later step)}, over its runs."""
    trl = by_label.get("trl")
    if not trl:
        return {}
    expected = trl[0].losses

    def gap(ours: float, theirs: float) -> float:
        return abs(ours - theirs) / max(abs(theirs), 1e-12)

    gaps = {}
    for label, results in by_label.items():
        if label == "trl":
            continue
        first = max(gap(r.losses[0], expected[0]) for r in results)
        later = [gap(a, b) for r in results for a, b in zip(r.losses[1:], expected[1:], strict=False)]
        gaps[label] = (first, max(later, default=0.0))
    return gaps


def row_name(label: str, summary: Summary) -> str:
    if summary.tool == "trl":
        return "TRL 1.16 DPOTrainer"
    requested = label.split(" ", 1)[1] if " " in label else ""
    if requested and requested != summary.layout:
        return f"dpo-cli {requested} (= {summary.layout})"
    default = " (default)" if summary.layout == summary.auto_layout else ""
    return f"dpo-cli {summary.layout}{default}"


def render(summaries: dict[str, Summary], device_type: str) -> str:
    """One row per dpo-cli layout and TRL's, then each dpo-cli row's ratios to TRL."""
    trl = summaries.get("trl")
    cpu = device_type == "cpu"
    header = ["tool", "pairs/s", "tokens/s", "s/step", "CPU s/step"]
    if cpu:
        header += ["peak step MiB (torch, profiled)", "RSS growth MiB", "max RSS MiB"]
    else:
        header += ["peak step MiB (above start)", "max allocated MiB"]
    header.append("loss step 1 → last")

    def mib(value, digits=0):
        return "-" if value is None else f"{value:,.{digits}f}"

    rows = []
    for label, s in summaries.items():
        row = [
            row_name(label, s),
            f"{s.pairs_per_second:.2f}",
            f"{s.tokens_per_second:,.0f}",
            f"{s.seconds_per_step:.3f}",
            f"{s.cpu_seconds_per_step:.3f}",
            mib(s.peak_step_mib, 1),
        ]
        row += [mib(s.rss_growth_mib)] if cpu else []
        rows.append([*row, mib(s.absolute_peak_mib), f"{s.first_loss:.4f} → {s.last_loss:.4f}"])

    def ratio(a, b):
        return "-" if a is None or b is None or not b else f"{a / b:.2f}x"

    for label, ours in summaries.items():
        if trl is None or ours.tool != "dpo-cli":
            continue
        row = [
            f"**{row_name(label, ours)} / TRL**",
            ratio(ours.pairs_per_second, trl.pairs_per_second),
            ratio(ours.tokens_per_second, trl.tokens_per_second),
            ratio(ours.seconds_per_step, trl.seconds_per_step),
            ratio(ours.cpu_seconds_per_step, trl.cpu_seconds_per_step),
            ratio(ours.peak_step_mib, trl.peak_step_mib),
        ]
        row += [ratio(ours.rss_growth_mib, trl.rss_growth_mib)] if cpu else []
        rows.append([*row, ratio(ours.absolute_peak_mib, trl.absolute_peak_mib), ""])
    return benchlib.format_table(header, rows)
