"""Each family's difference survives the pipeline: the gradient of every tuning method through 2
stages equals one process on the same global batch, for Llama 3.2 (llama3 rope scaling, tied
embeddings), Qwen2.5 (q/k/v biases) and Mistral (a sliding window shorter than the texts).
Run: python3 -m pytest -q tests/test_families_pipeline.py
"""

import pytest

from llama.formats.checkpoint import load_model
from llama.tuning.methods import apply_prompt
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from test_methods import assert_stages_give, one_process_gradient, with_tuning
from tiny_families import llama32_config, mistral_config, qwen25_config, write_family

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
        loss, grads = one_process_gradient(model, tuning_for(model, method))
        assert_stages_give(folder, method, 2, loss, grads, tmp_path / f"{method}.pt", "1f1b",
                           f"{family}, {method}")
