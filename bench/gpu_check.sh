#!/usr/bin/env bash
# The GPU proof: every GPU claim of this project measured by one command, in under 8 minutes.
#
#   bash bench/gpu_check.sh [OUT]          on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --tiny [OUT]   the CPU rehearsal: every step, on the tiny shape
#
# Writes OUT/<part>.log (each command's whole output), OUT/results.jsonl (every JSON line the
# benchmarks printed, tagged with its part), OUT/traces/ and a schedule picture, and
# OUT/summary.txt (each target, met or not), printed last. OUT: the argument, else $OUT (the
# device tool's folder), else runs/gpu_check.
#
# The GPU machine has torch with CUDA, numpy, sentencepiece, transformers and peft and no network:
# everything the project needs is there (it has not needed fire since llama/cli.py parses argv).
#
# The parts run in order of value, each under its own time limit, and none starts once the whole
# run is past its deadline (BUDGET_S, 450 s by default): a part left out says so in the summary.
# Estimated on one H200 from the 7B shape's FLOPs and bytes: training 2 x ~40 s (model build,
# ours then transformers + PEFT), memory caps 5 x ~35 s (one of them QLoRA), decode 3 x ~30 s,
# pipeline ~45 s, GPU tests ~20 s: ~7 min. The CPU rehearsal (--tiny) runs the same commands
# in about 2 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
if [ "${1:-}" = "--tiny" ]; then TINY=1; shift; fi
OUT_DIR="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$OUT_DIR/traces"
BUDGET_S="${BUDGET_S:-450}"
STARTED=$(date +%s)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

python3 -c "import numpy, sentencepiece, torch" || {
  echo "error: numpy, sentencepiece and torch must import on this machine"
  exit 2
}

if [ "$TINY" = 1 ]; then
  ON_DEVICE=(--device cpu)
  SHAPE=(--shape tiny "${ON_DEVICE[@]}")
  SEQ=(--seq_len 64 --n_virtual_tokens 8)
  DECODE=(--prompt_len 8 --gen_len 16 --repeats 1 --copy_mib 16)
  GRID=(--prompt_len 8 --gen_len 16 --repeats 1)
  STEPS=(--steps 1 --warmup_steps 1)
else
  ON_DEVICE=(--dtype float16)
  SHAPE=(--shape 7B "${ON_DEVICE[@]}")
  SEQ=(--seq_len 512 --n_virtual_tokens 32)
  DECODE=(--prompt_len 32 --gen_len 128 --repeats 2)
  GRID=(--prompt_len 32 --gen_len 64 --repeats 2)
  STEPS=(--steps 3 --warmup_steps 2)
fi
TRAIN=(python3 -m bench.train_bench "${SHAPE[@]}" "${SEQ[@]}")
DECODE_BENCH=(python3 -m bench.decode_bench "${SHAPE[@]}" "${DECODE[@]}")

# part NAME LIMIT_S command...: run it under its limit (or what is left of the budget), keep its
# output in NAME.log and its JSON lines, tagged, in results.jsonl.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET_S - ($(date +%s) - STARTED) ))
  if [ "$left" -lt 20 ]; then
    echo "{\"part\": \"$name\", \"status\": \"not run: the ${BUDGET_S} s budget was spent\"}" >> "$OUT_DIR/results.jsonl"
    echo "== $name: not run (budget spent)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0=$(date +%s)
  timeout --kill-after 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  python3 - "$name" "$rc" "$(( $(date +%s) - t0 ))" "$OUT_DIR" <<'PY'
import json, sys
name, rc, seconds, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(f"{out}/{name}.log", errors="replace") as log, open(f"{out}/results.jsonl", "a") as results:
    for line in log:
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            results.write(json.dumps({"part": name, **record}) + "\n")
    status = "ok" if rc == 0 else ("timed out" if rc in (124, 137) else f"exit {rc}")
    results.write(json.dumps({"part": name, "status": status, "seconds": seconds}) + "\n")
print(f"   {status} in {seconds} s")
PY
}

: > "$OUT_DIR/results.jsonl"
# 1. Training, one stage holding the whole model, ours against transformers + PEFT.
part train_b8 150 "${TRAIN[@]}" --global_batch 8 --micro_batch 8 "${STEPS[@]}" --compare_hf
part train_b32_recompute 150 "${TRAIN[@]}" --global_batch 32 --micro_batch 32 --recompute True \
  "${STEPS[@]}" --compare_hf
# 2. Per-stage memory, global batch 32, stages as processes sharing the GPU, each capped.
MEM=(--global_batch 32 --recompute True --steps 2 --warmup_steps 1)
part memory_4x6gib 100 "${TRAIN[@]}" --n_stages 4 --micro_batch 4 "${MEM[@]}" --memory_cap_gib 6
part memory_2x10gib 90 "${TRAIN[@]}" --n_stages 2 --micro_batch 4 "${MEM[@]}" --memory_cap_gib 10
part int4_2x4gib 90 "${TRAIN[@]}" --n_stages 2 --micro_batch 2 "${MEM[@]}" --quantize int4 \
  --memory_cap_gib 4
part int8_4x4gib 100 "${TRAIN[@]}" --n_stages 4 --micro_batch 2 "${MEM[@]}" --quantize int8 \
  --memory_cap_gib 4
# QLoRA: LoRA r 8 on q,v over an int4 base, 2 stages of 4 GiB (the planner's estimate for this
# configuration, python -m llama.tools.plan --model 7B --gpus 4,4 --method lora: 2.93, 3.23 GiB).
part lora_int4_2x4gib 90 "${TRAIN[@]}" --n_stages 2 --micro_batch 2 "${MEM[@]}" --quantize int4 \
  --method lora --lora_r 8 --lora_targets q,v --memory_cap_gib 4
# 3. Decode, batch 1: the CUDA graph against transformers' generate, eager, and over 2 stages.
part decode_graph 90 "${DECODE_BENCH[@]}" --batch 1 --cuda_graph --compare_hf
part decode_eager 60 "${DECODE_BENCH[@]}" --batch 1
part decode_graph_2stages 90 "${DECODE_BENCH[@]}" --batch 1 --n_stages 2 --cuda_graph \
  --compare_single_stage
# 3b. Per-token decode latency, one process vs 2 stages vs 2 TP ranks (bench/grid_bench.py). With
# one GPU both ranks share it, so they talk over gloo through the CPU: functional, and the cost
# of a TP all-reduce without NVLink, not TP's gain on two cards.
part grid_decode 120 python3 -m bench.grid_bench "${SHAPE[@]}" "${GRID[@]}"
# 4. Pipeline overhead: 4 stages sharing the GPU, 16 micro-batches, 1F1B, against one process.
part pipeline_4stages 120 "${TRAIN[@]}" --n_stages 4 --global_batch 32 --micro_batch 2 \
  --schedule 1f1b --recompute True --steps 2 --warmup_steps 1 --compare_single_stage \
  --trace_dir "$OUT_DIR/traces"
trace=$(ls "$OUT_DIR"/traces/train_4st_*.json 2>/dev/null | head -1)
[ -n "$trace" ] && python3 -m llama.tools.plot schedule "$trace" \
  --out "$OUT_DIR/schedule_4stages_1f1b_gpu.svg" > "$OUT_DIR/plot.log" 2>&1
# 5. The model families (docs/model_families.md) on CUDA: GQA with llama3 rope scaling, q/k/v
# biases, a sliding window; decode with the graph, and a training step with biases.
if [ "$TINY" = 1 ]; then
  LLAMA3=tiny-llama3 QWEN2=tiny-qwen2 MISTRAL=tiny-mistral
else
  LLAMA3=Llama-3.2-1B QWEN2=Qwen2.5-1.5B MISTRAL=Mistral-7B
fi
FAMILY_DECODE=(python3 -m bench.decode_bench "${ON_DEVICE[@]}" "${DECODE[@]}" --batch 1 --cuda_graph)
part family_llama3_decode 60 "${FAMILY_DECODE[@]}" --shape "$LLAMA3"
part family_mistral_decode 60 "${FAMILY_DECODE[@]}" --shape "$MISTRAL"
part family_qwen2_train 60 python3 -m bench.train_bench --shape "$QWEN2" "${ON_DEVICE[@]}" "${SEQ[@]}" \
  --global_batch 8 --micro_batch 8 "${STEPS[@]}"
# 6. The tests that need CUDA (skipped on a CPU).
part gpu_tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py

python3 -m bench.gpu_summary "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
