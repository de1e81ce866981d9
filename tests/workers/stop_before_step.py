"""Worker: ft_main.py, every rank of which stops (KeyboardInterrupt) just before step
$STOP_BEFORE_STEP (numbered from 1), as a crash between two saves leaves a run: its
checkpoint.pt is the last --save_every one. No timing is involved: each rank stops itself.
"""
import os

import ft_main
from llama.cli import run_cli
from llama.training import train

STOP_BEFORE = int(os.environ["STOP_BEFORE_STEP"])
run_train_step = train.run_train_step


def stopping_train_step(stage, batches, cfg, scale, ctx):
    if stage.step + 1 == STOP_BEFORE:
        raise KeyboardInterrupt
    return run_train_step(stage, batches, cfg, scale, ctx)


if __name__ == "__main__":
    train.run_train_step = stopping_train_step
    run_cli(ft_main.main)
