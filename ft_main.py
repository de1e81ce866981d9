"""Learn a soft prompt (or per-layer prefixes, adaption prompts or LoRA pairs) for a frozen LLaMA split into pipeline stages (one stage per process).

    torchrun --nproc_per_node 4 ft_main.py --ckpt_dir ckpts/7B_pp4 --data datasets/alpaca_data.json --out ckpts/prompts/alpaca
    python ft_main.py --ckpt_dir ckpts/stories260K --data datasets/alpaca_data_1k.json --out runs/p
    torchrun --nproc_per_node 2 ft_main.py --ckpt_dir ckpts/7B_pp2 --quantize int4 --method lora --lora_targets all --data ... --out runs/qlora
The loop itself is llama/training/train.py; this file is only its command line.
"""
from typing import Union

from llama.training.config import RunConfig
from llama.training.records import ALPACA_PREAMBLE
from llama.cli import run_cli
from llama.options import MODEL, TRAINING, takes
from llama.training.train import train


@takes(MODEL, TRAINING, max_seq_len=512)
def main(data: str, out: str,
         # the tuning method and its prompt
         method: str = "prompt", n_virtual_tokens: int = 32, adapter_layers: int = None,
         init: str = "text", init_text: str = ALPACA_PREAMBLE,
         lora_r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
         lora_targets: str = "q,v", use_rslora: bool = False,
         # data
         template: str = "alpaca", train_on_prompt: bool = False, strict: bool = False,
         eval_fraction: float = 0.05, cache_dir: str = None, eos_target: str = "auto",
         # schedule and batches
         schedule: str = "1f1b", global_batch_size: int = 32, micro_batch_size: int = 4,
         steps: int = None, epochs: int = 1,
         # optimisation
         lr: float = None, lr_schedule: str = "cosine", warmup_steps: int = 10,
         weight_decay: float = 0.0, max_grad_norm: float = 1.0, seed: int = 0,
         # memory
         recompute: bool = False, recompute_mode: str = "full", offload: str = None,
         # bookkeeping
         log_every: int = 10, eval_every: int = 50, save_every: int = 100,
         resume: Union[bool, str] = None, overwrite: bool = False, base_model: str = None,
         trace: str = None, trace_steps: int = 3, max_skipped_steps: int = 20,
         debug_overflow_steps: tuple[int, ...] = (), **options):
    """Train a soft prompt (or prefixes, adaption prompts, LoRA) for a frozen LLaMA, stage by stage.

    Writes <out>/tuning.pt + tuning.json (every method's tensors and description),
    peft/ (PEFT's layout), metrics.jsonl and checkpoint.pt.

    data: the training data: Alpaca JSON (instruction, input, output) or JSONL records
    out: the folder for the prompt, its metrics and the checkpoint for --resume
    method: what trains: prompt (a soft prompt before the text), prefix (keys and values before
        the text in every layer, prefix tuning / P-tuning v2), adapter (LLaMA-Adapter's gated
        adaption prompts in the top --adapter_layers layers) or lora (low-rank updates of the
        --lora_targets projections of every layer; QLoRA with --quantize int8/int4)
    n_virtual_tokens: length of the soft prompt, of each layer's prefix, or of each adaption
        prompt, in tokens
    adapter_layers: with --method adapter, how many of the top layers get an adaption prompt
        (default: all)
    init: how the prompt starts (a prefix: as the keys and values of those tokens; adaption
        prompts always from a seeded normal draw): text (embeddings of --init_text), vocab (random vocabulary
        rows) or random (at the embeddings' scale)
    init_text: the text whose embeddings start the prompt (with --init text)
    lora_r: with --method lora, the rank r of each update B A
    lora_alpha: with --method lora, the update is scaled by lora_alpha / r
    lora_dropout: with --method lora, dropout on the input of A while training (not with full
        recomputation)
    lora_targets: with --method lora, the projections that get an update: comma-separated q, k,
        v, o, gate, up, down, or attention (q,k,v,o), mlp (gate,up,down) or all
    use_rslora: with --method lora, scale by lora_alpha / sqrt(r) (rank-stabilised LoRA)
    template: how a record becomes text: alpaca, plain, none, or a chat format (llama2, llama3,
        chatml) for an instruction-tuned model
    train_on_prompt: also learn to predict the instruction, not only the response
    strict: stop at the first unusable record instead of skipping it with a note
    eval_fraction: the share of records held out for the held-out loss (0 for none)
    cache_dir: where token caches go (default $LLAMA_TOKEN_CACHE, else
        ~/.cache/llama-pp-prompt/tokens); none turns the cache off
    eos_target: the token trained after each text: auto (the model's stop token, EOS or BOS,
        whichever the model predicts after the data's texts), eos, bos or none
    schedule: the pipeline schedule: 1f1b or gpipe
    global_batch_size: examples per optimizer step
    micro_batch_size: examples per micro-batch (the pipeline's unit of work)
    steps: optimizer steps to run (default: --epochs passes over the data)
    epochs: passes over the data when --steps is not given
    lr: the peak learning rate of AdamW (default 3e-2; 2e-4 for --method lora)
    lr_schedule: cosine, linear or constant decay, after --warmup_steps of linear warm-up
    warmup_steps: steps of linear warm-up
    weight_decay: AdamW's weight decay on what trains
    max_grad_norm: clip the gradient of what trains (every stage's, one global norm) to this
        norm (0 for no clipping)
    seed: the random seed (prompt init, data order, held-out split)
    recompute: recompute each layer in backward instead of keeping its activations
    recompute_mode: full (keep only each layer's input) or selective (also keep the matrix
        products' outputs, redo only norms, rotary and SiLU: faster, more memory; implies
        --recompute; not with --offload activations or weights)
    offload: comma-separated optimizer,activations,weights: what to keep in CPU memory
    log_every: print a line every this many steps
    eval_every: compute the held-out loss every this many steps
    save_every: write checkpoint.pt every this many steps (0 for only at the end)
    resume: True to continue from <out>/checkpoint.pt, or the path of a checkpoint
    overwrite: train again into an --out that holds a run (only the run's own files are deleted)
    base_model: the Hugging Face id or folder of this model, recorded in the PEFT export so that
        transformers + peft can load it
    trace: write a Chrome trace of the first --trace_steps steps to this file
    trace_steps: how many steps --trace records
    max_skipped_steps: stop when this many steps in a row overflow in float16
    debug_overflow_steps: steps whose loss is forced to overflow, to see the loss scaler at work
    """
    settings = {name: value for name, value in locals().items() if name != "options"}
    train(RunConfig(**settings, **options))


if __name__ == "__main__":
    run_cli(main)
