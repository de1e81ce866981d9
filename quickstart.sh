#!/usr/bin/env bash
# The whole job on a real tiny model, on CPU, in a few minutes:
# download -> split into 2 stages -> generate through a 2-process pipeline -> teach a trait with a
# long hard prompt -> distil it into a 16-token soft prompt through the same pipeline -> compare.
# Files come from $LLAMA_MIRROR when set, else from ../shared/assets when it exists (llama.formats.download
# looks there by itself), else from the public sources.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
run2() { python -m torch.distributed.run --nproc_per_node 2 "$@"; }  # = torchrun --nproc_per_node 2
step() { printf '\n== %s\n' "$*"; }

step "1. download stories260K and Alpaca samples"
python -m llama.formats.download --model stories260K --folder ckpts --data alpaca_1k --data_folder datasets

step "2. split into 2 pipeline stages"
python split_model.py --ckpt_dir ckpts/stories260K --n_stages 2 --overwrite

step "3. generate through a 2-process pipeline"
run2 example.py --ckpt_dir ckpts/stories260K_pp2 --max_gen_len 48

step "4. teacher: stories written after a long hard prompt about a dog named Max"
python -m llama.tools.distill teach --ckpt_dir ckpts/stories260K_pp2 --out datasets/max_stories.jsonl --n_samples 1024

step "5. train a 16-token soft prompt on them, without the hard prompt, through 2 stages"
run2 ft_main.py --ckpt_dir ckpts/stories260K_pp2 --data datasets/max_stories.jsonl \
  --out runs/demo/prompt --template none --n_virtual_tokens 16 --init text \
  --init_text "Max was a big brown dog. Max liked to bark." --lr 0.1 --steps 200 \
  --global_batch_size 16 --micro_batch_size 4 --max_seq_len 256 --eval_fraction 0.15 --log_every 25 --eval_every 50 \
  --trace runs/demo/trace.json --overwrite

step "6. generate with and without the soft prompt"
run2 example_ft.py --ckpt_dir ckpts/stories260K_pp2 --prompt runs/demo/prompt \
  --prompts "Once upon a time" --compare --max_gen_len 48
python -m llama.tools.distill score --ckpt_dir ckpts/stories260K_pp2 --prompt runs/demo/prompt --show 0

step "7. pictures: the pipeline schedule and the loss curve"
python -m llama.tools.plot schedule runs/demo/trace.json --out runs/demo/schedule.svg
python -m llama.tools.plot losses runs/demo/prompt/metrics.jsonl --out runs/demo/loss.svg
