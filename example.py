"""Generate text with a (split) LLaMA checkpoint, one pipeline stage per process.

    torchrun --nproc_per_node 2 example.py --ckpt_dir ckpts/stories260K_pp2
    python example.py --ckpt_dir ckpts/stories260K --prompts '["Once upon a time"]'
"""
from llama.cli import run_cli
from llama.options import DECODING, GENERATION, MODEL, takes
from llama.parallel.pipeline import Stage
from llama.prepare.stage import Preparation, run_on_stage
from llama.serving.generation import check_sampling, generate

DEFAULT_PROMPTS = ("Once upon a time", "Tom and Lily went to the park. They saw", "The cat")


@takes(MODEL, GENERATION, DECODING)
def main(prompts: tuple[str, ...] = DEFAULT_PROMPTS, **options):
    """Generate text with a LLaMA checkpoint (the base model, no soft prompt), one stage per process.

    Each prompt is continued until EOS, BOS (which models such as stories260K emit to end a
    story) or --max_gen_len tokens.

    prompts: the texts to continue: one text, or several as a list '["first", "second"]'
    """
    check_sampling(options["temperature"], options["top_p"])
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)

    def work(ctx, model, tokenizer, _):
        ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        stage = Stage(model, ctx, cuda_graph=options["cuda_graph"])
        outputs = generate(stage, ids, options["max_gen_len"], options["temperature"],
                           options["top_p"], stop_ids=tokenizer.stop_ids, seed=options["seed"],
                           progress_every_s=10.0 if ctx.rank == 0 else None)
        for prompt_ids, out in zip(ids, outputs):
            ctx.log(tokenizer.decode(prompt_ids + out) + "\n" + "-" * 40)

    run_on_stage(options, work, Preparation(fuse_projections=True, cpu_linears="packed",
                                            dynamic_int8=not options["exact_quantized"]))


if __name__ == "__main__":
    run_cli(main)
