"""The project's own error for bad input, and the wrapper that turns it into one clear line.

Every check of user input raises BadInput with a message that names the file or value at fault
and what to do about it. The command-line scripts print that message and exit non-zero.
"""
import os
import sys
import traceback


class BadInput(Exception):
    """Input the user can fix: a missing file, a wrong value, a corrupt checkpoint."""


def run_cli(main):
    """Run a script's main (or {command: function}) from the command line: every flag checked
    against the signature before any work, --help from the docstring, and a BadInput ends the
    program with its message and exit status 2. See llama/cli.py."""
    from llama.cli import run  # imported here: llama.cli itself imports BadInput from this module
    if not is_rank_of_a_job():
        run(main)
        return
    try:
        run(main)
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:  # a bug or Ctrl+C: show it, leave with the status Python gives
        traceback.print_exc()
        status = 130 if isinstance(error, KeyboardInterrupt) else 1
    leave_without_teardown(status)


def is_rank_of_a_job() -> bool:
    """Started by torchrun (or by hand) as one of several ranks that join a process group."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def leave_without_teardown(status: int):
    """End a rank with status, skipping the interpreter's teardown.

    gloo's worker threads release each finished operation, and with it the Python tensors it
    used, a moment after the operation has completed. The process group (and its threads) should
    go away in destroy_process_group, but once torch._dynamo is imported (initialising any module
    on the meta device imports it) torch keeps the group alive to the end. If the interpreter is
    being torn down when a worker thread releases a tensor, that thread cannot take the GIL and
    the process dies with SIGABRT ("terminate called without an active exception"), although its
    work was done. Every file this project writes is complete (fsynced and renamed) before this
    point, so flushing the standard streams is all that is left to do."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said on it
    os._exit(status)
