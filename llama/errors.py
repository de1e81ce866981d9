"""The project's own error for bad input.

Every check of user input raises BadInput with a message that names the file or value at fault
and what to do about it; llama.cli.run_cli turns it into one line and exit status 2.
"""


class BadInput(Exception):
    """Input the user can fix: a missing file, a wrong value, a corrupt checkpoint."""
