"""A training run's folder (--out): the files a run writes there, and the lock a run holds on it.

One run at a time: rank 0 holds an flock on <out>/.lock for the run's life (the kernel drops it
if the process dies, so a crashed run leaves nothing stuck). A folder that already holds a run's
files is trained into again only with --resume or --overwrite (which deletes them all at the
start); other files are never touched.
"""
import contextlib
import os
from pathlib import Path

from llama.errors import BadInput
from llama.tuning.peft import PEFT_FILES
from llama.tuning.files import OLD_PROMPT_FILES, TUNING_FILES

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
PEFT_FOLDER = "peft"  # the PEFT export; it holds PEFT_FILES
# What a run of any method writes into --out (earlier versions' prompt files too); a folder
# holding any of them is a used one.
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, *OLD_PROMPT_FILES, *TUNING_FILES, PEFT_FOLDER)
LOCK_FILE = ".lock"


@contextlib.contextmanager
def claim_out(out: Path, resume, overwrite: bool, log, checkpoint=None):
    """Hold --out for the run's life: one run at a time, and a used folder only with --resume
    or --overwrite. Files that are not a run's (RUN_FILES) are never touched, and --out never
    lies in the checkpoint the run reads (a split folder's files are checked against split.json,
    and --overwrite of a split would delete the run)."""
    if checkpoint is not None:
        where, read = out.resolve(), Path(checkpoint).resolve()
        if where == read or read in where.parents:
            raise BadInput(f"--out {out} lies inside the checkpoint {checkpoint} that this run "
                           "reads: pick an --out outside it (e.g. runs/<name>)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(f"--out {out} cannot be created ({error.strerror or error}): pick a "
                       "writable folder") from None
    lock = _lock_folder(out)
    try:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not resume and not overwrite:
            raise BadInput(f"--out {out} already holds a training run ({', '.join(found)}): pass "
                           "--resume to continue it, --overwrite to replace it, or pick another "
                           "--out")
        if found and overwrite:
            remove_run_files(out)
            log(f"--overwrite: replacing the run in {out} (other files there are kept)")
        yield
    finally:
        _unlock_folder(out, lock)
        if created:  # a run that failed before writing anything leaves no empty --out behind
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds when the folder is empty


def remove_run_files(out: Path):
    """--overwrite: every file a run of any method writes, at the start. Left in place, the old
    run's would outlive the new one: metrics appended to, a checkpoint resumed from, another
    run's tuning.pt loaded as the new one's, an old prompt.pt beside a new tuning.pt. A user's files, in peft/ too, stay."""
    for name in RUN_FILES:
        if name != PEFT_FOLDER:
            (out / name).unlink(missing_ok=True)
    peft = out / PEFT_FOLDER
    if peft.is_dir():
        for name in PEFT_FILES:
            (peft / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            peft.rmdir()  # only succeeds when the folder is empty


def _lock_folder(out: Path):
    """An exclusive flock on <out>/.lock. The kernel drops it when the process ends, so a
    crashed run never leaves the folder locked. None where flock does not exist (Windows) or
    the file system refuses it: there, nothing stops a second run at the same time."""
    try:
        import fcntl
    except ImportError:
        return None
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise BadInput(f"--out {out} is not writable ({error.strerror or error}): pick a "
                           "writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadInput(f"--out {out} is in use by another training run (it holds the "
                           "folder's lock): wait for it to end, or pick another --out") from None
        except OSError:  # a file system without flock
            os.close(fd)
            return None
        # The lock file may have been deleted by a run that just ended (_unlock_folder) after
        # we opened it: then the lock we hold is on a file nobody else will look at; retry.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _unlock_folder(out: Path, fd):
    """Delete the lock file while still holding the lock, so a finished run leaves none."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        (out / LOCK_FILE).unlink()
    os.close(fd)
