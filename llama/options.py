"""The options every script that loads a model shares, declared once: name, type, default, meaning.

A script names the groups it takes, and the command line, --help and the call see them as if
they were written in its main's own signature:

    @takes(MODEL, GENERATION, DECODING, max_gen_len=256)   # a script may give another default
    def main(prompts: str = "Once upon a time", **options):
        '''Generate ...

        prompts: the texts to continue
        '''

So example.py, example_ft.py, chat.py, serve.py, ft_main.py and the tools cannot drift apart:
one text per option, one default unless a script says otherwise.
"""
import functools
import inspect
from dataclasses import dataclass

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Option:
    name: str
    annotation: object
    default: object
    meaning: str


MODEL = (
    Option("ckpt_dir", str, REQUIRED, "the model: a split folder (split_model.py), a Meta folder, "
           "a llama2.c .bin or a Hugging Face folder"),
    Option("tokenizer_path", str, None, "the tokenizer: a sentencepiece tokenizer.model or a "
           "Hugging Face tokenizer.json (default: the one beside the checkpoint)"),
    Option("max_seq_len", int, None, "the longest sequence in tokens, soft prompt included: "
           "prompt + reply when generating, one example when training (longer ones are cut; "
           "default: the model's own)"),
    Option("device", str, None, "cpu, cuda or cuda:N (default: this rank's GPU if there is one, "
           "else the CPU)"),
    Option("dtype", str, None, "float32, float16 or bfloat16 for the frozen weights (default: "
           "float16 on a GPU, trained with dynamic loss scaling; float32 on the CPU)"),
    Option("quantize", str, None, "int8 or int4: quantize a float checkpoint's block linears "
           "while loading (a split made with split_model.py --quantize is already quantized)"),
    Option("group_size", int, None, "inputs per int4 scale (default: the largest power of two "
           "up to 128 dividing every width)"),
    Option("tp", int, None, "tensor-parallel ranks per pipeline stage: torchrun starts stages x "
           "tp processes, each stage's layers cut across its tp ranks (default: a split "
           "folder's own when the process count fits it, else 1; docs/tensor_parallel.md)"),
    Option("compile", bool, False, "torch.compile each transformer block (slow to start; needs "
           "a C++ compiler)"),
    Option("timeout_s", float, 300.0, "seconds to wait for another stage before giving up on it"),
)

GENERATION = (
    Option("max_gen_len", int, 64, "the most tokens generated after each text"),
    Option("temperature", float, 0.0, "0 picks the likeliest token (greedy); above 0 samples, "
           "with top-p"),
    Option("top_p", float, 0.9, "sampling keeps the likeliest tokens whose probabilities add up "
           "to top_p"),
    Option("seed", int, 0, "the random seed of sampling"),
)

TRAINING = (
    Option("loss_logits", str, "auto", "the loss head's logits in training: keep (kept from "
           "forward to backward: faster, targets x vocabulary x dtype bytes more), recompute "
           "(run the head again in backward, a chunk of targets at a time: least memory) or "
           "auto (keep when the last stage's estimated peak fits in the memory free at start-up; "
           "the choice is printed then)"),
)

DECODING = (
    Option("cuda_graph", bool, False, "decode with a static KV cache, each step replayed as a "
           "CUDA graph on a GPU (on a CPU the same static path runs uncaptured); the same ids as "
           "without it"),
    Option("exact_quantized", bool, False, "with int8/int4 weights on a CPU, multiply exactly "
           "(each layer dequantized per call, a float output head: training's numbers) instead "
           "of in int8 with the inputs quantized per row, int4 through an int8 copy of its "
           "weights and an int8 output head (faster, about 1% off: docs/quantization.md)"),
)


def takes(*groups, **defaults):
    """Give main the options of `groups` as keyword parameters (after its own), with `defaults`
    replacing the declared ones; their meanings come with them for --help."""
    shared = [option for group in groups for option in group]
    unknown = set(defaults) - {option.name for option in shared}
    if unknown:
        raise TypeError(f"takes(): no shared option named {sorted(unknown)}")

    def attach(main):
        own = inspect.signature(main)
        mine = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        # the model first (--ckpt_dir, also as the first positional argument), then the
        # script's own options, then the other shared ones
        required = [inspect.Parameter(o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      annotation=o.annotation)
                    for o in shared if defaults.get(o.name, o.default) is REQUIRED]
        optional = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY,
                                      annotation=o.annotation, default=defaults.get(o.name, o.default))
                    for o in shared if defaults.get(o.name, o.default) is not REQUIRED]
        signature = own.replace(parameters=required + mine + optional)

        @functools.wraps(main)
        def with_every_option(*args, **kwargs):  # main's **options holds all of them, defaults too
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return main(**bound.arguments)

        with_every_option.__signature__ = signature
        with_every_option.option_meanings = {option.name: option.meaning for option in shared}
        return with_every_option
    return attach


def pick(options: dict, group) -> dict:
    """The values of one group's options from a script's **options."""
    return {option.name: options[option.name] for option in group}
