"""Writing files so that a crash never leaves half of one, and hashing them.

Every file the project writes (stage files, checkpoints, prompts, caches, traces, pictures) goes
through atomic_write: a temp file beside the target, fsync, rename. Readers see the old complete
file or the new one.
"""
import hashlib
import os
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
