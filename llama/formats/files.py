"""Writing files so that a crash never leaves half of one, and hashing them.

Every file the project writes (stage files, checkpoints, prompts, caches, traces, pictures) goes
through atomic_write: a temp file beside the target, fsync, rename. Readers see the old complete
file or the new one.
"""
import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

from llama.errors import BadInput


def fsync_dir(folder):
    """Make a rename inside `folder` durable (the directory entry itself is data too)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write_fn):
    """Call write_fn(binary file) on a temp file beside path, fsync it, rename it into place.

    A failure (a full disk, say) raises BadInput naming the file and leaves the old one intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # one per process: ranks may race
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        os_error = underlying_os_error(error)
        if os_error is None:
            raise
        raise BadInput(f"could not write {path} ({os_error.strerror or os_error}); the previous "
                       "file, if any, is unchanged: free some space or pick another folder") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def underlying_os_error(error):
    """The OSError behind error: torch.save's zip writer answers a failed write (a full disk)
    with a RuntimeError of its own, raised while the OSError is being handled."""
    while error is not None and not isinstance(error, OSError):
        error = error.__context__
    return error


def atomic_write_bytes(path, data: bytes):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def sha256_of(path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- folders a command replaces as a whole ----

def check_output_folder(folder, flag: str, kind: str, marker: str, own_name, reads=(),
                        overwrite: bool = False):
    """Refuse, with one line naming the folder, to write `folder` over anything but our own output.

    `folder` may be absent or empty. Otherwise it must be `kind` as this project writes it: its
    `marker` file inside and nothing but files whose names match the regular expression
    `own_name`, and --overwrite given. It is never replaced when it is, holds or lies inside one
    of the paths in `reads`: the command is reading them while it writes.
    """
    folder = Path(folder)
    # Checked before the folder exists too: resolve() follows the links of its nearest
    # existing parent, so a new --dst inside --src (through a link or '..') is caught.
    where = folder.resolve()
    for read in (Path(r).resolve() for r in reads if r):
        if read == where or where in read.parents:
            raise BadInput(f"{flag} {folder} holds {read}, which this command reads, so it is "
                           f"never replaced: choose another {flag}")
        if read in where.parents:
            raise BadInput(f"{flag} {folder} lies inside {read}, which this command reads, so it "
                           f"is never replaced: choose another {flag}")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise BadInput(f"{flag} {folder} is a file, not a folder: choose another {flag}")
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return
    if marker not in names:
        raise BadInput(f"{folder} already exists and is not {kind} (it has no {marker}), so it "
                       f"is never replaced: choose another {flag}")
    foreign = [name for name in names if not re.fullmatch(own_name, name)]
    if foreign:
        raise BadInput(f"{folder} holds {foreign[0]}, which is not part of {kind}, so the folder "
                       f"is never replaced: move it out or choose another {flag}")
    if not overwrite:
        raise BadInput(f"{folder} already exists ({kind}): pass --overwrite to replace it, or "
                       f"choose another {flag}")


# ---- folders written beside their target and renamed into place ----

def folder_beside(folder, role: str) -> Path:
    """`.<name>.<role>-<pid>` beside folder: 'tmp' while it is written, 'old' for the folder it
    replaces. The pid tells a later run whether the process that made it is gone."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.{role}-{os.getpid()}")


def make_temp_folder(folder, flag: str) -> Path:
    """A new empty folder_beside(folder, 'tmp') to write into; a folder that cannot be written
    (read-only, full, a file in the path) is refused in one line naming it."""
    folder = Path(folder)
    tmp_dir = folder_beside(folder, "tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        tmp_dir.mkdir(parents=True)
    except OSError as error:
        raise BadInput(f"{flag} {folder} cannot be written: its folder {folder.parent} does not "
                       f"take new files ({error.strerror or error}); pick a writable place for "
                       f"{flag}") from None
    return tmp_dir


def replace_folder(new_dir, folder):
    """Rename new_dir to folder. An existing folder is renamed aside first and deleted only once
    the new one is in place: deleting it first, a kill in between would lose both. A kill
    between the two renames leaves the old one at `.<name>.old-<pid>`, which
    clean_stale_folders_beside puts back."""
    new_dir, folder = Path(new_dir), Path(folder)
    old_dir = folder_beside(folder, "old")
    if folder.exists():
        os.replace(folder, old_dir)
    try:
        os.replace(new_dir, folder)
    except OSError:
        if old_dir.exists():
            os.replace(old_dir, folder)
        raise
    fsync_dir(folder.parent)
    shutil.rmtree(old_dir, ignore_errors=True)


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but is another user's: alive
        return True
    return True


def clean_stale_folders_beside(folder):
    """Undo what a killed run left beside folder: a temp folder (as big as the model) of a dead
    process is deleted, an old folder renamed aside is put back if folder is missing (else
    deleted). Only names of the form folder_beside writes are touched, and only when their
    process is gone: a live run's folders are its own."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return
    ours = re.compile(rf"\.{re.escape(folder.name)}\.(tmp|old)-(\d+)")
    for path in sorted(folder.parent.iterdir(), key=lambda p: p.name):  # 'old' before 'tmp'
        match = ours.fullmatch(path.name)
        if not match or not path.is_dir() or process_is_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not folder.exists():
            os.replace(path, folder)
            print(f"note: put back {folder}, which a killed run (pid {match.group(2)}) had "
                  "moved aside to replace it")
        else:
            shutil.rmtree(path, ignore_errors=True)
