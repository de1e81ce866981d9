"""The side-by-side anchor: the same shape and batch through transformers + peft.

Imported only when both are installed (common.hf_missing() says); the product never needs them.
The training step is what transformers.Trainer does for one optimizer step with
gradient_accumulation_steps = number of micro-batches: autocast + GradScaler for fp16, the loss
divided by the accumulation steps, unscale, clip to 1.0, AdamW, zero_grad.
"""
import torch
import transformers
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from llama.model.transformer import ModelArgs
from llama.tuning.peft import HF_TARGETS


def versions() -> dict:
    import peft
    return {"transformers": transformers.__version__, "peft": peft.__version__}


def llama_config(args: ModelArgs, use_cache: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim,
                       intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                       num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
                       max_position_embeddings=args.max_seq_len, rms_norm_eps=args.norm_eps,
                       rope_theta=args.rope_theta, tie_word_embeddings=False, use_cache=use_cache)


def random_llama(args: ModelArgs, device, dtype, use_cache: bool):
    """LlamaForCausalLM of this shape with HF's own random init (std 0.02), made on device."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_keyword = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    with torch.device(device):
        model = LlamaForCausalLM._from_config(llama_config(args, use_cache),
                                              attn_implementation="sdpa", **{dtype_keyword: dtype})
    return model.requires_grad_(False)


def peft_config(method: str, n_virtual_tokens: int, lora_r: int, lora_targets):
    """PEFT's config of the method train_bench runs: a soft prompt, or LoRA (alpha 2r, no
    dropout) on the projections named by their short names."""
    if method == "lora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora_r, lora_alpha=2 * lora_r,
                          lora_dropout=0.0, target_modules=[HF_TARGETS[t] for t in lora_targets])
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_virtual_tokens)


class PeftRun:
    """A PEFT method (peft_config) on a random LlamaForCausalLM, stepped as Trainer would step it."""

    def __init__(self, args: ModelArgs, config, device, dtype, recompute: bool):
        model = random_llama(args, device, dtype, use_cache=False)
        if recompute:  # per-layer recomputation; renamed in transformers 5
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.model = get_peft_model(model, config).train()
        self.device, self.dtype = torch.device(device), dtype
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.0)
        mixed = self.device.type == "cuda" and dtype != torch.float32
        self.autocast = lambda: torch.autocast(self.device.type, dtype=dtype, enabled=mixed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mixed and dtype == torch.float16)

    def step(self, micro_batches) -> float:
        """One optimizer step over the micro-batches (input_ids, labels); the mean loss."""
        total = 0.0
        for input_ids, labels in micro_batches:
            input_ids, labels = input_ids.to(self.device), labels.to(self.device)
            with self.autocast():
                out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 labels=labels)
            self.scaler.scale(out.loss / len(micro_batches)).backward()
            total += out.loss.detach()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total) / len(micro_batches)


@torch.no_grad()
def generate_ids(model, input_ids, max_new_tokens: int):
    """HF greedy generate of exactly max_new_tokens (no early stop) with its own KV cache."""
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                          max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
