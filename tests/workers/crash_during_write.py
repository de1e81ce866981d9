"""Worker: run ft_main.py or split_model.py and die in the middle of writing one file, the way a
killed process or a power cut would: os._exit, so no exception handler, finally or atexit runs.

    python tests/workers/crash_during_write.py --script ft_main --crash half --file checkpoint.pt \
        --nth 2 <the script's own arguments>

--crash half: the nth write of a file named --file puts half its bytes on disk, then the process
dies; before: it dies just before the nth write of that file starts (between two files);
rmtree: it dies half way through deleting a folder that holds a split.json (an old split being
replaced). The exit status is CRASH_EXIT, so the test knows the crash happened where it wanted.
"""
import io
import os
import shutil
from pathlib import Path

from llama.cli import run_cli

import ft_main
import split_model
from llama.formats import files

CRASH_EXIT = 97
SCRIPTS = {"ft_main": ft_main.main, "split_model": split_model.main}


def main(script, crash, file=None, nth: int = 1, **script_args):
    seen = 0
    real_atomic_write, real_rmtree = files.atomic_write, shutil.rmtree

    def crashing_atomic_write(path, write_fn):
        nonlocal seen
        if Path(path).name != file:
            return real_atomic_write(path, write_fn)
        seen += 1
        if seen != nth:
            return real_atomic_write(path, write_fn)
        if crash == "before":
            os._exit(CRASH_EXIT)

        def write_half(f):
            buffer = io.BytesIO()
            write_fn(buffer)
            data = buffer.getvalue()
            f.write(data[:len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os._exit(CRASH_EXIT)
        return real_atomic_write(path, write_half)

    def crashing_rmtree(path, *args, **kwargs):
        folder = Path(path)
        if not (folder / "split.json").is_file():
            return real_rmtree(path, *args, **kwargs)
        entries = sorted(folder.iterdir())
        for entry in entries[:len(entries) // 2]:
            entry.unlink()
        os._exit(CRASH_EXIT)

    files.atomic_write = crashing_atomic_write
    shutil.rmtree = crashing_rmtree
    SCRIPTS[script](**script_args)


if __name__ == "__main__":
    run_cli(main)
