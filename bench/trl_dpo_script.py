"""A TRL 1.16 user's DPO script: what whole_process.py times against `dpo-cli train` on the same job.

Written the way TRL's docs show it, with nothing of dpo-cli: the base loaded 4-bit NF4 (double quantization, float32
compute on CPU) through transformers, a LoRA config for every linear layer, the preference file read by `datasets`,
`DPOTrainer(...).train()` and `save_model`. The settings are dpo-cli train's defaults where the job does not fix them
(lr 5e-5, beta 0.1, grad clip 1.0, gradient checkpointing on), with a constant schedule and no warmup as the dpo-cli
command is given. TRL keeps its own choices where a user would not change them (its bfloat16 LoRA weights on a
quantized base). At the end it writes `whole-process.json` in the output folder: steps taken, pairs, losses.

Run: python bench/trl_dpo_script.py --model MODEL --data pairs.jsonl --output-dir OUT [--max-length 512 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a JSONL file of prompt/chosen/rejected text")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
    )
    checkpointing = not args.no_gradient_checkpointing
    config = DPOConfig(
        output_dir=args.output_dir,
        report_to=[],
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_length=args.max_length,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=args.beta,
        max_grad_norm=1.0,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=args.data, split="train"),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"steps": trainer.state.global_step, "pairs": trainer.state.global_step * args.batch_size}
    summary["losses"] = losses
    (Path(args.output_dir) / "whole-process.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
