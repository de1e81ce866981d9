"""One way to prepare a stage: prepare_stage applies fuse -> method -> recompute/offload ->
compile in that order, and refuses combinations that cannot work together in one line, before
any weight is read where it can.
Run: python3 -m pytest -q tests/test_prepare.py
"""
import pytest
import torch

from llama.errors import BadInput
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.prepare.offload import RecomputedBlock
from llama.prepare.stage import Preparation, check_transforms, prepare_stage
from llama.tuning.methods import apply_adapter
from llama.model import int8_matmul
from llama.model.quant import QuantizedLinear
from llama.parallel.pipeline import Stage
from llama.serving.generation import generate
from llama.tuning.lora import apply_lora, lora_settings
from test_quant import skip_unless_onednn_int8_is_exact_here


@pytest.mark.parametrize("prep, message", [
    (Preparation(recompute="selective", offload_activations=True),
     r"--recompute_mode selective keeps activations on the device, so it cannot go with "
     r"--offload activations"),
    (Preparation(stream_weights=True), r"--recompute_mode none keeps activations .* --offload weights"),
    (Preparation(recompute="sometimes"), r"--recompute_mode 'sometimes' must be one of full, selective"),
])
def test_transforms_that_cannot_go_together_are_refused_before_loading(prep, message):
    with pytest.raises(BadInput, match=message):
        check_transforms(prep)


def test_streaming_quantized_weights_is_refused(model_bin):
    model = load_model(model_bin, quantize="int8")
    with pytest.raises(BadInput, match=r"--offload weights streams float block weights, but this "
                                       r"stage's are quantized \(int8/int4\)"):
        prepare_stage(DistContext(), model, None, Preparation(recompute="full", stream_weights=True))


def test_the_method_attaches_to_fused_blocks_before_recompute_wraps_them(model_bin):
    model = load_model(model_bin)
    seen = {}

    def method(ctx, stage_model, tokenizer):
        block = stage_model.layers["0"]
        seen["fused"] = block.attention.wqkv is not None
        seen["wrapped"] = isinstance(block, RecomputedBlock)
        return apply_adapter(stage_model, 4, 2, seed=0)

    tuning = prepare_stage(DistContext(), model, None, Preparation(
        fuse_projections=True, method=method, recompute="full"))
    assert seen == {"fused": True, "wrapped": False}
    assert tuning.trainable and all(isinstance(b, RecomputedBlock) for b in model.layers.values())


def test_generation_multiplies_int8_dynamically_and_training_exactly(model_bin):
    """A recomputed block must give in backward what its first forward gave, and the held-out
    loss what training computes: only generation (Preparation.dynamic_int8) takes the faster,
    inexact int8 product."""
    for dynamic in (False, True):
        model = load_model(model_bin, quantize="int8")
        prepare_stage(DistContext(), model, None, Preparation(dynamic_int8=dynamic))
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert layers and all(layer.use_dynamic_int8 == dynamic for layer in layers)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generations_packed_int8_products_pick_the_ids_of_the_plain_ones(model_bin, scheme,
                                                                        monkeypatch):
    """example.py's preparation (cpu_linears="packed") puts the int8 codes in oneDNN's layout
    too, where not much slower (here: always, as told): the same ids, greedy and sampled, as the
    plain codes, with a LoRA on the packed projections."""
    skip_unless_onednn_int8_is_exact_here()
    prompts = [[1, 403, 407, 261], [1, 67, 10]]
    monkeypatch.setattr(int8_matmul, "much_slower", lambda packed, plain: False)

    def lora(ctx, stage_model, tokenizer):  # a LoRA that changes the text: B is not zero
        tuning = apply_lora(stage_model, lora_settings(r=2), seed=1)
        for key, tensor in tuning.trainable.items():
            if key.endswith("lora_B"):
                tensor.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        return tuning
    ids = {}
    for linears in ("onednn", "packed"):
        model = load_model(model_bin, quantize=scheme, group_size=4 if scheme == "int4" else None)
        prepare_stage(DistContext(), model, None, Preparation(
            fuse_projections=True, dynamic_int8=True, cpu_linears=linears, method=lora))
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert all((layer.int8_packed is not None) == (linears == "packed") for layer in layers)
        stage = Stage(model, DistContext())
        ids[linears] = [generate(stage, prompts, 24, temperature=t, stop_ids=())
                        for t in (0.0, 0.8)]
    assert ids["packed"] == ids["onednn"]
