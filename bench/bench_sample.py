"""`dpo-cli sample`'s generation throughput against a plain one-prompt-at-a-time `model.generate` loop.

Both sample the same prompts N times each from the same loaded model (4-bit NF4 unless --no-quantize), at
temperature 1 up to --max-new-tokens or EOS. dpo-cli's side is `online.sample.sample_prompts`, the function the
command runs for each batch of its plan (`batch_plan`: prompts grouped by length, --batch-size sequences at a time,
KV cache, per-sample seeds), with a constant reward so that only generation is timed; the loop calls
`model.generate` once per (prompt, sample), one sequence at a time, as a script would without batching.

    OMP_NUM_THREADS=2 python3 bench/bench_sample.py --model stories260K --prompts 32 --num-samples 4 \
        --max-new-tokens 48 --batch-size 64

`--trl` also times TRL's experimental online DPO (trl.experimental.online_dpo.OnlineDPOTrainer) generating on the
same prompts from its own copy of the same model, loaded the same way (4-bit NF4 unless --no-quantize, with a LoRA
adapter as its trainer wraps it): `trainer._generate`, the function its training_step calls, for --batch-size / 2
prompts at a time (it samples 2 completions per prompt, fixed in TRL, so --trl needs --num-samples 2). Timed twice:
with TRL's default gradient_checkpointing=True, under which its generation config turns the KV cache off, and with
gradient_checkpointing=False.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def prompt_texts(args) -> list[str]:
    from train_inputs import STORIES_DATA, hh_synthetic_pairs

    if args.model == "stories260K" and STORIES_DATA.exists():
        records = [json.loads(line) for line in STORIES_DATA.read_text().splitlines()]
    else:
        records = hh_synthetic_pairs(max(args.prompts, 50), args.max_length)
    seen = list(dict.fromkeys(record["prompt"] for record in records))
    return (seen * (args.prompts // len(seen) + 1))[: args.prompts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stories260K", help="stories260K, tiny, synthetic or a model folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64, help="dpo-cli: sequences generated together")
    parser.add_argument("--no-quantize", action="store_true")
    parser.add_argument("--loop-prompts", type=int, default=0, help="prompts the plain loop samples (0: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--trl", action="store_true", help="also time TRL's experimental online DPO's generation")
    # the synthetic model's shape (train_inputs.synthetic_model)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from benchlib import sync
    from train_inputs import resolve_model

    from dpo_cli.config import ModelSection
    from dpo_cli.model.load import load_base_model, load_tokenizer
    from dpo_cli.online.prompts import Prompt
    from dpo_cli.online.rewards import Reward, RewardSet
    from dpo_cli.online.sample import Policy, batch_plan, prompt_ids, sample_prompts

    if args.trl and args.num_samples != 2:
        raise SystemExit("--trl: TRL's online DPO samples 2 completions per prompt; pass --num-samples 2")
    device = torch.device(args.device)
    texts = prompt_texts(args)
    with tempfile.TemporaryDirectory() as workdir:
        records = [{"prompt": t, "chosen": " a", "rejected": " b"} for t in texts]
        path, described = resolve_model(args, records, Path(workdir), args.device)
        tokenizer = load_tokenizer(path)
        model = load_base_model(ModelSection(path=path, quantize=not args.no_quantize, device=args.device), device)
        model.eval()
        policy = Policy(model, tokenizer, {})
        prompts = [Prompt(text, f"bench:{i + 1}") for i, text in enumerate(texts)]
        ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
        rewards = RewardSet([Reward("constant", lambda p, c, columns, where: [0.0] * len(c))])
        from dpo_cli.online.generation import SamplingSettings

        settings = SamplingSettings(args.num_samples, args.max_new_tokens, 1.0, 1.0, args.seed)
        sample_prompts(policy, prompts, [0], ids, settings, rewards)  # warm-up
        sync(device)
        started = time.perf_counter()
        tokens = samples = 0
        for batch in batch_plan([len(i) for i in ids], args.num_samples, args.batch_size):
            rows = sample_prompts(policy, prompts, batch, ids, settings, rewards)
            tokens += sum(row["tokens"] for row in rows)
            samples += len(rows)
        sync(device)
        ours = time.perf_counter() - started

        loop_prompts = args.loop_prompts or len(ids)
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        loop_tokens = loop_samples = 0
        with torch.no_grad():
            for prompt in ids[:loop_prompts]:
                for _ in range(args.num_samples):
                    input_ids = torch.tensor([prompt], device=device)
                    output = model.generate(
                        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                        temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
                    )  # fmt: skip
                    loop_tokens += output.shape[1] - input_ids.shape[1]
                    loop_samples += 1
        sync(device)
        loop = time.perf_counter() - started
        trl = {}
        if args.trl:
            for checkpointing in (True, False):
                name = "trl_online_dpo" + ("" if checkpointing else "_no_gradient_checkpointing")
                trl[name] = trl_generation(path, tokenizer, texts, args, checkpointing, Path(workdir))

    result = {
        "model": described,
        "device": args.device,
        "quantized": not args.no_quantize,
        "prompts": len(ids),
        "num_samples": args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "dpo_cli": {"seconds": ours, "samples_per_s": samples / ours, "tokens_per_s": tokens / ours},
        "generate_loop": {
            "prompts": loop_prompts,
            "seconds": loop,
            "samples_per_s": loop_samples / loop,
            "tokens_per_s": loop_tokens / loop,
        },
    }
    result.update(trl)
    result["speedup_samples_per_s"] = result["dpo_cli"]["samples_per_s"] / result["generate_loop"]["samples_per_s"]
    print(
        f"{described}, {args.device}, {len(ids)} prompts x {args.num_samples} samples, <= {args.max_new_tokens} "
        f"new tokens\n"
        f"  dpo-cli sample (batch {args.batch_size}): {result['dpo_cli']['samples_per_s']:.1f} samples/s, "
        f"{result['dpo_cli']['tokens_per_s']:.0f} generated tokens/s\n"
        f"  model.generate one at a time ({loop_prompts} prompts): "
        f"{result['generate_loop']['samples_per_s']:.1f} samples/s, "
        f"{result['generate_loop']['tokens_per_s']:.0f} generated tokens/s\n"
        f"  speedup: {result['speedup_samples_per_s']:.2f}x samples/s"
    )
    for name, measured in trl.items():
        print(
            f"  {name} (_generate, {measured['prompts_per_call']} prompts x 2 per call): "
            f"{measured['samples_per_s']:.1f} samples/s, {measured['tokens_per_s']:.0f} generated tokens/s"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def trl_generation(path: str, tokenizer, texts: list[str], args, checkpointing: bool, workdir: Path) -> dict:
    """Samples/s and generated tokens/s of OnlineDPOTrainer._generate on `texts`, batch_size / 2 prompts a call."""
    import torch
    from benchlib import sync
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from dpo_cli.config import ModelSection
    from dpo_cli.model.load import load_base_model

    def constant(prompts, completions, **columns):
        return [0.0] * len(completions)

    device = torch.device(args.device)
    model = load_base_model(ModelSection(path=path, quantize=not args.no_quantize, device=args.device), device)
    per_call = max(1, args.batch_size // 2)
    config = OnlineDPOConfig(
        output_dir=str(workdir / f"trl-{checkpointing}"), per_device_train_batch_size=per_call,
        max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        gradient_checkpointing=checkpointing, report_to=[], use_cpu=args.device == "cpu", bf16=False,
        seed=args.seed,
    )  # fmt: skip
    trainer = OnlineDPOTrainer(
        model=model, reward_funcs=[constant], args=config, train_dataset=Dataset.from_dict({"prompt": texts}),
        processing_class=tokenizer, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )  # fmt: skip
    trainer.model.eval()
    trainer._generate(trainer.model, texts[:per_call])  # warm-up
    sync(device)
    started = time.perf_counter()
    tokens = samples = 0
    for start in range(0, len(texts), per_call):
        _, _, completion_ids, completion_mask, _ = trainer._generate(trainer.model, texts[start : start + per_call])
        tokens += int(completion_mask.sum())
        samples += completion_ids.shape[0]
    sync(device)
    seconds = time.perf_counter() - started
    return {
        "gradient_checkpointing": checkpointing,
        "kv_cache": bool(trainer.generation_config.use_cache),
        "prompts_per_call": per_call,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
    }


if __name__ == "__main__":
    main()
