"""The project's own error for bad input, and the wrapper that turns it into one clear line.

Every check of user input raises BadInput with a message that names the file or value at fault
and what to do about it. The command-line scripts print that message and exit non-zero.
"""
import sys

import fire


class BadInput(Exception):
    """Input the user can fix: a missing file, a wrong value, a corrupt checkpoint."""


def run_cli(main):
    """fire.Fire(main), but a BadInput ends the program with its message and exit status 2."""
    try:
        fire.Fire(main)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
