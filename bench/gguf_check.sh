#!/usr/bin/env bash
# Does llama.cpp run what `python -m llama.formats.convert --to gguf` writes? Builds llama.cpp's
# llama-simple on the CPU from the copy vendored in the llama-cpp-python source package, exports
# stories260K as f32 and q8_0 GGUF, and prints llama.cpp's greedy text beside this project's
# (example.py's generation engine) and each one's decode tokens/s. Not run in CI.
#
#   bash bench/gguf_check.sh [OUT]     from the repository root; OUT defaults to runs/gguf_check
#
# The first run downloads llama-cpp-python's source (pip download, ~75 MB) and builds one
# program (76 compile steps: 9 minutes on a busy 2-core machine, measured); later runs
# reuse OUT/llama.cpp-build. LLAMA_SIMPLE=/path/to/llama-simple skips the build; MODEL= picks
# the checkpoint (default ckpts/stories260K, else ../shared/assets/stories260K/stories260K.bin);
# N_PREDICT= tokens to generate (64); PYTHON= the interpreter (python). Exit status 1 when the
# f32 file's text differs from ours. llama-simple takes no thread count: it runs llama.cpp's
# default (4 threads); ours runs OMP_NUM_THREADS (default 1) threads.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${1:-runs/gguf_check}"
PYTHON="${PYTHON:-python}"
N_PREDICT="${N_PREDICT:-64}"
PROMPT="Once upon a time"
ASSETS="${LLAMA_TEST_ASSETS:-../shared/assets}"
MODEL="${MODEL:-$( [ -e ckpts/stories260K ] && echo ckpts/stories260K || echo "$ASSETS/stories260K/stories260K.bin")}"
mkdir -p "$OUT"

build_llama_cpp() {
    local build="$OUT/llama.cpp-build"
    if [ -x "$build/bin/llama-simple" ]; then echo "$build/bin/llama-simple"; return; fi
    mkdir -p "$OUT/src"
    "$PYTHON" -m pip download llama-cpp-python --no-binary :all: --no-deps -d "$OUT/src" >&2
    tar xzf "$(ls -t "$OUT"/src/llama_cpp_python-*.tar.gz | head -1)" -C "$OUT/src"
    local source
    source="$(ls -d "$OUT"/src/llama_cpp_python-*/vendor/llama.cpp | head -1)"
    # Only the library and llama-simple: no server, tools, tests, network or shared libraries.
    cmake -S "$source" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_EXAMPLES=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >&2
    cmake --build "$build" --target llama-simple -j "$(nproc)" >&2
    echo "$build/bin/llama-simple"
}

SIMPLE="${LLAMA_SIMPLE:-$(build_llama_cpp)}"
echo "llama.cpp: $SIMPLE; model: $MODEL; prompt: '$PROMPT', $N_PREDICT greedy tokens"

# Ours: the generation engine example.py runs, greedy, no stop token (llama-simple stops only
# at EOS, which stories260K never emits; it ends a story with BOS), after one warm-up call.
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PYTHON" - "$MODEL" "$PROMPT" "$N_PREDICT" \
    > "$OUT/ours.txt" 2> "$OUT/ours.log" <<'EOF'
import sys
import time

from llama.parallel.pipeline import Stage
from llama.prepare.stage import start_stage
from llama.serving.generation import generate

ckpt, prompt, n_predict = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx, model, tokenizer = start_stage(ckpt, device="cpu", dtype="float32", fuse_projections=True)
ids = [tokenizer.encode(prompt, bos=True, eos=False)]
generate(Stage(model, ctx), ids, 4)
started = time.perf_counter()
new = generate(Stage(model, ctx), ids, n_predict)[0]
seconds = time.perf_counter() - started
print(tokenizer.decode(ids[0] + new))
print(f"ours: decoded {len(new)} tokens in {seconds:.2f} s, speed: {len(new) / seconds:.2f} t/s",
      file=sys.stderr)
ctx.close()
EOF
grep "speed" "$OUT/ours.log"

status=0
for TYPE in f32 q8_0; do
    GGUF="$OUT/stories260K.$TYPE.gguf"
    "$PYTHON" -m llama.formats.convert --src "$MODEL" --dst "$GGUF" --to gguf --gguf_type "$TYPE" \
        --overwrite > "$OUT/convert.$TYPE.log"
    "$SIMPLE" -m "$GGUF" -n "$N_PREDICT" "$PROMPT" > "$OUT/llama.cpp.$TYPE.txt" 2> "$OUT/llama.cpp.$TYPE.log"
    echo "llama.cpp $TYPE: $(grep 'speed' "$OUT/llama.cpp.$TYPE.log")"
    # llama-simple prints the prompt's pieces too, BOS as <s> and the first piece's space.
    if "$PYTHON" - "$OUT/ours.txt" "$OUT/llama.cpp.$TYPE.txt" <<'EOF'
import sys
ours, theirs = (open(p, encoding="utf-8").read().replace("<s>", "").strip() for p in sys.argv[1:])
same = ours == theirs
at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
print("  same text as ours" if same else f"  differs from ours at character {at}:\n"
      f"  ours:      {ours[max(at - 40, 0):at + 40]!r}\n  llama.cpp: {theirs[max(at - 40, 0):at + 40]!r}")
sys.exit(0 if same else 1)
EOF
    then :; elif [ "$TYPE" = f32 ]; then status=1; fi
done
echo "texts and logs: $OUT"
exit $status
