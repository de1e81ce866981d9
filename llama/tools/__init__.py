"""Tools a user runs beside the trainer: pictures (plot), arithmetic (explain), the demo (distill).

Nothing the trainer or the generator imports lives here: `python -m llama.tools.plot ...`.
"""
