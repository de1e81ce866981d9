"""One option set: every script that loads a model takes the same model options, with the same
type, default and help text, declared once in llama/options.py; generation scripts share the
sampling options too. Nothing here loads a model.
Run: python3 -m pytest -q tests/test_options.py
"""
import inspect

import pytest

import chat
import example
import example_ft
import ft_main
import serve
from llama.cli import help_text, split_docstring
from llama.options import DECODING, GENERATION, MODEL, REQUIRED, takes
from llama.tools import distill

LOADS_A_MODEL = {"example.py": example.main, "example_ft.py": example_ft.main,
                 "chat.py": chat.main, "serve.py": serve.main, "ft_main.py": ft_main.main,
                 "distill teach": distill.teach, "distill score": distill.score}
GENERATES = {"example.py": (GENERATION, DECODING), "example_ft.py": (GENERATION, DECODING),
             "chat.py": (GENERATION, DECODING), "serve.py": (DECODING,)}
# where a script's default differs from the declared one, and why it may
OWN_DEFAULTS = {("ft_main.py", "max_seq_len"): 512,  # the examples' length, not the model's
                ("chat.py", "max_gen_len"): 256, ("chat.py", "temperature"): 0.6,  # a chat
                ("distill teach", "dtype"): "float32", ("distill score", "dtype"): "float32"}


def options_of(main) -> dict:
    return dict(inspect.signature(main).parameters)


@pytest.mark.parametrize("script", LOADS_A_MODEL)
def test_every_script_that_loads_a_model_takes_the_model_options_as_declared(script):
    main = LOADS_A_MODEL[script]
    params = options_of(main)
    for group in (MODEL, *GENERATES.get(script, ())):
        for option in group:
            assert option.name in params, f"{script} lacks --{option.name}"
            param = params[option.name]
            default = OWN_DEFAULTS.get((script, option.name), option.default)
            assert (param.annotation, param.default) == (option.annotation, default), script
            # the meaning comes from the declaration, not from a copy in the script's docstring
            assert split_docstring(main)[1][option.name] == option.meaning
    assert list(params)[0] == "ckpt_dir"


@pytest.mark.parametrize("script", LOADS_A_MODEL)
def test_no_script_describes_a_shared_option_itself(script):
    """A shared option described again in a docstring would be the copy that drifts."""
    main = LOADS_A_MODEL[script]
    raw = inspect.cleandoc(main.__wrapped__.__doc__ or "")
    shared = {o.name for group in (MODEL, *GENERATES.get(script, ())) for o in group}
    described = {line.split(":")[0].strip() for line in raw.splitlines()
                 if ":" in line and not line.startswith(" ")}
    assert not described & shared, f"{script} describes {sorted(described & shared)} itself"


def test_help_lists_the_model_options_with_their_one_text():
    text = help_text(serve.main, "python serve.py")
    assert "usage: python serve.py --ckpt_dir TEXT [options]" in text
    for option in MODEL:
        assert f"--{option.name} " in text
    assert "--quantize TEXT (default None)" in text and "--compile True|False" in text


def test_takes_fills_defaults_and_keeps_positional_calls():
    seen = {}

    @takes(MODEL, GENERATION, max_gen_len=7)
    def main(prompt: str, template: str = None, **options):
        """Doc.

        prompt: a prompt
        """
        seen.update(prompt=prompt, template=template, **options)

    main("model-folder", "p")
    assert seen["ckpt_dir"] == "model-folder" and seen["prompt"] == "p"
    assert seen["max_gen_len"] == 7 and seen["temperature"] == 0.0 and seen["timeout_s"] == 300.0
    assert options_of(main)["ckpt_dir"].default is REQUIRED
    with pytest.raises(TypeError, match="no shared option named"):
        takes(MODEL, max_gen_len=3)
