"""Chat in the terminal through the pipeline, with a tuned soft prompt or the base model.

    python chat.py --ckpt_dir ckpts/stories260K_pp2 --prompt runs/alpaca/prompt
    torchrun --nproc_per_node 2 chat.py --ckpt_dir ckpts/stories260K_pp2
"""
from llama.serving.batching import MixedPromptStage, PromptBank, Sampling
from llama.serving.chat import run_chat
from llama.serving.conversation import DEFAULT_TEMPLATE
from llama.training.records import format_prompt
from llama.cli import run_cli
from llama.errors import BadInput
from llama.serving.generation import check_sampling
from llama.tuning.files import load_soft_prompt
from llama.options import GENERATION, MODEL, takes
from llama.prepare.stage import run_on_stage


@takes(MODEL, GENERATION, max_gen_len=256, temperature=0.6)
def main(prompt: str = None, template: str = None, **options):
    """Chat in the terminal through the pipeline (rank 0 reads your lines, the reply streams).

    The KV cache is kept across turns, so a turn only prefills its new text; when the history
    outgrows max_seq_len the oldest turns are dropped with a note. /reset clears the history,
    /exit or Ctrl+D quits, Ctrl+C stops the current reply.

    prompt: a soft prompt's folder (ft_main.py's --out, or a PEFT prompt-tuning export); none
        chats with the base model
    template: alpaca, plain, none, or a chat format (llama2, llama3, chatml): how each of your lines is wrapped (default: the prompt's
        own template, else plain)
    """
    check_sampling(options["temperature"], options["top_p"])
    max_gen_len = options["max_gen_len"]

    def work(ctx, model, tokenizer, _):
        bank, info = None, {}
        if ctx.is_first and prompt is not None:
            weight, info = load_soft_prompt(prompt, model.args)
            bank = PromptBank(model.args.vocab_size, model.args.dim, {"prompt": weight})
        chosen = template or info.get("template") or DEFAULT_TEMPLATE
        format_prompt({"instruction": ""}, chosen)  # an unknown template is refused here
        virtual_ids = bank.virtual_ids("prompt") if bank else []
        if max_gen_len < 1 or len(virtual_ids) + 2 + max_gen_len > model.args.max_seq_len:
            raise BadInput(f"--max_gen_len={max_gen_len} must be at least 1 and leave room in "
                           f"max_seq_len={model.args.max_seq_len} for the soft prompt "
                           f"({len(virtual_ids)} tokens) and a line: lower it")
        banner = (f"chat with {options['ckpt_dir']}" + (f" and the soft prompt {prompt}" if prompt
                                                        else "") + f" (template {chosen})")
        run_chat(MixedPromptStage(model, ctx, bank), tokenizer, chosen, virtual_ids, max_gen_len,
                 Sampling(options["temperature"], options["top_p"], options["seed"]),
                 heartbeat_s=min(2.0, options["timeout_s"] / 4), banner=banner)

    run_on_stage(options, work)


if __name__ == "__main__":
    run_cli(main)
