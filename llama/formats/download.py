"""Fetch public checkpoints, tokenizers and Alpaca data, checked by size and sha256.

    python -m llama.formats.download --model stories260K --folder ckpts --data alpaca_1k
    python -m llama.formats.download --model none --data alpaca --mirror https://example.org/assets
(the mirror, a URL or a folder laid out like shared/assets, may also come from $LLAMA_MIRROR;
without either, ../shared/assets beside the repository is used when it exists)
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sentencepiece import SentencePieceProcessor

from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats.files import sha256_of

TIMEOUT_S = 60
CHUNK_BYTES = 1 << 20
# Where the size of a file is not known in advance, a runaway or hostile server must not be able
# to fill the disk.
MODEL_CAP_BYTES = 64 << 30
DATA_CAP_BYTES = 1 << 30
# Where the repository's tests and quickstart find the assets without internet.
ASSETS_BESIDE_REPO = Path(__file__).resolve().parents[3] / "shared" / "assets"
MIRROR_HINT = ("retry, or pass --mirror (or set LLAMA_MIRROR) to a URL or folder laid out like "
               "shared/assets")


@dataclass(frozen=True)
class RemoteFile:
    """One file of the catalogue: where it lies in a mirror and publicly, what it must be, where
    it lands (relative to the model or data folder)."""
    mirror_path: str
    public_base: str
    public_path: str
    dest: str
    sha256: Optional[str] = None
    size: Optional[int] = None
    content: Optional[str] = None  # "sentencepiece" or "json": checked where no sha256 is known
    max_bytes: Optional[int] = None  # tighter than the folder's cap where the size is unknown


TINYLLAMAS = "https://huggingface.co/karpathy/tinyllamas/resolve/main/"
LLAMA2C = ("https://raw.githubusercontent.com/karpathy/llama2.c/"
           "350e04fe35433e6d2941dce5a1f53308f87058eb/")
ALPACA_1K = ("https://raw.githubusercontent.com/wnma3mz/llama/"
             "1cd79f44f82f2a6b0a350eb427f9602b1dbaac90/")
ALPACA_PR152 = ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/"
                "5e69c50054c48cd3b919c46d13bb2d92a62f4498/")
ALPACA_MAIN = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/"

MODELS = {
    "stories260K": (
        RemoteFile("stories260K/stories260K.bin", TINYLLAMAS, "stories260K/stories260K.bin",
                   "stories260K/stories260K.bin",
                   sha256="b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
                   size=1_056_540),
        # The public copy's hash is unknown and the mirror's copy differs from it in a trainer
        # field only, so no hash can serve both: loading it proves it is a tokenizer.
        RemoteFile("stories260K/tok512.model", TINYLLAMAS, "stories260K/tok512.model",
                   "stories260K/tok512.model", content="sentencepiece", max_bytes=1 << 20),
    ),
    "llama-tokenizer": (
        RemoteFile("llama/tokenizer.model", LLAMA2C, "tokenizer.model", "tokenizer.model",
                   sha256="9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347",
                   size=499_723),
    ),
}

DATASETS = {
    "alpaca_1k": (
        RemoteFile("alpaca/alpaca_data_1k.json", ALPACA_1K, "datasets/alpaca_data_1k.json",
                   "alpaca_data_1k.json",
                   sha256="5f5e19cc14d9f9f01a1dc48414684dfcdc0e97a245ce68bf5af0c23c7f7cf5b5",
                   size=415_586),
    ),
    "alpaca_5000": (
        RemoteFile("alpaca/alpaca_5000.json", ALPACA_PR152, "data/alpaca_5000.json",
                   "alpaca_5000.json",
                   sha256="fc1add24c93c9fbbe585a64a6c9bf6165eb110225f4470efbff382a913558ec0",
                   size=2_044_701),
    ),
    # Follows the branch, whose file has no published hash: parsing it at least refuses an
    # error page or a cut-off file.
    "alpaca": (
        RemoteFile("alpaca/alpaca_data.json", ALPACA_MAIN, "alpaca_data.json", "alpaca_data.json",
                   content="json"),
    ),
}


# Hosts a public source may send a download on to: Hugging Face serves its files from a CDN.
# Any other redirect to another host (and any from a --mirror) is refused.
REDIRECT_HOSTS = {"huggingface.co": (".huggingface.co", ".hf.co")}


class SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only on the host of the URL asked for (or its known CDN), never from
    https down to http: a download comes from the base URL the user chose."""

    def __init__(self, url: str):
        self.origin = urllib.parse.urlsplit(url)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urlsplit(newurl)
        known = REDIRECT_HOSTS.get(self.origin.hostname or "", ())
        same_host = target.netloc == self.origin.netloc or (target.hostname or "").endswith(known)
        downgrade = self.origin.scheme == "https" and target.scheme != "https"
        if not same_host or downgrade:
            raise BadInput(f"{req.full_url} redirects to {newurl}, "
                           f"{'another host' if not same_host else 'plain http'}: refused "
                           "(downloads come only from the base URL); " + MIRROR_HINT)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def parse_names(names, catalogue: dict, what: str) -> list:
    """Names from the command line (a string 'a,b', a tuple, or None/'none' for nothing) -> catalogue keys."""
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    names = [str(name).strip() for name in names if str(name).strip()]
    if len(names) == 1 and names[0].lower() == "none":
        return []
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        raise BadInput(f"unknown {what} {', '.join(unknown)}: choose from "
                       f"{', '.join(catalogue)} (or 'none' to skip)")
    return names


def mirror_base_url(mirror) -> Optional[str]:
    """The base URL to fetch from, None for the public sources; a local folder becomes file://.
    Without --mirror and $LLAMA_MIRROR, the assets beside the repository when they exist; an
    empty --mirror '' (or LLAMA_MIRROR=) asks for the public sources."""
    if mirror is None:
        mirror = os.environ.get("LLAMA_MIRROR")
    if mirror is None and ASSETS_BESIDE_REPO.is_dir():
        log(f"no --mirror given: using the assets beside the repository, {ASSETS_BESIDE_REPO} "
            "(--mirror '' fetches from the public sources)")
        return ASSETS_BESIDE_REPO.as_uri() + "/"
    if mirror is None or str(mirror).strip() == "":
        return None
    mirror = str(mirror).strip()
    if "://" in mirror:
        scheme = mirror.split("://", 1)[0].lower()
        if scheme not in ("http", "https", "file"):
            raise BadInput(f"mirror {mirror} has scheme {scheme}://: use http://, https://, "
                           "file:// or a local folder")
        return mirror.rstrip("/") + "/"
    folder = Path(mirror).expanduser()
    if not folder.is_dir():
        raise BadInput(f"mirror folder {mirror} does not exist: pass --mirror (or LLAMA_MIRROR) "
                       "as a URL or a folder laid out like shared/assets")
    return folder.resolve().as_uri() + "/"


def file_url(remote: RemoteFile, base_url: Optional[str]) -> str:
    # Only ever a catalogue path under a chosen base: nothing from the network picks a path.
    if base_url is None:
        return remote.public_base + remote.public_path
    return base_url + remote.mirror_path


def content_problem(path: Path, content: Optional[str]) -> Optional[str]:
    """Why the file at path is not the kind of file expected, or None when it is."""
    if content == "sentencepiece":
        try:
            SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as error:
            return f"it does not load as a sentencepiece model ({error})"
    elif content == "json":
        try:
            with open(path, encoding="utf-8") as stream:
                json.load(stream)
        except (ValueError, OSError) as error:
            return f"it is not valid JSON ({error})"
    return None


def is_already_good(remote: RemoteFile, dest: Path) -> bool:
    """An existing file is kept when its hash matches, or, without a hash, its size and content."""
    if not dest.is_file():
        return False
    if remote.sha256 is not None:
        return sha256_of(dest) == remote.sha256
    if remote.size is not None and dest.stat().st_size != remote.size:
        return False
    return content_problem(dest, remote.content) is None


def announced_length(response) -> Optional[int]:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def stream_to(response, out, url: str, limit: int) -> tuple:
    """Copy the response into out in chunks, refusing more than limit bytes: (n_bytes, sha256)."""
    announced = announced_length(response)
    if announced is not None and announced > limit:
        raise BadInput(f"{url} announces {announced:,} bytes, more than the {limit:,} expected: "
                       "the source holds a different file; " + MIRROR_HINT)
    digest, n_bytes = hashlib.sha256(), 0
    for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
        n_bytes += len(chunk)
        if n_bytes > limit:
            raise BadInput(f"{url} sent more than the {limit:,} bytes expected: the source holds "
                           "a different file; " + MIRROR_HINT)
        digest.update(chunk)
        out.write(chunk)
    if announced is not None and n_bytes != announced:
        raise BadInput(f"{url} stopped after {n_bytes:,} of {announced:,} bytes: " + MIRROR_HINT)
    out.flush()
    os.fsync(out.fileno())
    return n_bytes, digest.hexdigest()


def check_download(remote: RemoteFile, part: Path, url: str, n_bytes: int, sha256: str) -> str:
    """Refuse a finished download that is not the catalogued file; say how it was verified."""
    if remote.size is not None and n_bytes != remote.size:
        raise BadInput(f"{url} gave {n_bytes:,} bytes, expected {remote.size:,}: " + MIRROR_HINT)
    if remote.sha256 is not None:
        if sha256 != remote.sha256:
            raise BadInput(f"{url} has sha256 {sha256}, expected {remote.sha256}: the file is "
                           "corrupt or not the catalogued one; " + MIRROR_HINT)
        return "sha256 verified"
    problem = content_problem(part, remote.content)
    if problem is not None:
        raise BadInput(f"{url} is not the expected file: {problem}; " + MIRROR_HINT)
    checks = ["sha256 unknown"]
    if remote.size is not None:
        checks.append("size checked")
    if remote.content is not None:
        checks.append(f"{remote.content} content checked")
    return ", ".join(checks)


def fetch(remote: RemoteFile, dest: Path, url: str, limit: int) -> str:
    """Download url into dest via dest.part; on any failure no part file is left behind."""
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = open(part, "wb")
    except OSError as error:
        raise BadInput(f"cannot write {part} ({error}): pass a writable folder") from None
    try:
        opener = urllib.request.build_opener(SameHostRedirects(url))
        with out, opener.open(url, timeout=TIMEOUT_S) as response:
            n_bytes, sha256 = stream_to(response, out, url, limit)
        verified = check_download(remote, part, url, n_bytes, sha256)
        os.replace(part, dest)
        return f"{n_bytes:,} bytes, {verified}"
    except BadInput:
        part.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as error:
        part.unlink(missing_ok=True)
        raise BadInput(f"{url}: HTTP {error.code} {error.reason}: " + MIRROR_HINT) from None
    except urllib.error.URLError as error:
        part.unlink(missing_ok=True)
        raise BadInput(f"cannot open {url} ({error.reason}): " + MIRROR_HINT) from None
    except (OSError, http.client.HTTPException) as error:
        part.unlink(missing_ok=True)
        raise BadInput(f"download of {url} failed ({error!r}): " + MIRROR_HINT) from None
    except KeyboardInterrupt:
        part.unlink(missing_ok=True)
        raise BadInput(f"interrupted while downloading {url}; nothing was kept, run the command "
                       "again to restart it") from None


def missing_folders(folder: Path) -> list:
    """folder and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_created(files: list, folders: list):
    """Undo a failed entry: the files this run added, then the folders it made, where empty."""
    for path in files:
        path.unlink(missing_ok=True)
    for folder in sorted(set(folders), key=lambda path: len(path.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was put there meanwhile, keep it
            pass


def download(names: list, catalogue: dict, folder, base_url: Optional[str], force: bool,
             cap_bytes: int) -> list:
    """Fetch every file of the named catalogue entries into folder; returns their paths.
    An entry is whole or absent: when one of its files fails, the files and folders this run
    made for it are removed (what was there before is kept)."""
    paths = []
    for name in names:
        created_files, created_folders = [], []
        try:
            for remote in catalogue[name]:
                dest = Path(folder) / remote.dest
                paths.append(dest)
                if not force and is_already_good(remote, dest):
                    log(f"{name}: {dest} already present and checked, skipped (--force to fetch)")
                    continue
                url = file_url(remote, base_url)
                log(f"{name}: fetching {url}")
                limit = remote.size or remote.max_bytes or cap_bytes
                created_folders += missing_folders(dest.parent)
                is_new = not dest.exists()
                outcome = fetch(remote, dest, url, limit)
                if is_new:
                    created_files.append(dest)
                log(f"{name}: {dest}, {outcome}")
        except BaseException:
            remove_created(created_files, created_folders)
            raise
    return paths


def main(model="stories260K", data="alpaca_1k,alpaca_5000", folder="ckpts",
         data_folder="datasets", mirror=None, force=False):
    """Download a model and its tokenizer into --folder, and Alpaca data into --data_folder.

    model: catalogue names of models, comma-separated, or none to skip the model
    data: catalogue names of data sets, comma-separated, or none to skip the data
    folder: where the model goes
    data_folder: where the data sets go
    mirror: a base URL (http, https, file) or a folder laid out like shared/assets (default:
        $LLAMA_MIRROR, else ../shared/assets beside the repository when it exists, else the
        public sources; '' for the public sources)
    force: fetch even files that are already present
    """
    model_names = parse_names(model, MODELS, "model")
    data_names = parse_names(data, DATASETS, "data")
    base_url = mirror_base_url(mirror)
    download(model_names, MODELS, folder, base_url, force, MODEL_CAP_BYTES)
    download(data_names, DATASETS, data_folder, base_url, force, DATA_CAP_BYTES)


if __name__ == "__main__":
    run_cli(main)
