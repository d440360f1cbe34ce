"""The run report: a DPO (or SFT) run's curves in one figure, and a short summary of how it went.

`dpo-cli train` draws `report.png` into its output folder at every checkpoint and at the end; `dpo-cli report`
draws the same figure for any run folder, finished or still running, or overlays several runs (one colour each,
named by folder). Everything is read back from the folder (`metrics.jsonl`, `recipe.yaml`), so the figure of a run
is the same whoever draws it. Matplotlib is imported only when a figure is drawn, and without pyplot (no display,
no process-wide backend), so the other commands start as fast as without it.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from dpo_cli.errors import UserError
from dpo_cli.files import write_bytes_atomic
from dpo_cli.run.run_folder import EVAL, METRICS_FILE, TRAIN, RunFolder, read_run, read_runs

REPORT_FILE = "report.png"
FORMATS = (".png", ".svg", ".pdf")
METADATA_KEY = "dpo-cli report"  # PNG text chunk: the panels and the metrics drawn in each, as JSON
REPORT_CREATOR = "dpo-cli report"  # SVG and PDF: the Creator of the document
MARKER_BYTES = 1 << 16
"""Where a report's marker is looked for: the PNG text chunk and the SVG metadata come first, the PDF's
document information last."""
FIGURE_INCHES, DPI = (16.0, 8.0), 100


@dataclass(frozen=True)
class Series:
    metric: str
    """TRL's name in metrics.jsonl; its eval curve is `eval_` + this."""
    label: str
    per_beta: bool = False
    """Drawn divided by β: the implicit reward β·log(πθ/πref) becomes the log-ratio itself."""


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]
    has_eval: bool = True


CHOSEN_REJECTED = (Series("rewards/chosen", "chosen"), Series("rewards/rejected", "rejected"))
DRIFT = tuple(Series(s.metric, s.label, per_beta=True) for s in CHOSEN_REJECTED)
PANELS = (
    Panel("loss", "loss", (Series("loss", "loss"),)),
    Panel("reward accuracy", "rewards/accuracies", (Series("rewards/accuracies", "accuracy"),)),
    Panel("reward margin", "rewards/margins", (Series("rewards/margins", "margin"),)),
    Panel("chosen and rejected rewards", "β·log(πθ/πref)", CHOSEN_REJECTED),
    Panel("drift from the reference", "mean log πθ − log πref (nats)", DRIFT),
    Panel("learning rate", "learning_rate", (Series("learning_rate", "learning rate"),), has_eval=False),
    Panel("grad norm", "grad_norm (before clipping)", (Series("grad_norm", "grad norm"),), has_eval=False),
    Panel("throughput", "tokens/s", (Series("tokens_per_second", "tokens/s"),), has_eval=False),
)
SFT_PANELS = (
    Panel("loss", "loss (mean NLL per trained token)", (Series("loss", "loss"),)),
    Panel("token accuracy", "mean_token_accuracy", (Series("mean_token_accuracy", "accuracy"),)),
    Panel("eval perplexity", "exp(eval loss)", (Series("perplexity", "perplexity"),)),
    *PANELS[-3:],  # learning rate, grad norm, throughput: the same in every run
)
"""The panels of an SFT run (`dpo-cli sft`): it has no rewards, no reference and so no drift."""
SUMMARY_COLUMNS = ("num_tokens", "time")
COLUMNS = tuple(
    dict.fromkeys(
        [s.metric for panel in (*PANELS, *SFT_PANELS) for s in panel.series]
        + [f"eval_{s.metric}" for panel in (*PANELS, *SFT_PANELS) if panel.has_eval for s in panel.series]
        + list(SUMMARY_COLUMNS)
    )
)
"""The metrics.jsonl columns a report reads; the rest of each record is not kept."""
SERIES_COLOURS = ("tab:blue", "tab:red")  # within one run: first and second series of a panel
CHOSEN_COLOURS = {"chosen": "tab:green", "rejected": "tab:red"}
SERIES_STYLES = ("-", "--")  # in an overlay the colour is the run's, so a panel's series differ by line style
EVAL_MARKERS = ("o", "s")  # eval points: dotted, one marker shape per series of the panel


@dataclass
class ReportFigure:
    """What was drawn where: the file, its size in pixels, the runs, and per panel the metric names drawn."""

    path: Path
    size: tuple[int, int]
    runs: list[str]
    panels: list[dict]

    def metadata(self) -> dict:
        return {"runs": self.runs, "panels": self.panels}


# Drawing ------------------------------------------------------------------------------------------------------------


def _line_style(runs: list[RunFolder], run_index: int, series_index: int, series: Series) -> dict:
    marker = EVAL_MARKERS[series_index % len(EVAL_MARKERS)]
    if len(runs) > 1:
        linestyle = SERIES_STYLES[series_index % len(SERIES_STYLES)]
        return {"color": f"C{run_index % 10}", "linestyle": linestyle, "marker": marker}
    colour = CHOSEN_COLOURS.get(series.label, SERIES_COLOURS[series_index % len(SERIES_COLOURS)])
    return {"color": colour, "linestyle": "-", "marker": marker}


def _draw_series(ax, run: RunFolder, series: Series, style: dict, with_eval: bool, solo: bool) -> list[str]:
    """Draw one series of one run (train line, eval points); the metric names drawn."""
    scale = 1.0 / run.beta if series.per_beta else 1.0
    style = dict(style)
    marker = style.pop("marker")
    drawn = []
    steps, values = _thinned(*run.points(series.metric, scale))
    if len(steps):
        ax.plot(steps, values, linewidth=1.3, label=series.label if solo else None, **style)
        drawn.append(series.metric)
    eval_metric = f"eval_{series.metric}"
    steps, values = _thinned(*run.points(eval_metric, scale))
    if with_eval and len(steps):
        label = f"eval {series.label}" if solo else None
        eval_style = {**style, "linestyle": ":", "marker": marker, "markersize": 4, "linewidth": 1}
        ax.plot(steps, values, label=label, **eval_style)
        drawn.append(eval_metric)
    return drawn


MAX_DRAWN_POINTS = 4000
"""Per curve: a panel is a few hundred pixels wide, and matplotlib's memory grows with the points (80,000 steps in
16 curves took 130 MB to draw)."""


def _thinned(steps, values, limit: int = MAX_DRAWN_POINTS):
    """At most `limit` points of a curve, keeping each of limit/2 equal slices' lowest and highest point (in step
    order), so spikes are drawn as they are; shorter curves are drawn whole."""
    import numpy as np

    if len(steps) <= limit:
        return steps, values
    steps, values = np.asarray(steps), np.asarray(values)
    edges = np.linspace(0, len(values), limit // 2 + 1).astype(int)
    keep = []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        part = values[start:end]
        keep += sorted({start + int(part.argmin()), start + int(part.argmax())})
    return steps[keep], values[keep]


def _style_legend(ax, panel: Panel, with_eval: bool) -> None:
    """In an overlay the colours are runs (the figure legend); here the line styles say which series is which."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="0.35", linestyle=SERIES_STYLES[i % len(SERIES_STYLES)], label=series.label)
        for i, series in enumerate(panel.series)
    ]
    if with_eval:
        handles += [
            Line2D(
                [],
                [],
                color="0.35",
                linestyle=":",
                marker=EVAL_MARKERS[i % len(EVAL_MARKERS)],
                markersize=4,
                label=f"eval {series.label}" if len(panel.series) > 1 else "eval",
            )
            for i, series in enumerate(panel.series)
        ]
    if len(handles) > 1:
        ax.legend(handles=handles, fontsize=8)


def _draw_panel(ax, panel: Panel, runs: list[RunFolder]) -> dict:
    from matplotlib.ticker import MaxNLocator

    solo = len(runs) == 1
    metrics: list[str] = []
    skipped = [run.name for run in runs if panel.series[0].per_beta and run.beta is None]
    for run_index, run in enumerate(runs):
        if run.name in skipped:
            continue
        for series_index, series in enumerate(panel.series):
            style = _line_style(runs, run_index, series_index, series)
            drawn = _draw_series(ax, run, series, style, panel.has_eval, solo)
            metrics += [name for name in drawn if name not in metrics]
    ax.set_title(panel.title + (" (rewards / β)" if panel.series[0].per_beta else ""), fontsize=11)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if skipped:  # SimPO's rewards are not log-ratios against a reference: there is no drift to draw
        ax.text(0.5, 0.5, "no reference model\n(dpo.reference_free)", ha="center", va="center", transform=ax.transAxes)
    with_eval = any(name.startswith("eval_") for name in metrics)
    if solo and len(ax.get_lines()) > 1:
        ax.legend(fontsize=8)
    elif not solo:
        _style_legend(ax, panel, with_eval)
    return {"title": panel.title, "metrics": metrics, "per_beta": panel.series[0].per_beta}


def is_sft(run: RunFolder) -> bool:
    return (run.recipe.get("training") or {}).get("objective") == "sft"


def panels_for(runs: list[RunFolder]) -> tuple[Panel, ...]:
    """SFT's panels when every run is an SFT run, else DPO's (an overlay of both draws what DPO runs have)."""
    return SFT_PANELS if all(is_sft(run) for run in runs) else PANELS


def _title(runs: list[RunFolder]) -> str:
    if len(runs) > 1:
        return " vs ".join(run.name for run in runs)
    run = runs[0]
    model_path = (run.recipe.get("model") or {}).get("path")
    model = Path(model_path).name if isinstance(model_path, str) and model_path else "?"
    steps = max(run.steps[row] for row in run.rows(TRAIN))
    if is_sft(run):
        trained = "every token" if (run.recipe.get("sft") or {}).get("loss_on_prompt") is True else "the completions"
        return f"{run.name}: {model[:80]}, SFT on {trained}, {steps} steps"
    loss_types = (run.recipe.get("dpo") or {}).get("loss_type") or ["sigmoid"]
    loss_types = [loss_types] if isinstance(loss_types, str) else loss_types
    loss = "+".join(name for name in loss_types if isinstance(name, str)) if isinstance(loss_types, list) else "?"
    beta = "none" if run.beta is None else f"{run.beta:g}"
    return f"{run.name}: {model[:80]}, {loss[:80] or '?'} loss, β {beta}, {steps} steps"


def output_format(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: a report is drawn as {', '.join(FORMATS)}; give --output a name ending in one")
    return suffix[1:]


def draw_report(runs: list[RunFolder], path: Path) -> ReportFigure:
    """Draw every panel for `runs` (one colour per run when several) into `path` (.png, .svg or .pdf), atomically."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    file_format = output_format(path)
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    chosen = panels_for(runs)
    axes = figure.subplots(2, math.ceil(len(chosen) / 2)).ravel()
    panels = [_draw_panel(ax, panel, runs) for ax, panel in zip(axes, chosen, strict=True)]
    figure.suptitle(_title(runs), fontsize=13)
    if len(runs) > 1:
        handles = [Line2D([], [], color=f"C{i % 10}", linewidth=2, label=run.name) for i, run in enumerate(runs)]
        figure.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 6))
    names = [run.name for run in runs]
    result = ReportFigure(Path(path), (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI)), names, panels)
    if file_format == "png":
        data = _palette_png(figure, {"Title": _title(runs), METADATA_KEY: json.dumps(result.metadata())})
    else:
        buffer = io.BytesIO()
        metadata = {"Title": _title(runs), "Creator": REPORT_CREATOR}
        figure.savefig(buffer, format=file_format, dpi=DPI, metadata=metadata)
        data = buffer.getvalue()
    write_bytes_atomic(Path(path), data)
    return result


def _palette_png(figure, text: dict[str, str]) -> bytes:
    """The figure as a 256-colour PNG with `text` chunks: curves on white need few colours, and the file is a third
    of the full-colour one's size (260 kB -> 95 kB for the demo's), which matters for the copy the README shows."""
    from PIL import Image, PngImagePlugin

    rendered = io.BytesIO()
    figure.savefig(rendered, format="png", dpi=DPI)
    rendered.seek(0)
    with Image.open(rendered) as image:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    packed = io.BytesIO()
    palette.save(packed, format="png", pnginfo=info, optimize=True)
    return packed.getvalue()


def write_run_report(folder: Path) -> ReportFigure:
    """`report.png` of one run folder from what it holds now (train calls this at checkpoints and at the end)."""
    return draw_report([read_run(folder, columns=COLUMNS)], Path(folder) / REPORT_FILE)


# The summary --------------------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    name: str
    steps: int
    final: dict[str, float]
    """The last training step's loss and reward accuracy."""
    final_eval: dict[str, float] | None
    """The last evaluation's metrics (without the eval_ prefix); None without eval data."""
    best_eval_loss: tuple[float, int] | None
    """(value, step) of the lowest eval loss."""
    best_eval_accuracy: tuple[float, int] | None
    tokens_per_second: float
    """Tokens over the time spent in training steps (evaluation and checkpoints left out)."""
    wall_seconds: float
    """From the start of the first step to the last record, when records carry `time`; else the steps' time."""
    accuracy_key: str = "rewards/accuracies"
    """The accuracy `final` holds: rewards/accuracies (DPO) or mean_token_accuracy (SFT)."""


def _step_seconds(run: RunFolder, train_rows: list[int]) -> list[float]:
    """Each step's duration: its tokens over its tokens/s (num_tokens is the running total; missing counts 0)."""
    seconds, previous = [], 0.0
    for row in train_rows:
        total = _or_zero(run.value("num_tokens", row))
        rate = _or_zero(run.value("tokens_per_second", row))
        seconds.append((total - previous) / rate if rate > 0 else 0.0)
        previous = total
    return seconds


def _or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _best(run: RunFolder, metric: str, lowest: bool) -> tuple[float, int] | None:
    steps, values = run.points(metric)
    pairs = [(v, s) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if not pairs:
        return None
    return min(pairs) if lowest else max(pairs, key=lambda pair: (pair[0], -pair[1]))


def _accuracy_key(run: RunFolder) -> str:
    """The accuracy a run reports: the share of pairs ranked right (DPO), or of tokens predicted right (SFT)."""
    return "mean_token_accuracy" if is_sft(run) else "rewards/accuracies"


def summarize(run: RunFolder) -> RunSummary:
    train_rows, eval_rows = run.rows(TRAIN), run.rows(EVAL)
    last = train_rows[-1]
    final_eval = None
    if eval_rows:
        last_eval = eval_rows[-1]
        values = {name[len("eval_") :]: run.value(name, last_eval) for name in run.columns if name.startswith("eval_")}
        final_eval = {name: value for name, value in values.items() if math.isfinite(value)}
    seconds = _step_seconds(run, train_rows)
    times = run.columns.get("time")
    timed = times is not None and all(math.isfinite(t) for t in times)
    wall = (max(times) - min(times) + seconds[0]) if timed else sum(seconds)
    total_tokens = _or_zero(run.value("num_tokens", last))
    return RunSummary(
        name=run.name,
        steps=run.steps[last],
        final={"loss": run.value("loss", last), _accuracy_key(run): run.value(_accuracy_key(run), last)},
        final_eval=final_eval,
        best_eval_loss=_best(run, "eval_loss", lowest=True),
        best_eval_accuracy=_best(run, f"eval_{_accuracy_key(run)}", lowest=False),
        tokens_per_second=total_tokens / sum(seconds) if sum(seconds) > 0 else math.nan,
        wall_seconds=wall,
        accuracy_key=_accuracy_key(run),
    )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"  # NaN: the record had no usable value


def _at(best: tuple[float, int] | None, digits: int) -> str:
    return f"{best[0]:.{digits}f} (step {best[1]})" if best else "-"


def summary_rows(summaries: list[RunSummary]) -> list[tuple[str, list[str]]]:
    """The summary table as text, one row per measure with one cell per run (runs side by side read best)."""

    def final_eval(s: RunSummary, key: str, digits: int) -> str:
        value = (s.final_eval or {}).get(key)
        return f"{value:.{digits}f}" if value is not None else "-"

    keys = {s.accuracy_key for s in summaries}
    accuracy = "reward accuracy" if keys == {"rewards/accuracies"} else "token accuracy"
    accuracy = "accuracy" if len(keys) > 1 else accuracy
    rows = [
        ("steps", [str(s.steps) for s in summaries]),
        ("loss (last step)", [_number(s.final["loss"], 4) for s in summaries]),
        (f"{accuracy} (last step)", [_number(s.final[s.accuracy_key], 3) for s in summaries]),
        ("eval loss (final)", [final_eval(s, "loss", 4) for s in summaries]),
        (f"eval {accuracy} (final)", [final_eval(s, s.accuracy_key, 3) for s in summaries]),
        ("eval reward margin (final)", [final_eval(s, "rewards/margins", 4) for s in summaries]),
        ("eval perplexity (final)", [final_eval(s, "perplexity", 3) for s in summaries]),
        ("best eval loss", [_at(s.best_eval_loss, 4) for s in summaries]),
        (f"best eval {accuracy}", [_at(s.best_eval_accuracy, 3) for s in summaries]),
        ("tokens/s", [f"{s.tokens_per_second:,.0f}" if math.isfinite(s.tokens_per_second) else "-" for s in summaries]),
        ("wall time", [_duration(s.wall_seconds) for s in summaries]),
    ]
    # a row no run has a value for (perplexity in DPO runs, reward margins in SFT runs) is left out
    return [(label, cells) for label, cells in rows if label not in _EVAL_ONLY or any(c != "-" for c in cells)]


_EVAL_ONLY = ("eval reward margin (final)", "eval perplexity (final)")


def print_summary(summaries: list[RunSummary], console) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("")
    for summary in summaries:
        table.add_column(Text(summary.name), justify="right")  # a folder's name, not markup
    for label, cells in summary_rows(summaries):
        table.add_row(label, *cells)
    console.print(table)


def is_report_file(path: Path) -> bool:
    """Whether `path` is a figure dpo-cli drew (its marker: a PNG text chunk, the SVG's or PDF's creator), read
    from its first and last bytes only."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(MARKER_BYTES)
            handle.seek(max(0, handle.seek(0, 2) - MARKER_BYTES))
            tail = handle.read(MARKER_BYTES)
    except OSError:
        return False
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"tEXt" + METADATA_KEY.encode() + b"\x00" in head
    if head.startswith(b"%PDF"):
        return f"/Creator ({REPORT_CREATOR})".encode() in tail
    creator = rb"<dc:creator>\s*<cc:Agent>\s*<dc:title>" + re.escape(REPORT_CREATOR.encode()) + rb"</dc:title>"
    return head.lstrip().startswith(b"<?xml") and re.search(creator, head) is not None


def check_output(path: Path, force: bool = False) -> None:
    """Refuse to replace a file that is not a dpo-cli report (unless `force`). A symlink is fine: the new file is
    renamed over the link, and whatever it points to is never written."""
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give --output a file name ending in {', '.join(FORMATS)}")
    if not force and not path.is_file():  # a pipe or a device: reading it for the marker could block
        raise UserError(f"{path}: exists and is not a regular file; give --output another name")
    if not force and not is_report_file(path):
        raise UserError(
            f"{path}: exists and is not a report drawn by dpo-cli; give --output another name, or add --force to "
            "replace it"
        )


@dataclass
class ReportResult:
    figure: ReportFigure
    summaries: list[RunSummary]
    notes: list[str]
    """One line per run folder whose metrics held values that are not finite numbers within ±1e18 (not drawn)."""


def report_runs(folders: list[Path], output: Path, force: bool = False) -> ReportResult:
    """`dpo-cli report`: read the runs, draw them into `output`, summarize each."""
    output_format(output)  # a wrong name or a file not ours fails before any reading
    check_output(output, force)
    runs = read_runs(folders, COLUMNS)
    notes = [
        f"{run.folder / METRICS_FILE}: {run.unusable:,} value{'s' if run.unusable > 1 else ''} not drawn, not a "
        f"finite number within ±1e18 (the first: {run.first_unusable})"
        for run in runs
        if run.unusable
    ]
    return ReportResult(draw_report(runs, output), [summarize(run) for run in runs], notes)
