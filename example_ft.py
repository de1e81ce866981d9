"""Generate with a tuned soft prompt, prefix, adapter or LoRA (ours or PEFT's layout), one stage per process.

    torchrun --nproc_per_node 4 example_ft.py --ckpt_dir ckpts/7B_pp4 --prompt ckpts/prompts/alpaca
    python example_ft.py --ckpt_dir ckpts/stories260K_pp2 --prompt runs/demo/prompt --compare
"""
from llama.cli import run_cli
from llama.options import DECODING, GENERATION, MODEL, takes
from llama.parallel.pipeline import Stage
from llama.prepare.stage import Preparation, run_on_stage
from llama.serving.generation import check_sampling, decode_continuation, generate
from llama.training.records import format_prompt
from llama.tuning.files import saved_tuning

DEFAULT_PROMPTS = ("Give three tips for staying healthy.", "Once upon a time")


@takes(MODEL, GENERATION, DECODING)
def main(prompt: str, prompts: tuple[str, ...] = DEFAULT_PROMPTS, template: str = None,
         compare: bool = False, **options):
    """Generate with a trained soft prompt (this project's or PEFT's layout), one stage per process.

    Each text is wrapped in the template the prompt was trained with (from tuning.json).

    prompt: the folder ft_main.py --out wrote (tuning.pt + tuning.json, for every method; an
        earlier version's prompt.pt + prompt.json), or a PEFT export (adapter_model.bin +
        adapter_config.json) of prompt tuning, prefix tuning or adaption prompts
    prompts: the texts (instructions) to answer: one text, or several as a list '["a", "b"]'
    template: alpaca, plain, none, llama2, llama3 or chatml (default: the one the prompt was
        trained with)
    compare: also print the base model's output (without the soft prompt) for each text
    """
    check_sampling(options["temperature"], options["top_p"])
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    method = saved_tuning(prompt)

    def work(ctx, model, tokenizer, tuning):
        stage = Stage(model, ctx, tuning=tuning, cuda_graph=options["cuda_graph"])
        chosen = template or method.info.get("template") or "none"
        ids = [tokenizer.encode(format_prompt({"instruction": t, "input": ""}, chosen),
                                bos=True, eos=False) for t in texts]
        sampling = (options["max_gen_len"], options["temperature"], options["top_p"],
                    tokenizer.stop_ids, options["seed"])
        tuned = generate(stage, ids, *sampling)
        base = generate(stage, ids, *sampling, use_prompt=False) if compare else None
        for i, text in enumerate(texts):
            ctx.log(f"### {text}\n[with prompt] {decode_continuation(tokenizer, ids[i], tuned[i])}")
            if base is not None:
                ctx.log(f"[base model]  {decode_continuation(tokenizer, ids[i], base[i])}")
            ctx.log("-" * 40)

    run_on_stage(options, work, Preparation(fuse_projections=True, cpu_linears="packed",
                                                 dynamic_int8=not options["exact_quantized"],
                                                 method=method))


if __name__ == "__main__":
    run_cli(main)
