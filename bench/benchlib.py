"""Helpers shared by the benchmark scripts: device sync, peak memory, versions, and writing into RESULTS.md.

Peak memory is measured the same way for every tool, as torch allocations above what was live when the measured
region started:
- CUDA: `torch.cuda.max_memory_allocated()` minus `memory_allocated()` at the start (peak stats reset there);
- CPU: torch has no CPU allocator statistics, and RSS hides frees behind malloc's caching, so the region runs once
  under `torch.profiler` with `profile_memory=True` and the peak of the allocator's running total
  (`total_allocated` of each allocation event) is read back. That is exact for torch tensors, blind to non-torch
  memory, and slow, so it is a separate pass: timings are never taken under the profiler.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import time
from pathlib import Path

import torch

MIB = 2**20
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class PeakMemory:
    """Peak bytes of torch allocations above the level at `__enter__`; `.peak` is set on exit (None if unknown)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None
        self._profiler = None
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._profiler.__exit__(*exc)
        if exc[0] is None:
            self.peak = _profiled_cpu_peak(self._profiler)

    def op_table(self, rows: int = 40) -> str | None:
        """CPU: the profiled region's operators by self CPU time (None on CUDA, where no profiler runs)."""
        if self._profiler is None:
            return None
        return self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)

    @property
    def peak_mib(self) -> float | None:
        return None if self.peak is None else self.peak / MIB


def _profiled_cpu_peak(prof) -> int:
    """Peak of the CPU allocator's running total (bytes allocated since the profiler started) over the region."""
    from torch._C._profiler import _EventType

    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            peak = max(peak, event.extra_fields.total_allocated)
    return peak


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * resource.getpagesize() / MIB


def machine_description(device: torch.device, threads: int = 0) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        return f"{name} ({total:.0f} GiB), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    threads = threads or torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s), torch {torch.__version__}"


def library_versions() -> str:
    import importlib.metadata as metadata

    names = ("transformers", "peft", "bitsandbytes", "trl")
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table, columns padded so it also reads well in a terminal."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def write_section_block(path: Path, section: str, block: str) -> None:
    """Append `block` at the end of the `## {section}` section of the markdown file `path`, creating it if absent.

    Only that section changes: other people's sections before and after it are left byte for byte as they were.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    header = f"## {section}"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == header), None)
    block = block.strip("\n") + "\n"
    if start is None:
        text = text.rstrip("\n") + f"\n\n{header}\n\n{block}"
    else:
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^## ", lines[i])), len(lines))
        before = "".join(lines[:end]).rstrip("\n")
        after = "".join(lines[end:])
        text = f"{before}\n\n{block}" + (f"\n{after}" if after else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def command_line(script: str, argv: list[str]) -> str:
    """How a run was started, for the results file; the `--write [PATH]` option itself is left out."""
    kept = []
    args = iter(enumerate(argv))
    for i, arg in args:
        if arg == "--write" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            next(args)  # its PATH
        elif not arg.startswith("--write"):
            kept.append(arg)
    return " ".join(["python", script, *kept])


def code_version(repo: Path) -> str:
    """The dpo-cli commit benchmarked, and whether dpo_cli/ had uncommitted changes."""
    import subprocess

    def git(*args):
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "dpo-cli (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "dpo_cli")
    return f"dpo-cli {commit}" + (" with uncommitted changes in dpo_cli/" if dirty else "")
