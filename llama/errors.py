"""The project's own error for bad input, and the wrapper that turns it into one clear line.

Every check of user input raises BadInput with a message that names the file or value at fault
and what to do about it. The command-line scripts print that message and exit non-zero.
"""


class BadInput(Exception):
    """Input the user can fix: a missing file, a wrong value, a corrupt checkpoint."""


def run_cli(main):
    """Run a script's main (or {command: function}) from the command line: every flag checked
    against the signature before any work, --help from the docstring, and a BadInput ends the
    program with its message and exit status 2. See llama/cli.py."""
    from llama.cli import run  # imported here: llama.cli itself imports BadInput from this module
    run(main)
