"""Generate with a tuned soft prompt, prefix or adapter (ours or PEFT's layout), one stage per process.

    torchrun --nproc_per_node 4 example_ft.py --ckpt_dir ckpts/7B_pp4 --prompt ckpts/prompts/alpaca
    python example_ft.py --ckpt_dir ckpts/stories260K_pp2 --prompt runs/demo/prompt --compare
"""
from llama.training.data import format_prompt
from llama.cli import run_cli
from llama.parallel.faults import PeerLost, report_and_exit
from llama.serving.generation import decode_continuation, generate
from llama.tuning.files import load_tuning
from llama.tuning.methods import apply_saved
from llama.parallel.pipeline import Stage
from llama.prepare.stage import compile_blocks, start_stage

DEFAULT_PROMPTS = ("Give three tips for staying healthy.", "Once upon a time")


def main(ckpt_dir: str, prompt: str, tokenizer_path: str = None,
         prompts: tuple[str, ...] = DEFAULT_PROMPTS, template: str = None, max_gen_len: int = 64,
         temperature: float = 0.0, top_p: float = 0.9, seed: int = 0, compare: bool = False,
         max_seq_len: int = None, device: str = None, dtype: str = None, timeout_s: float = 300.0,
         cuda_graph: bool = False, compile: bool = False, quantize: str = None,
         group_size: int = None):
    """Generate with a trained soft prompt (this project's or PEFT's layout), one stage per process.

    Each text is wrapped in the template the prompt was trained with (from tuning.json).

    ckpt_dir: the model: a split folder (split_model.py), a Meta folder, a llama2.c .bin or a
        Hugging Face folder
    prompt: the folder ft_main.py --out wrote (tuning.pt + tuning.json, for every method; an
        earlier version's prompt.pt + prompt.json), or a PEFT export (adapter_model.bin +
        adapter_config.json) of prompt tuning, prefix tuning or adaption prompts
    tokenizer_path: the sentencepiece tokenizer.model (default: the one beside the checkpoint)
    prompts: the texts (instructions) to answer: one text, or several as a list '["a", "b"]'
    template: alpaca, plain or none (default: the one the prompt was trained with)
    max_gen_len: the most tokens generated after each text
    temperature: 0 picks the likeliest token (greedy); above 0 samples, with top-p
    top_p: sampling keeps the likeliest tokens whose probabilities add up to top_p
    seed: the random seed of sampling
    compare: also print the base model's output (without the soft prompt) for each text
    max_seq_len: the longest prompt + generation in tokens (default: the model's own)
    device: cpu, cuda or cuda:N (default: this rank's GPU if there is one, else the CPU)
    dtype: float32, float16 or bfloat16 for the weights (default: float16 on a GPU, float32 on
        the CPU)
    timeout_s: seconds to wait for another stage before giving up on it
    cuda_graph: decode with a static KV cache, each step replayed as a CUDA graph on a GPU (on a
        CPU the same static path runs uncaptured); the same ids as without it
    compile: torch.compile each transformer block first (slow to start; needs a C++ compiler)
    quantize: int8 or int4: quantize a float checkpoint's block linears while loading (a split
        made with split_model.py --quantize is already quantized)
    group_size: inputs per int4 scale (default: the largest power of two up to 128 dividing
        every width)
    """
    ctx, model, tokenizer = start_stage(ckpt_dir, tokenizer_path, device, dtype, max_seq_len,
                                        timeout_s, fuse_projections=True,
                                        quantize=quantize, group_size=group_size)
    compile_blocks(model, compile)
    try:
        # Rank 0 reads and checks the folder; every stage keeps the tensors of its own layers.
        loaded = load_tuning(prompt, model.args) if ctx.rank == 0 else None
        method, tensors, info = ctx.broadcast_object(loaded)
        stage = Stage(model, ctx, tuning=apply_saved(model, method, tensors, ctx.is_first),
                      cuda_graph=cuda_graph)
        template = template or info.get("template") or "none"
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [tokenizer.encode(format_prompt({"instruction": t, "input": ""}, template),
                                bos=True, eos=False) for t in texts]
        stops = tokenizer.stop_ids
        tuned = generate(stage, ids, max_gen_len, temperature, top_p, stops, seed)
        base = generate(stage, ids, max_gen_len, temperature, top_p, stops, seed,
                        use_prompt=False) if compare else None
        for i, text in enumerate(texts):
            ctx.log(f"### {text}\n[with prompt] {decode_continuation(tokenizer, ids[i], tuned[i])}")
            if base is not None:
                ctx.log(f"[base model]  {decode_continuation(tokenizer, ids[i], base[i])}")
            ctx.log("-" * 40)
    except PeerLost as error:
        report_and_exit(error, ctx.rank)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)
