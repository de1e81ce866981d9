"""Generate text with a (split) LLaMA checkpoint, one pipeline stage per process.

    torchrun --nproc_per_node 2 example.py --ckpt_dir ckpts/stories260K_pp2
    python example.py --ckpt_dir ckpts/stories260K --prompts '["Once upon a time"]'
"""
from llama.distributed import PeerLost, report_and_exit
from llama.errors import run_cli
from llama.generation import generate
from llama.pipeline import Stage
from llama.runtime import start_stage

DEFAULT_PROMPTS = ("Once upon a time", "Tom and Lily went to the park. They saw", "The cat")


def main(ckpt_dir: str, tokenizer_path: str = None, prompts=DEFAULT_PROMPTS, max_gen_len: int = 64,
         temperature: float = 0.0, top_p: float = 0.9, seed: int = 0, max_seq_len: int = None,
         device: str = None, dtype: str = None, timeout_s: float = 300.0):
    """temperature 0 is greedy; above 0, top-p sampling. Stops at EOS, and at BOS (which models
    such as stories260K emit to end a story)."""
    ctx, model, tokenizer = start_stage(ckpt_dir, tokenizer_path, device, dtype, max_seq_len, timeout_s)
    try:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        outputs = generate(Stage(model, ctx), ids, max_gen_len, temperature, top_p,
                           stop_ids=(tokenizer.eos_id, tokenizer.bos_id), seed=seed,
                           progress_every_s=10.0 if ctx.rank == 0 else None)
        for prompt_ids, out in zip(ids, outputs):
            ctx.log(tokenizer.decode(prompt_ids + out) + "\n" + "-" * 40)
    except PeerLost as error:
        report_and_exit(error, ctx.rank)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)
