"""Learn a soft prompt for a frozen LLaMA split into pipeline stages (one stage per process).

    torchrun --nproc_per_node 4 ft_main.py --ckpt_dir ckpts/7B_pp4 --data datasets/alpaca_data.json --out ckpts/prompts/alpaca
    python ft_main.py --ckpt_dir ckpts/stories260K --data datasets/alpaca_data_1k.json --out runs/p
The loop itself is llama/train.py; this file is only its command line.
"""
from types import SimpleNamespace

from llama.data import ALPACA_PREAMBLE
from llama.errors import run_cli
from llama.train import train


def main(ckpt_dir: str, data: str, out: str, tokenizer_path: str = None,
         # the prompt
         n_virtual_tokens: int = 32, init: str = "text", init_text: str = ALPACA_PREAMBLE,
         # data
         template: str = "alpaca", train_on_prompt: bool = False, strict: bool = False,
         eval_fraction: float = 0.05, max_seq_len: int = 512, cache_dir: str = None,
         eos_target: str = "auto",
         # schedule and batches
         schedule: str = "1f1b", global_batch_size: int = 32, micro_batch_size: int = 4,
         steps: int = None, epochs: int = 1,
         # optimisation
         lr: float = 3e-2, lr_schedule: str = "cosine", warmup_steps: int = 10,
         weight_decay: float = 0.0, max_grad_norm: float = 1.0, seed: int = 0,
         # precision and memory
         device: str = None, dtype: str = None, recompute: bool = False, offload: str = None,
         # bookkeeping
         log_every: int = 10, eval_every: int = 50, save_every: int = 100, resume=None,
         overwrite: bool = False,
         trace: str = None, trace_steps: int = 3, timeout_s: float = 300.0,
         max_skipped_steps: int = 20, debug_overflow_steps=(), base_model: str = None):
    """Train a soft prompt; writes <out>/prompt.pt, prompt.json, peft/, metrics.jsonl, checkpoint.pt.

    init: text (embeddings of --init_text), vocab (random vocabulary rows) or random (at the
    embeddings' scale). offload: comma-separated optimizer,activations,weights. dtype: float16
    (default on GPU, with dynamic loss scaling), bfloat16 or float32 (default on CPU).
    eos_target: the token trained after each text: auto (the model's stop token, EOS or BOS,
    whichever the model predicts after the data's texts), eos, bos or none.
    cache_dir: where token caches go (default $LLAMA_TOKEN_CACHE, else
    ~/.cache/llama-pp-prompt/tokens); none turns the cache off.
    resume: True for <out>/checkpoint.pt, or a path. A used --out (one holding a run's files)
    needs --resume or --overwrite, which replaces only the run's own files there. debug_overflow_steps: steps whose loss is
    forced to overflow, to see the loss scaler at work.
    """
    if isinstance(debug_overflow_steps, int):
        debug_overflow_steps = (debug_overflow_steps,)
    train(SimpleNamespace(**locals()))


if __name__ == "__main__":
    run_cli(main)
