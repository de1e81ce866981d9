"""Generate text with a (split) LLaMA checkpoint, one pipeline stage per process.

    torchrun --nproc_per_node 2 example.py --ckpt_dir ckpts/stories260K_pp2
    python example.py --ckpt_dir ckpts/stories260K --prompts '["Once upon a time"]'
"""
from llama.cli import run_cli
from llama.parallel.faults import PeerLost, report_and_exit
from llama.serving.generation import generate
from llama.parallel.pipeline import Stage
from llama.prepare.stage import compile_blocks, start_stage

DEFAULT_PROMPTS = ("Once upon a time", "Tom and Lily went to the park. They saw", "The cat")


def main(ckpt_dir: str, tokenizer_path: str = None, prompts: tuple[str, ...] = DEFAULT_PROMPTS,
         max_gen_len: int = 64, temperature: float = 0.0, top_p: float = 0.9, seed: int = 0,
         max_seq_len: int = None, device: str = None, dtype: str = None, timeout_s: float = 300.0,
         cuda_graph: bool = False, compile: bool = False, quantize: str = None,
         group_size: int = None):
    """Generate text with a LLaMA checkpoint (the base model, no soft prompt), one stage per process.

    Each prompt is continued until EOS, BOS (which models such as stories260K emit to end a
    story) or --max_gen_len tokens.

    ckpt_dir: the model: a split folder (split_model.py), a Meta folder, a llama2.c .bin or a
        Hugging Face folder
    tokenizer_path: the sentencepiece tokenizer.model (default: the one beside the checkpoint)
    prompts: the texts to continue: one text, or several as a list '["first", "second"]'
    max_gen_len: the most tokens generated after each prompt
    temperature: 0 picks the likeliest token (greedy); above 0 samples, with top-p
    top_p: sampling keeps the likeliest tokens whose probabilities add up to top_p
    seed: the random seed of sampling
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
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        outputs = generate(Stage(model, ctx, cuda_graph=cuda_graph), ids, max_gen_len, temperature, top_p,
                           stop_ids=tokenizer.stop_ids, seed=seed,
                           progress_every_s=10.0 if ctx.rank == 0 else None)
        for prompt_ids, out in zip(ids, outputs):
            ctx.log(tokenizer.decode(prompt_ids + out) + "\n" + "-" * 40)
    except PeerLost as error:
        report_and_exit(error, ctx.rank)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)
