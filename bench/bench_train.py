"""Training-step benchmark: dpo-cli's Trainer against TRL 1.16's DPOTrainer, same model, data and settings.

Each tool runs in its own subprocess (clean memory numbers, no shared caches): it loads the same base model the same
way (`dpo_cli.model.load.load_base_model`, 4-bit NF4 by default), adds the same LoRA adapter (`lora_config`), reads the
same preference file in the same order (a seeded shuffle written once by the parent, read sequentially by both), and
runs `--warmup` + `--steps` optimizer steps with the same batch size, max_length, learning rate, beta, constant
schedule, grad clipping and gradient checkpointing setting. dpo-cli is driven through `Trainer.train_step()`, TRL
through `DPOTrainer.train()` with a callback that stamps the end of each optimizer step, so both times include
collation, reference and policy passes, backward, clipping and the optimizer. Throughput is measured from the end of
the last warmup step to the end of the last timed step.

Tokens are counted the same way for both: the non-padding tokens of the concatenated chosen + rejected rows of each
step. The parent checks that both tools saw exactly the same token ids at every step and stops if not.

Peak memory (see benchlib): on CUDA, the peak of torch allocations above the level at the start of the timed steps;
on CPU, the peak of torch CPU allocations during one extra step run under the profiler (after timing), plus the
worker's peak RSS for reference (it includes each library's import cost, which differs between the tools).

Run:
    make bench                                              # stories260K 4-bit, stories-happy pairs, CPU
    python bench/bench_train.py --model tiny --data tiny    # the built-in tiny model, no ../shared needed
    python bench/bench_train.py --model synthetic --data hh-synthetic --max-length 512 --batch-size 2
    python bench/bench_train.py --write                     # also append the table to bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import benchlib  # noqa: E402

SHARED = Path(os.environ.get("DPO_CLI_SHARED", REPO.parent / "shared"))
STORIES_MODEL = SHARED / "models" / "stories260K"
STORIES_DATA = SHARED / "data" / "stories-happy" / "train.jsonl"
TOOLS = ("dpo-cli", "trl")


# Settings ----------------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """Everything a worker needs; written as JSON by the parent, so both tools read the very same settings."""

    model_path: str
    data_path: str
    device: str
    quantize: bool
    compute_dtype: str
    gradient_checkpointing: bool
    batch_size: int
    max_length: int
    lora_r: int
    lora_alpha: int
    lr: float
    beta: float
    warmup: int
    steps: int
    seed: int
    trl_lora_fp32: bool
    threads: int
    output_dir: str
    profile_path: str = ""  # CPU: write the profiled step's operator table here

    @property
    def total_steps(self) -> int:
        # CPU: one more step after the timed ones, run under the profiler for the memory figure.
        return self.warmup + self.steps + (1 if self.device == "cpu" else 0)


@dataclass
class WorkerResult:
    tool: str
    step_ends: list[float]  # perf_counter at the end of each optimizer step
    cpu_ends: list[float]  # process_time (CPU seconds of all the worker's threads) at the same moments
    load_average: list[float]  # 1-minute load average of the machine before and after the steps
    tokens_per_step: list[int]
    pairs_per_step: list[int]
    digests: list[str]  # of the token ids each step saw, to check both tools did the same work
    losses: list[float]
    trainable_params: int
    peak_step_mib: float | None
    absolute_peak_mib: float  # CUDA: max_memory_allocated; CPU: peak RSS of the worker
    rss_before_training_mib: float  # RSS once the model, adapter and data are loaded, before the first step
    setup_seconds: float
    notes: list[str] = field(default_factory=list)


# Data and models -----------------------------------------------------------------------------------------------------

WORDS = (
    "the a to and of you I it is that for in on with can be have this my your do not are what how about would "
    "like there if some just so they was more time when one people make could will get help need know think want "
    "good use work way also other first new find try look any well because should here only many thing which "
    "really sure question answer example recipe garden water money travel history music computer language city "
    "family friend problem reason idea company health doctor school children book story car house food weather"
).split()


def _sentence_text(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(6, 18))
        sentence = [rng.choice(WORDS) for _ in range(n)]
        sentence[0] = sentence[0].capitalize()
        out.append(" ".join(sentence) + rng.choice(".?!."))
        left -= n
    return " ".join(out)


def hh_synthetic_pairs(count: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """HH-RLHF-shaped pairs: a multi-turn `\\n\\nHuman: ... \\n\\nAssistant:` prompt and two long replies.

    Lengths are drawn in words relative to `max_length` so that, with the BPE tokenizer `--model synthetic` trains on
    this text, rows spread from 40% of `max_length` to past it (mean about 80%, a third of the completions cut), as
    real dialogue data does.
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt_words = rng.randint(max_length // 16, max_length // 8)
        turns = rng.randint(1, 3) if prompt_words >= 48 else 1
        prompt = ""
        for turn in range(turns):
            prompt += "\n\nHuman: " + _sentence_text(rng, max(2, prompt_words // (2 * turns)))
            if turn < turns - 1:
                prompt += "\n\nAssistant: " + _sentence_text(rng, max(2, prompt_words // (2 * turns)))
        prompt += "\n\nAssistant:"
        chosen = " " + _sentence_text(rng, rng.randint(max_length // 8, 2 * max_length // 5))
        rejected = " " + _sentence_text(rng, rng.randint(max_length // 8, 2 * max_length // 5))
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def source_records(args, workdir: Path) -> tuple[list[dict], str]:
    if args.data == "stories":
        if not STORIES_DATA.exists():
            raise SystemExit(f"--data stories needs {STORIES_DATA} (the ../shared material); use --data tiny instead")
        return read_records(STORIES_DATA), f"stories-happy train ({STORIES_DATA})"
    if args.data == "tiny":
        from dpo_cli.demo.tiny import make_pairs

        return make_pairs(400, seed=1), "dpo_cli.demo.tiny pairs (400)"
    if args.data == "hh-synthetic":
        return hh_synthetic_pairs(400, args.max_length, args.seed), "hh-synthetic (400 generated multi-turn pairs)"
    path = Path(args.data)
    if not path.is_file():
        raise SystemExit(f"--data {args.data}: not stories, tiny, hh-synthetic or a .jsonl file")
    return read_records(path), str(path)


def drop_long_prompts(records: list[dict], model_path: str, max_length: int) -> tuple[list[dict], int]:
    """The pairs whose prompt leaves room for a completion: TRL drops the others, and dpo-cli drops or refuses them."""
    from dpo_cli.model.load import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    kept = [r for r in records if len(tokenizer(r["prompt"])["input_ids"]) < max_length - 1]
    if not kept:
        raise SystemExit(f"every prompt fills --max-length {max_length}; raise it")
    return kept, len(records) - len(kept)


def ordered_data(records: list[dict], pairs_needed: int, seed: int, path: Path) -> Path:
    """The pairs both tools read front to back: a seeded shuffle, cycled until there are enough."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    rows = [records[order[i % len(order)]] for i in range(max(pairs_needed, len(order)))]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def synthetic_model(args, texts: list[str], root: Path, device: str) -> str:
    """A randomly initialised Llama of the requested shape with a small BPE tokenizer, saved under `root`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_cli.demo.tiny import build_tokenizer

    tokenizer = build_tokenizer(texts)
    heads = args.heads or max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=args.kv_heads or max(1, heads // 4),
        max_position_embeddings=max(2048, args.max_length),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(root)


def resolve_model(args, records: list[dict], workdir: Path, device: str) -> tuple[str, str]:
    if args.model == "stories260K":
        if not STORIES_MODEL.exists():
            raise SystemExit(f"--model stories260K needs {STORIES_MODEL}; use --model tiny or --model synthetic")
        return str(STORIES_MODEL), "stories260K (Llama, dim 64, 5 layers, vocab 512)"
    if args.model == "tiny":
        from dpo_cli.demo.tiny import build_demo

        paths = build_demo(workdir / "tiny", pretrain_steps=0, train_pairs=50, test_pairs=10)
        return str(paths["model"]), "dpo_cli.demo.tiny Llama (dim 64, 2 layers, vocab 384)"
    if args.model == "synthetic":
        texts = [r["prompt"] + r[key] for r in records for key in ("chosen", "rejected")]
        path = synthetic_model(args, texts, workdir / "synthetic-model", device)
        heads = args.heads or max(1, args.hidden // 64)
        described = (
            f"synthetic Llama (hidden {args.hidden}, {args.layers} layers, {heads} heads, "
            f"intermediate {args.intermediate or 4 * args.hidden}, vocab {args.vocab}, tied embeddings)"
        )
        return path, described
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: not stories260K, tiny, synthetic or a model folder")
    return args.model, args.model


# Workers --------------------------------------------------------------------------------------------------------------


def batch_digest(input_ids, attention_mask) -> tuple[str, int]:
    """(digest of the real token ids row by row, number of real tokens) of a collated batch."""
    import torch

    digest = hashlib.sha1()
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        digest.update(ids[mask.bool()].to(torch.int64).cpu().numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16], int(attention_mask.sum())


class InOrder:
    """A `DataStream` stand-in that reads the pairs front to back, as TRL's sequential sampler does."""

    def __init__(self, num_pairs: int, batch_size: int):
        self.num_pairs, self.batch_size = num_pairs, batch_size

    @property
    def per_epoch(self) -> int:
        return self.num_pairs // self.batch_size

    def indices(self, micro_batch: int) -> list[int]:
        start = micro_batch * self.batch_size
        if start + self.batch_size > self.num_pairs:
            raise RuntimeError("the benchmark data file is too short for the requested steps")
        return list(range(start, start + self.batch_size))


def memory_window(spec: Spec) -> tuple[int, int]:
    """[first, last] step (0-based) whose memory is measured: the timed steps on CUDA, the extra step on CPU."""
    if spec.device == "cpu":
        return spec.total_steps - 1, spec.total_steps - 1
    return spec.warmup, spec.warmup + spec.steps - 1


def run_dpo_cli(spec: Spec) -> WorkerResult:
    import torch
    from rich.console import Console

    from dpo_cli.config import DataSection, DpoSection, LoraSection, ModelSection, Recipe, TrainingSection
    from dpo_cli.dpo.layouts import collate_padded
    from dpo_cli.run.loop import Trainer

    device = torch.device(spec.device)
    started = time.perf_counter()
    recipe = Recipe(
        model=ModelSection(
            path=spec.model_path,
            quantize=spec.quantize,
            compute_dtype=spec.compute_dtype,
            gradient_checkpointing=spec.gradient_checkpointing,
            device=spec.device,
        ),
        lora=LoraSection(r=spec.lora_r, alpha=spec.lora_alpha),
        data=DataSection(train=[spec.data_path], max_length=spec.max_length),
        training=TrainingSection(
            output_dir=spec.output_dir,
            max_steps=spec.total_steps,
            batch_size=spec.batch_size,
            lr=spec.lr,
            scheduler="constant",
            warmup_ratio=0.0,
            save_steps=0,
            seed=spec.seed,
        ),
        dpo=DpoSection(beta=spec.beta),
    )
    trainer = Trainer(recipe, console=Console(file=sys.stderr, quiet=True))
    trainer.stream = InOrder(len(trainer.train_pairs), spec.batch_size)
    setup_seconds = time.perf_counter() - started
    rss_before = benchlib.current_rss_mib()

    first, last = memory_window(spec)
    memory = benchlib.PeakMemory(device)
    ends, cpu_ends, losses = [], [], []
    load = [os.getloadavg()[0]]
    for step in range(spec.total_steps):
        if step == first:
            memory.__enter__()
        record = trainer.train_step()
        trainer.metrics_log.write(record)  # what `Trainer.run` does each step besides the progress bar
        benchlib.sync(device)
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
        losses.append(record["loss"])
        if step == last:
            memory.__exit__(None, None, None)
            _write_profile(spec, memory)
    load.append(os.getloadavg()[0])

    digests, tokens = [], []
    for step in range(spec.total_steps):
        indices = trainer.stream.indices(step)
        batch = collate_padded([trainer.train_pairs[i] for i in indices], trainer.tokenizer.pad_token_id)
        digest, count = batch_digest(batch.input_ids, batch.attention_mask)
        digests.append(digest)
        tokens.append(count)
    return WorkerResult(
        tool="dpo-cli",
        step_ends=ends,
        cpu_ends=cpu_ends,
        load_average=load,
        tokens_per_step=tokens,
        pairs_per_step=[spec.batch_size] * spec.total_steps,
        digests=digests,
        losses=losses,
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        peak_step_mib=memory.peak_mib,
        absolute_peak_mib=_absolute_peak(device),
        rss_before_training_mib=rss_before,
        setup_seconds=setup_seconds,
    )


def run_trl(spec: Spec) -> WorkerResult:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_cli.config import LoraSection, ModelSection
    from dpo_cli.model.load import load_base_model, load_tokenizer, lora_config

    device = torch.device(spec.device)
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    tokenizer = load_tokenizer(spec.model_path)
    model_section = ModelSection(
        path=spec.model_path,
        quantize=spec.quantize,
        compute_dtype=spec.compute_dtype,
        gradient_checkpointing=spec.gradient_checkpointing,
        device=spec.device,
    )
    model = load_base_model(model_section, device)
    bf16 = model.dtype == torch.bfloat16
    config = DPOConfig(
        output_dir=spec.output_dir,
        report_to=[],
        use_cpu=device.type == "cpu",
        bf16=bf16,
        gradient_checkpointing=spec.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if spec.gradient_checkpointing else None,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        max_length=spec.max_length,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=spec.beta,
        max_steps=spec.total_steps,
        logging_steps=1,  # per-step metrics, as dpo-cli records each step
        save_strategy="no",
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=spec.seed,
    )
    records = read_records(Path(spec.data_path))
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=lora_config(LoraSection(r=spec.lora_r, alpha=spec.lora_alpha)),
    )
    notes = []
    if spec.trl_lora_fp32:
        # TRL casts a quantized model's LoRA weights to bfloat16; put them back so both tools train fp32 adapters.
        cast = 0
        for param in trainer.model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
                cast += 1
        if cast:
            notes.append(f"TRL's {cast} bfloat16 LoRA tensors cast back to float32")

    first, last = memory_window(spec)
    memory = benchlib.PeakMemory(device)
    ends: list[float] = []
    cpu_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first and device.type == "cpu":
                memory.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            benchlib.sync(device)
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            step = state.global_step - 1
            if step == first - 1 and device.type == "cuda":
                memory.__enter__()
            if step == last:
                memory.__exit__(None, None, None)
                _write_profile(spec, memory)

    trainer.add_callback(StepClock())
    setup_seconds = time.perf_counter() - started
    rss_before = benchlib.current_rss_mib()
    load = [os.getloadavg()[0]]
    trainer.train()
    load.append(os.getloadavg()[0])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][: spec.total_steps]

    digests, tokens = [], []
    for step in range(spec.total_steps):
        rows = [trainer.train_dataset[i] for i in range(step * spec.batch_size, (step + 1) * spec.batch_size)]
        batch = trainer.data_collator(rows)
        digest, count = batch_digest(batch["input_ids"], batch["attention_mask"])
        digests.append(digest)
        tokens.append(count)
    return WorkerResult(
        tool="trl",
        step_ends=ends,
        cpu_ends=cpu_ends,
        load_average=load,
        tokens_per_step=tokens,
        pairs_per_step=[spec.batch_size] * spec.total_steps,
        digests=digests,
        losses=losses,
        trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        peak_step_mib=memory.peak_mib,
        absolute_peak_mib=_absolute_peak(device),
        rss_before_training_mib=rss_before,
        setup_seconds=setup_seconds,
        notes=notes,
    )


def _write_profile(spec: Spec, memory: benchlib.PeakMemory) -> None:
    table = memory.op_table() if spec.profile_path else None
    if table:
        Path(spec.profile_path).write_text(table)


def _absolute_peak(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / benchlib.MIB
    return benchlib.max_rss_mib()


def worker_main(tool: str, spec_path: Path, result_path: Path) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = Spec(**json.loads(spec_path.read_text()))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    result = run_dpo_cli(spec) if tool == "dpo-cli" else run_trl(spec)
    result_path.write_text(json.dumps(asdict(result)))


# The parent -----------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    tool: str
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


def check_same_work(by_tool: dict[str, list[WorkerResult]]) -> None:
    """Both tools must have seen the same token ids at every step, and trained the same number of parameters."""
    reference = by_tool[TOOLS[0]][0]
    for tool, results in by_tool.items():
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


def render(summaries: dict[str, Summary], device_type: str) -> str:
    ours, trl = summaries.get("dpo-cli"), summaries.get("trl")
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
    for s in summaries.values():
        row = [
            "dpo-cli" if s.tool == "dpo-cli" else "TRL 1.16 DPOTrainer",
            f"{s.pairs_per_second:.2f}",
            f"{s.tokens_per_second:,.0f}",
            f"{s.seconds_per_step:.3f}",
            f"{s.cpu_seconds_per_step:.3f}",
            mib(s.peak_step_mib, 1),
        ]
        row += [mib(s.rss_growth_mib)] if cpu else []
        rows.append([*row, mib(s.absolute_peak_mib), f"{s.first_loss:.4f} → {s.last_loss:.4f}"])
    if ours and trl:

        def ratio(a, b):
            return "-" if a is None or b is None or not b else f"{a / b:.2f}x"

        row = [
            "**dpo-cli / TRL**",
            ratio(ours.pairs_per_second, trl.pairs_per_second),
            ratio(ours.tokens_per_second, trl.tokens_per_second),
            ratio(ours.seconds_per_step, trl.seconds_per_step),
            ratio(ours.cpu_seconds_per_step, trl.cpu_seconds_per_step),
            ratio(ours.peak_step_mib, trl.peak_step_mib),
        ]
        row += [ratio(ours.rss_growth_mib, trl.rss_growth_mib)] if cpu else []
        rows.append([*row, ratio(ours.absolute_peak_mib, trl.absolute_peak_mib), ""])
    return benchlib.format_table(header, rows)


def run_worker(tool: str, spec_path: Path, workdir: Path, run: int, timeout: int) -> WorkerResult:
    result_path = workdir / f"result-{tool}-{run}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(spec_path), str(result_path)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{tool}: the worker ran past --timeout {timeout}s; use fewer --steps") from None
    if done.returncode != 0 or not result_path.exists():
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"{tool}: the worker failed (exit {done.returncode}); its stderr is above")
    result = WorkerResult(**json.loads(result_path.read_text()))
    print(f"  {tool:8s} run {run + 1}: {time.perf_counter() - started:.0f}s (setup {result.setup_seconds:.0f}s)")
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="stories260K", help="stories260K (default), tiny, synthetic, or a folder")
    parser.add_argument("--data", default="stories", help="stories (default), tiny, hh-synthetic, or a .jsonl file")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool, alternating order; medians reported")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (default 4)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept of prompt+completion (default 128)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-gradient-checkpointing", action="store_true", help="turn it off for both tools")
    parser.add_argument("--no-quantize", action="store_true", help="a plain base instead of 4-bit NF4, for both")
    parser.add_argument("--compute-dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, ...")
    parser.add_argument(
        "--trl-lora-dtype",
        default="float32",
        choices=("float32", "trl"),
        help="float32 (default): cast TRL's LoRA weights back to float32 like dpo-cli's; trl: keep TRL's bfloat16",
    )
    parser.add_argument("--tools", default=",".join(TOOLS), help="which of dpo-cli,trl to run")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads per worker (0: torch's default). 1 is far steadier on a machine shared with other "
        "work: with more threads than free cores, OpenMP barriers wait on descheduled threads",
    )
    synthetic = parser.add_argument_group("--model synthetic (a random Llama built on the spot)")
    synthetic.add_argument("--hidden", type=int, default=512)
    synthetic.add_argument("--layers", type=int, default=4)
    synthetic.add_argument("--vocab", type=int, default=32000)
    synthetic.add_argument("--heads", type=int, default=0, help="0: hidden / 64")
    synthetic.add_argument("--kv-heads", type=int, default=0, help="0: heads / 4")
    synthetic.add_argument("--intermediate", type=int, default=0, help="0: 4 x hidden")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CPU: write each run's profiled step as an operator table (profile-TOOL-RUN.txt in the work folder)",
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds per worker run (default 600)")
    parser.add_argument("--workdir", type=Path, help="where the model, data and runs go (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the summaries and raw results as JSON here")
    parser.add_argument(
        "--write",
        nargs="?",
        const=benchlib.RESULTS,
        type=Path,
        help="append the table to the 'Training step vs TRL' section of a markdown file (default bench/RESULTS.md)",
    )
    parser.add_argument("--worker", nargs=3, metavar=("TOOL", "SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (throughput is timed from the end of a warmup step)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        tool, spec_path, result_path = args.worker
        worker_main(tool, Path(spec_path), Path(result_path))
        return
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for tool in tools:
        if tool not in TOOLS:
            raise SystemExit(f"--tools: unknown {tool!r}; choose from {', '.join(TOOLS)}")

    device = benchlib.resolve_device(args.device)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    records, data_name = source_records(args, workdir)
    model_path, model_name = resolve_model(args, records, workdir, device.type)
    records, dropped = drop_long_prompts(records, model_path, args.max_length)
    if dropped:
        data_name += f", {dropped} pairs left out whose prompt fills max_length"
    pairs_needed = (args.warmup + args.steps + 1) * args.batch_size
    data_path = ordered_data(records, pairs_needed, args.seed, workdir / "ordered.jsonl")

    quantize = not args.no_quantize
    specs = {}
    for tool in tools:
        spec = Spec(
            model_path=model_path,
            data_path=str(data_path),
            device=device.type,
            quantize=quantize,
            compute_dtype=args.compute_dtype,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            batch_size=args.batch_size,
            max_length=args.max_length,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lr=args.lr,
            beta=args.beta,
            warmup=args.warmup,
            steps=args.steps,
            seed=args.seed,
            trl_lora_fp32=args.trl_lora_dtype == "float32",
            threads=args.threads,
            output_dir="",
        )
        specs[tool] = spec

    machine = benchlib.machine_description(device, args.threads)
    version = benchlib.code_version(REPO)
    print(f"training-step benchmark on {device.type}: {machine}")
    print(f"model: {model_name}; data: {data_name}; work folder {workdir}")
    by_tool: dict[str, list[WorkerResult]] = {tool: [] for tool in tools}
    for run in range(args.repeats):
        for tool in tools if run % 2 == 0 else reversed(tools):
            spec = specs[tool]
            spec.output_dir = str(workdir / f"run-{tool}-{run}")
            shutil.rmtree(spec.output_dir, ignore_errors=True)  # a rerun in the same --workdir starts clean
            spec.profile_path = str(workdir / f"profile-{tool}-{run}.txt") if args.profile else ""
            spec_path = workdir / f"spec-{tool}-{run}.json"
            spec_path.write_text(json.dumps(asdict(spec)))
            by_tool[tool].append(run_worker(tool, spec_path, workdir, run, args.timeout))
    check_same_work(by_tool)

    spec = specs[tools[0]]
    summaries = {tool: summarize(spec, results) for tool, results in by_tool.items()}
    reference = by_tool[tools[0]][0]
    timed = slice(spec.warmup, spec.warmup + spec.steps)
    tokens = reference.tokens_per_step[timed]
    rows = 2 * spec.batch_size
    dtype = "bfloat16" if device.type == "cuda" and args.compute_dtype == "auto" else args.compute_dtype
    if dtype == "auto":
        dtype = "float32"
    notes = sorted({note for results in by_tool.values() for r in results for note in r.notes})
    settings = (
        f"{'4-bit NF4 (double quant)' if quantize else 'unquantized'} base, compute {dtype}; LoRA r={spec.lora_r} "
        f"alpha={spec.lora_alpha} all-linear, {reference.trainable_params:,} trainable; batch {spec.batch_size} "
        f"pairs ({rows} rows), max_length {spec.max_length}, mean {statistics.mean(tokens) / rows:.0f} real tokens "
        f"per row; lr {spec.lr:g} constant, beta {spec.beta:g}, AdamW, grad clip 1.0; gradient checkpointing "
        f"{'on' if spec.gradient_checkpointing else 'off'}; {spec.warmup} warmup + {spec.steps} timed steps, "
        f"{args.repeats} run(s) per tool (median)"
    )
    if notes:
        settings += "; " + "; ".join(notes)
    loads = [x for results in by_tool.values() for r in results for x in r.load_average]
    load = f"1-min load average {min(loads):.1f}-{max(loads):.1f} during the runs"
    table = render(summaries, device.type)
    print()
    print(f"settings: {settings}")
    print(f"{version}; {load}")
    print("both tools saw identical token ids at every step (checked)")
    print()
    print(table)

    if args.json:
        payload = {
            "settings": settings,
            "spec": asdict(spec),
            "machine": machine,
            "code": version,
            "model": model_name,
            "data": data_name,
            "summaries": {tool: asdict(s) for tool, s in summaries.items()},
            "results": {tool: [asdict(r) for r in results] for tool, results in by_tool.items()},
        }
        args.json.write_text(json.dumps(payload, indent=1))
    if args.write:
        memory_note = (
            "peak step = peak of torch CPU allocations during one profiled step after timing; RSS growth = the "
            "worker's peak RSS minus its RSS before the first step (model, adapter and data loaded); max RSS = the "
            "worker's peak RSS, which includes each tool's imports"
            if device.type == "cpu"
            else "peak step = torch.cuda.max_memory_allocated over the timed steps minus the allocation at their "
            "start; max allocated = torch.cuda.max_memory_allocated"
        )
        command = benchlib.command_line("bench/bench_train.py", sys.argv[1:] if argv is None else argv)
        block = (
            f"### {benchlib.today()}: `{command}`\n\n"
            f"- machine: {machine}; {benchlib.library_versions()}; {load}\n"
            f"- code: {version}\n"
            f"- model: {model_name}\n"
            f"- data: {data_name}\n"
            f"- settings: {settings}\n"
            f"- memory: {memory_note}\n"
            "- both tools saw identical token ids at every step (checked by the script); ratios are dpo-cli / TRL "
            "(higher is better for pairs/s and tokens/s, lower for s/step and memory)\n\n"
            f"{table}\n"
        )
        section = f"Training step vs TRL ({'CUDA' if device.type == 'cuda' else 'CPU'})"
        benchlib.write_section_block(args.write, section, block)
        print(f"\nappended to section '{section}' of {args.write}")


if __name__ == "__main__":
    main()
