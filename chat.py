"""Chat in the terminal through the pipeline, with a tuned soft prompt, prefix or adapter, or the
base model.

    python chat.py --ckpt_dir ckpts/stories260K_pp2 --prompt runs/alpaca/prompt
    torchrun --nproc_per_node 2 chat.py --ckpt_dir ckpts/stories260K_pp2
"""
from llama.parallel.pipeline import Stage
from llama.serving.chat import run_chat
from llama.serving.conversation import DEFAULT_TEMPLATE
from llama.training.records import format_prompt
from llama.cli import run_cli
from llama.errors import BadInput
from llama.serving.sampling import Sampling, check_sampling
from llama.tuning.files import saved_tuning
from llama.options import DECODING, GENERATION, MODEL, takes
from llama.prepare.stage import Preparation, run_on_stage


@takes(MODEL, GENERATION, DECODING, max_gen_len=256, temperature=0.6)
def main(prompt: str = None, template: str = None, **options):
    """Chat in the terminal through the pipeline (rank 0 reads your lines, the reply streams).

    The KV cache is kept across turns, so a turn only prefills its new text; when the history
    outgrows max_seq_len the oldest turns are dropped with a note. /reset clears the history,
    /exit or Ctrl+D quits, Ctrl+C stops the current reply.

    prompt: a tuning's folder (ft_main.py's --out: a soft prompt, prefix, adapter or LoRA, or a
        PEFT export of one); none chats with the base model
    template: alpaca, plain, none, or a chat format (llama2, llama3, chatml): how each of your
        lines is wrapped (default: the prompt's own template, else plain)
    """
    check_sampling(options["temperature"], options["top_p"])
    max_gen_len = options["max_gen_len"]

    method = saved_tuning(prompt) if prompt is not None else None

    def work(ctx, model, tokenizer, tuning):
        stage = Stage(model, ctx, tuning=tuning, cuda_graph=options["cuda_graph"])
        info = method.info if method is not None else {}
        chosen = template or info.get("template") or DEFAULT_TEMPLATE
        format_prompt({"instruction": ""}, chosen)  # an unknown template is refused here
        if max_gen_len < 1 or stage.n_virtual + 2 + max_gen_len > model.args.max_seq_len:
            raise BadInput(f"--max_gen_len={max_gen_len} must be at least 1 and leave room in "
                           f"max_seq_len={model.args.max_seq_len} for the soft prompt "
                           f"({stage.n_virtual} tokens) and a line: lower it")
        banner = (f"chat with {options['ckpt_dir']}" + (f" and the tuning {prompt}" if prompt
                                                        else "") + f" (template {chosen})")
        run_chat(stage, tokenizer, chosen, max_gen_len,
                 Sampling(options["temperature"], options["top_p"], options["seed"]),
                 heartbeat_s=min(2.0, options["timeout_s"] / 4), banner=banner)

    run_on_stage(options, work, Preparation(method=method, fuse_projections=True,
                                             cpu_linears="packed",
                                             dynamic_int8=not options["exact_quantized"]))

if __name__ == "__main__":
    run_cli(main)
