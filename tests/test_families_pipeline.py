"""Each family's difference survives the pipeline: the gradient of every tuning method through 2
stages equals one process on the same global batch, for Llama 3.2 (llama3 rope scaling, tied
embeddings), Qwen2.5 (q/k/v biases) and Mistral (a sliding window shorter than the texts).
Run: python3 -m pytest -q tests/test_families_pipeline.py
"""
import os

import pytest
import torch

from launch import check_all_ok, launch
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.parallel.pipeline import Stage
from llama.tuning.methods import apply_prompt
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from test_methods import full_batch, with_tuning
from tiny_families import llama32_config, mistral_config, qwen25_config, write_family
from workers.prompt_grad import make_micro_batches

FAMILIES = {"llama3.2": llama32_config, "qwen2.5": qwen25_config,
            "mistral": lambda **c: mistral_config(**c, sliding_window=5)}  # texts are 10-12


def tuning_for(model, method):
    if method != "prompt":
        return with_tuning(model, method)  # adapter gates opened, as the worker does
    weight = init_prompt_weight("random", 4, model.tok_embeddings.weight, seed=1)
    return apply_prompt(SoftPrompt(weight), 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_methods_gradient_through_two_stages_equals_one_process(family, tmp_path):
    folder = write_family(tmp_path / family, FAMILIES[family](num_hidden_layers=4))
    for method in ("prompt", "prefix", "adapter"):
        model = load_model(folder)
        tuning = tuning_for(model, method)
        micro = make_micro_batches(model.args.vocab_size, 4, 2)
        expected_loss, _ = Stage(model, DistContext(), tuning=tuning).train_step(
            [full_batch(micro)], "gpipe")
        expected = {k: t.grad.clone() for k, t in tuning.trainable.items()}
        assert all(float(g.norm()) > 0 for g in expected.values())

        out = tmp_path / f"{method}.pt"
        check_all_ok(launch([os.path.join("tests", "workers", "method_grad.py"), "--ckpt",
                             str(folder), "--out", str(out), "--method", method,
                             "--schedules", "1f1b"], 2, timeout_s=120))
        result = torch.load(out, weights_only=True)["1f1b"]
        assert sorted(result["grads"]) == sorted(expected)
        for key, grad in result["grads"].items():
            error = float((grad - expected[key]).norm() / expected[key].norm())
            assert error <= 1e-5, f"{family}, {method}, {key}: {error:.2e}"
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
