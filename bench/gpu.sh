#!/usr/bin/env bash
# The GPU benchmarks in one prepared script, for a session that is lent a GPU machine (no network there).
#
# Prepare on a machine with network, once, from the project root:
#     ../shared/tools/gpu-wheels.sh          # fills .whl/ (git-ignored): bitsandbytes, trl, transformers, peft, ...
# Then run it on the GPU machine with the working tree, carrying .whl (the device tool: carry [".whl"]):
#     bash bench/gpu.sh                      # results under $OUT: RESULTS-gpu.md, *.json, *.log, env.txt
# Copy the blocks of $OUT/RESULTS-gpu.md into bench/RESULTS.md by hand (its CUDA sections), with the card named.
#
# What it runs, in about 5 minutes on an H100 (hard limit 8 minutes; each step has its own timeout):
#   1. bench_logprobs.py: fused log-probs vs full logits vs TRL's chunked kernel, bf16, hidden 2048/4096, vocab
#      128,256, 1k-4k tokens;
#   2. bench_train.py: dpo-cli vs TRL 1.16 DPOTrainer on a synthetic Llama of the 1B class built in memory (hidden
#      2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, vocab 128,256, tied embeddings: Llama 3.2 1B's
#      shape), 4-bit NF4 base, bf16 compute, LoRA r16 all-linear, 4 pairs of hh-rlhf-like dialogue per step at
#      max_length 1024, gradient checkpointing on;
#   3. bench_sample.py: `dpo-cli sample`'s batched generation (samples/s, generated tokens/s) against a
#      one-prompt-at-a-time model.generate loop and TRL 1.16's experimental OnlineDPOTrainer's generation (2 samples
#      per prompt, fixed in TRL, so 2 here for all three), on the same synthetic 1B-class Llama, 4-bit;
#   4. on a machine with 2 or more GPUs, bench_sharding.py: memory per GPU of 1 process, 2 processes with
#      --sharding ddp and 2 with --sharding fsdp on the same synthetic 1B-class Llama (one line says it was skipped
#      on one GPU);
#   5. if time is left, the training step without gradient checkpointing.
#
# BENCH_GPU_SMOKE=1 runs the same steps on the CPU at toy sizes (no wheels needed when the packages are installed):
# that is how this script is checked on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
smoke=${BENCH_GPU_SMOKE:-0}
if [ "$smoke" = 1 ]; then
  OUT=${OUT:-$(mktemp -d)}
fi
: "${OUT:?OUT must name the folder the results go to (the device tool sets it)}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
elif [ "$smoke" != 1 ]; then
  echo "no .whl/ here: run ../shared/tools/gpu-wheels.sh where there is network, and carry .whl" >&2
  exit 1
else
  export PYTHONPATH=$PWD
fi

{
  date -u
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  python3 -c 'import sys, torch, transformers, peft, bitsandbytes, trl
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "peft", peft.__version__,
      "bitsandbytes", bitsandbytes.__version__, "trl", trl.__version__)
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
  git log --oneline -1 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! grep -q '^python' "$OUT/env.txt"; then
  echo "the packages do not import (see above); nothing was run" >&2
  exit 1
fi

if [ "$smoke" = 1 ]; then
  device=cpu
  logprob_sizes=64x1000x64,128x4000x128
  model=(--hidden 64 --layers 2 --vocab 1000 --intermediate 128 --heads 4 --kv-heads 2)
  train=(--max-length 64 --batch-size 2 --steps 2 --warmup 1 --repeats 1)
  sharded_model=(--hidden 64 --layers 2 --intermediate 128 --heads 4)
else
  device=cuda
  logprob_sizes=2048x128256x1024,2048x128256x4096,4096x128256x4096
  model=(--hidden 2048 --layers 16 --vocab 128256 --intermediate 8192 --heads 32 --kv-heads 8)
  train=(--max-length 1024 --batch-size 4 --steps 8 --warmup 2 --repeats 1)
  sharded_model=(--hidden 2048 --layers 16 --intermediate 8192 --heads 32)
fi
status=0

echo "== fused log-probs"
timeout 150 python3 bench/bench_logprobs.py --device "$device" --sizes "$logprob_sizes" --repeats 5 \
  --write "$OUT/RESULTS-gpu.md" --json "$OUT/logprobs.json" 2>&1 | tee "$OUT/logprobs.log" || status=1

echo "== training step vs TRL, gradient checkpointing on"
timeout 270 python3 bench/bench_train.py --device "$device" --model synthetic "${model[@]}" --data hh-synthetic \
  "${train[@]}" --workdir /tmp/bench-train --write "$OUT/RESULTS-gpu.md" --json "$OUT/train.json" 2>&1 \
  | tee "$OUT/train.log" || status=1

echo "== sampling: dpo-cli sample's batched generation vs a one-at-a-time generate loop and TRL's online DPO"
if [ "$smoke" = 1 ]; then
  sample=(--model tiny --prompts 8 --num-samples 2 --max-new-tokens 8 --batch-size 16 --loop-prompts 2 --trl)
else
  sample=(--model synthetic "${model[@]}" --prompts 64 --num-samples 2 --max-new-tokens 128 --batch-size 128 \
    --loop-prompts 4 --trl)
fi
timeout 180 python3 bench/bench_sample.py --device "$device" "${sample[@]}" --json "$OUT/sample.json" 2>&1 \
  | tee "$OUT/sample.log" || status=1

gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$smoke" != 1 ] && [ "${gpus:-0}" -lt 2 ]; then
  echo "== skipped the 2-process fsdp run: ${gpus:-0} GPU here, it needs 2"
else
  echo "== memory per process: 1 process, 2 with --sharding ddp, 2 with --sharding fsdp"
  timeout 150 python3 bench/bench_sharding.py --device "$device" "${sharded_model[@]}" --workdir /tmp/bench-sharding \
    --write "$OUT/RESULTS-gpu.md" 2>&1 | tee "$OUT/sharding.log" || status=1
fi

if [ $((SECONDS - started)) -lt 300 ]; then
  echo "== training step vs TRL, gradient checkpointing off"
  timeout 180 python3 bench/bench_train.py --device "$device" --model synthetic "${model[@]}" --data hh-synthetic \
    "${train[@]}" --no-gradient-checkpointing --workdir /tmp/bench-train-nogc --write "$OUT/RESULTS-gpu.md" \
    --json "$OUT/train-nogc.json" 2>&1 | tee "$OUT/train-nogc.log" || status=1
else
  echo "== skipped the run without gradient checkpointing: $((SECONDS - started))s already spent"
fi

echo "== done in $((SECONDS - started))s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
