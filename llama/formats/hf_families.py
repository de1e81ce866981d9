"""The Hugging Face architectures this model runs, and what each family's config.json means for it.

A Qwen2 or Mistral folder looks like a LLaMA's, but its config leaves out what makes it differ
(Qwen2's q/k/v biases are implied by its model_type; MistralConfig fills in a 4096-token
sliding window when the field is missing), so the family is told by name, and anything else
is refused by name. docs/model_families.md describes the differences.
"""
from llama.errors import BadInput

# model_type -> the one architecture name its config.json gives.
FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM"}
# How messages name them.
FAMILY_NAMES = {"llama": "LLaMA", "qwen2": "Qwen2", "mistral": "Mistral"}
# MistralConfig's default when config.json has no sliding_window field.
MISTRAL_DEFAULT_WINDOW = 4096
CANNOT_RUN_HERE = "this model does not implement it, so the checkpoint cannot be run here"


def hf_family(config: dict, where: str) -> str:
    """The model_type of a config this model runs ('llama' for hand-written configs that give
    neither field); refuses other architectures and a model_type that disagrees with them."""
    model_type, architectures = config.get("model_type"), config.get("architectures")
    known = ", ".join(f"{kind} ({arch})" for kind, arch in FAMILIES.items())
    if model_type is not None and model_type not in FAMILIES:
        raise BadInput(f"{where}: model_type={model_type!r} is not one of the families this "
                       f"model runs ({known}): {CANNOT_RUN_HERE}")
    if architectures is not None:
        allowed = [[FAMILIES[model_type]]] if model_type else [[a] for a in FAMILIES.values()]
        if architectures not in allowed:
            said = f" with model_type {model_type!r}" if model_type else ""
            raise BadInput(f"{where}: architectures={architectures!r}{said} is not a family this "
                           f"model runs ({known}): {CANNOT_RUN_HERE}")
    if model_type is None and architectures is not None:
        return next(kind for kind, arch in FAMILIES.items() if [arch] == architectures)
    return model_type or "llama"


def family_args(family: str, config: dict, where: str) -> dict:
    """The ModelArgs fields a family sets beyond a LLaMA's: qkv_bias, sliding_window."""
    if family == "qwen2":
        layer_types = config.get("layer_types") or []
        if config.get("use_sliding_window") is True or \
                any(kind != "full_attention" for kind in layer_types):
            raise BadInput(f"{where}: use_sliding_window=true (Qwen2's sliding window on the "
                           f"layers from max_window_layers on): {CANNOT_RUN_HERE}")
        return {"qkv_bias": True}  # Qwen2 always has them: its config has no field for it
    if family == "mistral":
        window = config.get("sliding_window", MISTRAL_DEFAULT_WINDOW)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window <= 0):
            raise BadInput(f"{where}: sliding_window={window!r} must be a positive number of "
                           "tokens, or null for attention over the whole text")
        return {"sliding_window": window} if window is not None else {}
    return {}
