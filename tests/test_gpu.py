"""What only a CUDA GPU can show: a real fp16 overflow, offload really moving memory off the GPU,
and the out-of-memory message naming the stage. Skipped without a GPU; bench/gpu_check.sh runs
them on the GPU machine (python -m pytest -q -m gpu tests/test_gpu.py).
"""
import pytest
import torch

from llama.formats.checkpoint import load_model
from llama.training.data import make_micro_batch
from llama.parallel.distributed import DistContext
from llama.errors import BadInput
from llama.prepare.offload import apply_recompute, apply_weight_streaming, optimizer_device
from llama.parallel.pipeline import Stage
from llama.training.precision import LossScaler, ScaledAdamW, finish_step
from llama.tuning.prompt import SoftPrompt, init_prompt_weight

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICE = torch.device("cuda", 0)


def gpu_stage(model_bin, dtype=torch.float16, n_virtual=8):
    model = load_model(model_bin, device=DEVICE, dtype=dtype, max_seq_len=256)
    weight = init_prompt_weight("random", n_virtual, model.tok_embeddings.weight, seed=1)
    prompt = SoftPrompt(weight).to(DEVICE)
    return model, prompt, Stage(model, DistContext(device=DEVICE), prompt, n_virtual)


def batches(n_micro=2, rows=4, length=120):
    generator = torch.Generator().manual_seed(0)
    examples = [(torch.randint(3, 512, (length,), generator=generator).tolist(), 1)
                for _ in range(n_micro * rows)]
    return [make_micro_batch(examples[i:i + rows], pad_id=2) for i in range(0, len(examples), rows)]


def test_a_real_fp16_overflow_skips_the_step_and_halves_the_scale(model_bin):
    model, prompt, stage = gpu_stage(model_bin)
    scaler = LossScaler(enabled=True, init_scale=2.0 ** 60)  # dL/dh overflows fp16 at this scale
    optimizer = ScaledAdamW(prompt.weight, 1e-2, 0.0, (0.9, 0.999), DEVICE)
    before = prompt.weight.detach().clone()
    stage.train_step(batches(), "1f1b", scaler.scale)
    assert optimizer.found_overflow()
    skipped, _ = finish_step(scaler, optimizer, True, 1e-2, 1.0, float("nan"))
    assert skipped and scaler.scale == 2.0 ** 59
    assert torch.equal(prompt.weight, before) and prompt.weight.grad is None
    # at a sane scale the same step is finite and trains
    scaler.scale = 2.0 ** 16
    stage.train_step(batches(), "1f1b", scaler.scale)
    assert not optimizer.found_overflow()
    squared = optimizer.unscale(scaler.scale)
    skipped, _ = finish_step(scaler, optimizer, False, 1e-2, 1.0, squared ** 0.5)
    assert not skipped and not torch.equal(prompt.weight, before)


def peak_during_step(stage, micro_batches):
    torch.cuda.synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    start = torch.cuda.memory_allocated(DEVICE)
    stage.train_step(micro_batches, "gpipe")  # GPipe keeps every micro-batch's activations
    torch.cuda.synchronize(DEVICE)
    return torch.cuda.max_memory_allocated(DEVICE) - start


def test_recompute_and_activation_offload_lower_the_gpu_peak(model_bin):
    micro_batches = batches(n_micro=4, rows=8, length=200)
    peaks = {}
    for name, offload in (("plain", None), ("recompute", False), ("activations", True)):
        model, _, stage = gpu_stage(model_bin, dtype=torch.float32)
        if offload is not None:
            apply_recompute(model, offload_activations=offload)
        peaks[name] = peak_during_step(stage, micro_batches)
        del model, stage
        torch.cuda.empty_cache()
    assert peaks["recompute"] < 0.7 * peaks["plain"], peaks
    assert peaks["activations"] < peaks["recompute"], peaks


def test_optimizer_offload_keeps_adamw_state_in_host_memory(model_bin):
    _, prompt, stage = gpu_stage(model_bin)
    optimizer = ScaledAdamW(prompt.weight, 1e-2, 0.0, (0.9, 0.999),
                            optimizer_device(prompt.weight, offload=True))
    stage.train_step(batches(), "1f1b", 2.0 ** 10)
    squared = optimizer.unscale(2.0 ** 10)
    finish_step(LossScaler(enabled=True), optimizer, False, 1e-2, 1.0, squared ** 0.5)
    assert optimizer.master.device.type == "cpu"
    assert all(v.device.type == "cpu" for v in optimizer.optimizer.state[optimizer.master].values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)
    assert prompt.weight.device == DEVICE


def test_weight_streaming_frees_the_blocks_weights_from_the_gpu(model_bin):
    model, _, stage = gpu_stage(model_bin, dtype=torch.float32)
    block_bytes = sum(p.numel() * p.element_size() for block in model.layers.values()
                      for p in block.parameters())
    before = torch.cuda.memory_allocated(DEVICE)
    apply_recompute(model)
    apply_weight_streaming(model, DEVICE)
    torch.cuda.synchronize(DEVICE)
    assert before - torch.cuda.memory_allocated(DEVICE) >= 0.9 * block_bytes
    loss, n_targets = stage.train_step(batches(), "1f1b")
    assert loss is not None and loss / n_targets < 20


def test_out_of_memory_names_the_stage_and_the_switches(model_bin):
    from llama.training.train import run_train_step
    _, _, stage = gpu_stage(model_bin, dtype=torch.float32)
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    cfg = type("Cfg", (), {"schedule": "gpipe", "micro_batch_size": 64})()
    torch.cuda.set_per_process_memory_fraction(
        (torch.cuda.memory_allocated(DEVICE) + 2**20) / total, DEVICE)
    try:
        with pytest.raises(BadInput, match=r"stage 0 ran out of GPU memory: try --offload "
                                           r"activations, a smaller --micro_batch_size \(now 64\)"):
            run_train_step(stage, batches(n_micro=2, rows=64, length=256), cfg, 1.0,
                           DistContext(device=DEVICE))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, DEVICE)
        torch.cuda.empty_cache()
