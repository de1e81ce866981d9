"""Worker: ft_main.main with a probe that records, on every rank, the loss scale it holds.

Run as a group of ranks (tests/launch.py) with ft_main's own arguments plus --probe_dir; rank r
writes <probe_dir>/scales.<r>.json: per step, the scale the stage was given for the step and the
scale its LossScaler holds after the step's update. Stages must agree on both.
"""
import json
import os
from pathlib import Path

from llama.cli import run_cli

import ft_main
from llama.training import train


def main(probe_dir, **ft_args):
    rank = int(os.environ.get("RANK", 0))
    used, held = [], []

    class RecordingScaler(train.LossScaler):
        def update(self, found_inf):
            skip = super().update(found_inf)
            held.append(self.scale)
            return skip

    run_train_step = train.run_train_step

    def recording_step(stage, batches, cfg, scale, ctx):
        used.append(scale)
        return run_train_step(stage, batches, cfg, scale, ctx)

    train.LossScaler, train.run_train_step = RecordingScaler, recording_step
    try:
        ft_main.main(**ft_args)
    finally:
        record = {"used": [str(s) for s in used], "held": held}
        (Path(probe_dir) / f"scales.{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    run_cli(main)
