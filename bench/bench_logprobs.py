"""Micro-benchmark of completion log-probs through an LM head: forward + backward, time and peak memory.

Compares, on the same hidden states, LM-head weight and targets:
- `fused`: dpo-cli's `dpo_cli.dpo.logprobs.token_logps` (chunks of tokens, logits recomputed in backward);
- `full`: the plain way, `(N, V)` logits in the compute dtype, float32 log_softmax, gather;
- `trl`: TRL 1.16's `ChunkedLogProbFunction` with the outputs DPOTrainer asks of it (log-probs, entropy, mean
  logit, top-1), as its fused LM head runs it (when TRL is installed).
The weight is frozen as in LoRA training (`--weight-grad` to also differentiate it). Peak memory is the peak of torch
allocations above the inputs (see benchlib), so it is the cost of the log-prob computation itself.

Run:
    python bench/bench_logprobs.py                                   # CPU sizes, float32
    python bench/bench_logprobs.py --sizes 2048x128256x512 --write   # append the table to bench/RESULTS.md
    python bench/bench_logprobs.py --device cuda --sizes 2048x128256x4096,4096x128256x4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib  # noqa: E402

from dpo_cli.dpo.logprobs import DEFAULT_CHUNK_ELEMENTS, token_logps  # noqa: E402

CPU_SIZES = "2048x32000x1024,2048x128256x512,4096x128256x256"
CUDA_SIZES = "2048x128256x1024,2048x128256x4096,4096x128256x4096"
IMPLS = ("fused", "full", "trl")
# What DPOTrainer asks of TRL's fused LM head (trl/trainer/dpo_trainer.py, `add_fused_lm_head(..., outputs=...)`).
TRL_DPO_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


@dataclass
class Size:
    hidden: int
    vocab: int
    tokens: int

    @classmethod
    def parse(cls, text: str) -> Size:
        try:
            hidden, vocab, tokens = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: {text!r} is not HIDDENxVOCABxTOKENS, e.g. 2048x128256x1024") from None
        return cls(hidden, vocab, tokens)

    def __str__(self) -> str:
        return f"H={self.hidden} V={self.vocab} N={self.tokens}"


def full_logps(hidden, weight, targets):
    logits = hidden @ weight.t()  # (N, V) in the compute dtype, as the model's own LM head gives them
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def trl_logps(hidden, weight, targets):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    outputs = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, TRL_DPO_OUTPUTS
    )
    return outputs[0]


def implementation(name: str, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    if name == "fused":
        return lambda h, w, t: token_logps(h, w, t, chunk_elements=chunk_elements)
    if name == "full":
        return full_logps
    if name == "trl":
        return trl_logps
    raise SystemExit(f"--impls: unknown {name!r}; choose from {', '.join(IMPLS)}")


def trl_available() -> bool:
    try:
        import trl.kernels.chunked_logprob  # noqa: F401
    except ImportError:
        return False
    return True


def make_inputs(size: Size, dtype: torch.dtype, device: torch.device, weight_grad: bool, seed: int = 0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Scales like a trained model's: hidden states of norm ~sqrt(H), weights ~1/sqrt(H), logits of order 1-10.
    hidden = torch.randn(size.tokens, size.hidden, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(size.vocab, size.hidden, generator=generator) / size.hidden**0.5).to(device, dtype)
    weight.requires_grad_(weight_grad)
    targets = torch.randint(0, size.vocab, (size.tokens,), generator=generator).to(device)
    # Non-uniform upstream gradient, as DPO's per-completion weights are.
    grad_out = torch.rand(size.tokens, generator=generator).to(device)
    return hidden, weight, targets, grad_out


def run_once(fn, hidden, weight, targets, grad_out):
    hidden.grad = None
    weight.grad = None
    logps = fn(hidden, weight, targets)
    logps.backward(grad_out)
    return logps.detach()


@dataclass
class Measurement:
    size: str
    impl: str
    seconds: float  # median forward+backward
    peak_mib: float | None
    tokens_per_second: float
    max_abs_diff_logps: float  # against `full`, the reference numbers (nan when `full` is skipped)
    max_abs_diff_grad: float


def bench_size(size: Size, impls, dtype, device, repeats, warmup, weight_grad, chunk_elements) -> list[Measurement]:
    hidden, weight, targets, grad_out = make_inputs(size, dtype, device, weight_grad)
    results = []
    reference = None
    for name in sorted(impls, key=lambda n: n != "full"):  # `full` first: the others are compared to it
        fn = implementation(name, chunk_elements)
        for _ in range(warmup):
            run_once(fn, hidden, weight, targets, grad_out)
        times = []
        for _ in range(repeats):
            benchlib.sync(device)
            start = time.perf_counter()
            logps = run_once(fn, hidden, weight, targets, grad_out)
            benchlib.sync(device)
            times.append(time.perf_counter() - start)
        with benchlib.PeakMemory(device) as memory:
            logps = run_once(fn, hidden, weight, targets, grad_out)
        grad = hidden.grad.detach().float().clone()
        if name == "full":
            reference = (logps.float(), grad)
        diff_logps = diff_grad = float("nan")
        if reference is not None:
            diff_logps = float((logps.float() - reference[0]).abs().max())
            diff_grad = float((grad - reference[1]).abs().max())
        seconds = statistics.median(times)
        results.append(
            Measurement(str(size), name, seconds, memory.peak_mib, size.tokens / seconds, diff_logps, diff_grad)
        )
        print(
            f"  {size}  {name:5s}  {seconds * 1e3:9.1f} ms  peak {memory.peak_mib or float('nan'):9.1f} MiB", flush=True
        )
    return results


def table(results: list[Measurement]) -> str:
    header = [
        "size (hidden x vocab x tokens)",
        "impl",
        "fwd+bwd ms",
        "tokens/s",
        "peak MiB",
        "time / full",
        "peak / full",
        "max abs Δ logp",
    ]
    rows = []
    for m in results:
        full = next((r for r in results if r.size == m.size and r.impl == "full"), None)
        time_ratio = f"{m.seconds / full.seconds:.2f}" if full else "-"
        mem_ratio = f"{m.peak_mib / full.peak_mib:.3f}" if full and m.peak_mib and full.peak_mib else "-"
        rows.append(
            [
                m.size,
                m.impl,
                f"{m.seconds * 1e3:.1f}",
                f"{m.tokens_per_second:,.0f}",
                "-" if m.peak_mib is None else f"{m.peak_mib:,.1f}",
                time_ratio,
                mem_ratio,
                "-" if m.impl == "full" else f"{m.max_abs_diff_logps:.1e}",
            ]
        )
    return benchlib.format_table(header, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    parser.add_argument("--sizes", default=None, help=f"HxVxN,... (default CPU {CPU_SIZES}; CUDA {CUDA_SIZES})")
    parser.add_argument("--impls", default=",".join(IMPLS), help="which of fused,full,trl to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--weight-grad", action="store_true", help="also differentiate the LM-head weight")
    parser.add_argument(
        "--chunk-elements",
        type=int,
        default=DEFAULT_CHUNK_ELEMENTS,
        help=f"fused: elements of one (chunk, vocab) logits block (default dpo-cli's {DEFAULT_CHUNK_ELEMENTS})",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the measurements as JSON here")
    parser.add_argument(
        "--write",
        nargs="?",
        const=benchlib.RESULTS,
        type=Path,
        help="append the table to the 'Fused log-probs' section of a markdown file (default bench/RESULTS.md)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = benchlib.resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    sizes = [Size.parse(s) for s in (args.sizes or (CUDA_SIZES if device.type == "cuda" else CPU_SIZES)).split(",")]
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    for name in impls:
        implementation(name)
    if "trl" in impls and not trl_available():
        print("TRL is not installed: skipping the 'trl' implementation", file=sys.stderr)
        impls.remove("trl")

    machine = benchlib.machine_description(device, args.threads)
    version = benchlib.code_version(Path(__file__).resolve().parent.parent)
    print(
        f"fused log-probs benchmark on {device.type}: {machine}; {version}; dtype {str(dtype).removeprefix('torch.')}"
    )
    results: list[Measurement] = []
    load = [os.getloadavg()[0]]
    for size in sizes:
        results.extend(
            bench_size(size, impls, dtype, device, args.repeats, args.warmup, args.weight_grad, args.chunk_elements)
        )
    load.append(os.getloadavg()[0])
    rendered = table(results)
    print()
    print(rendered)

    if args.json:
        args.json.write_text(json.dumps([asdict(m) for m in results], indent=1))
    if args.write:
        described = f"{machine}; {benchlib.library_versions()}; 1-min load average {min(load):.1f}-{max(load):.1f}"
        _write_block(args, argv, device, dtype, f"Machine: {described}. Code: {version}. ", rendered)


def _write_block(args, argv, device, dtype, machine_and_code: str, rendered: str) -> None:
    """Appends the table and how it was measured to the 'Fused log-probs' section of `--write`'s file."""
    grads = "hidden and LM-head weight" if args.weight_grad else "hidden states only (frozen LM head, as in LoRA)"
    command = benchlib.command_line("bench/bench_logprobs.py", sys.argv[1:] if argv is None else argv)
    block = (
        f"### {benchlib.today()}: `{command}`\n\n"
        f"{machine_and_code}"
        f"dtype {str(dtype).removeprefix('torch.')}; gradients w.r.t. {grads}; "
        f"median of {args.repeats} forward+backward runs after {args.warmup} warmup; peak = torch allocations "
        "above the inputs during one run. `time / full` and `peak / full` are ratios to the plain "
        "logits + log_softmax + gather path (lower is better).\n\n"
        f"{rendered}\n"
    )
    section = f"Fused log-probs ({'CUDA' if device.type == 'cuda' else 'CPU'})"
    benchlib.write_section_block(args.write, section, block)
    print(f"\nappended to section '{section}' of {args.write}")


if __name__ == "__main__":
    main()
