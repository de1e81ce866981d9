"""Chat in the terminal through the pipeline, with a tuned soft prompt or the base model.

    python chat.py --ckpt_dir ckpts/stories260K_pp2 --prompt runs/alpaca/prompt
    torchrun --nproc_per_node 2 chat.py --ckpt_dir ckpts/stories260K_pp2
"""
from llama.parallel.pipeline import Stage
from llama.serving.chat import run_chat
from llama.serving.conversation import DEFAULT_TEMPLATE
from llama.training.data import format_prompt
from llama.cli import run_cli
from llama.errors import BadInput
from llama.parallel.faults import PeerLost, report_and_exit
from llama.serving.sampling import Sampling, check_sampling
from llama.tuning.files import load_tuning
from llama.tuning.methods import apply_saved
from llama.prepare.stage import start_stage


def main(ckpt_dir: str, prompt: str = None, template: str = None, max_gen_len: int = 256,
         temperature: float = 0.6, top_p: float = 0.9, seed: int = 0, tokenizer_path: str = None,
         max_seq_len: int = None, device: str = None, dtype: str = None, timeout_s: float = 300.0):
    """Chat in the terminal through the pipeline (rank 0 reads your lines, the reply streams).

    The KV cache is kept across turns, so a turn only prefills its new text; when the history
    outgrows max_seq_len the oldest turns are dropped with a note. /reset clears the history,
    /exit or Ctrl+D quits, Ctrl+C stops the current reply.

    ckpt_dir: the model: a split folder (split_model.py), a Meta folder, a llama2.c .bin or a
        Hugging Face folder
    prompt: a tuning's folder (ft_main.py's --out: a soft prompt, prefix or adapter, or a PEFT
        export of one); none chats with the base model
    template: alpaca, plain or none: how each of your lines is wrapped (default: the prompt's
        own template, else plain)
    max_gen_len: the most tokens of one reply
    temperature: 0 picks the likeliest token (greedy); above 0 samples, with top-p
    top_p: sampling keeps the likeliest tokens whose probabilities add up to top_p
    seed: the random seed of sampling
    tokenizer_path: the sentencepiece tokenizer.model (default: the one beside the checkpoint)
    max_seq_len: the longest history in tokens, soft prompt included (default: the model's own)
    device: cpu, cuda or cuda:N (default: this rank's GPU if there is one, else the CPU)
    dtype: float32, float16 or bfloat16 for the weights (default: float16 on a GPU, float32 on
        the CPU)
    timeout_s: seconds to wait for another stage before giving up on it
    """
    check_sampling(temperature, top_p)
    ctx, model, tokenizer = start_stage(ckpt_dir, tokenizer_path, device, dtype, max_seq_len,
                                        timeout_s)
    try:
        # Rank 0 reads and checks the folder; every stage keeps the tensors of its own layers.
        loaded = load_tuning(prompt, model.args) if ctx.rank == 0 and prompt is not None else None
        stage = Stage(model, ctx)
        info = {}
        if ctx.broadcast_object(loaded is not None):
            method, tensors, info = ctx.broadcast_object(loaded)
            stage = Stage(model, ctx, tuning=apply_saved(model, method, tensors, ctx.is_first))
        template = template or info.get("template") or DEFAULT_TEMPLATE
        format_prompt({"instruction": ""}, template)  # an unknown template is refused here
        n_virtual = stage.n_virtual
        if max_gen_len < 1 or n_virtual + 2 + max_gen_len > model.args.max_seq_len:
            raise BadInput(f"--max_gen_len={max_gen_len} must be at least 1 and leave room in "
                           f"max_seq_len={model.args.max_seq_len} for the soft prompt "
                           f"({n_virtual} tokens) and a line: lower it")
        banner = (f"chat with {ckpt_dir}" + (f" and the soft prompt {prompt}" if prompt else "")
                  + f" (template {template})")
        run_chat(stage, tokenizer, template, max_gen_len, Sampling(temperature, top_p, seed),
                 heartbeat_s=min(2.0, timeout_s / 4), banner=banner)
    except PeerLost as error:
        report_and_exit(error, ctx.rank)
    ctx.close()


if __name__ == "__main__":
    run_cli(main)
